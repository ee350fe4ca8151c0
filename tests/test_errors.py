"""Bad input gets a clear error that says what to do, and never leaves the model half-patched."""

import pytest
import torch
from transformers import StaticCache

import vtprune
from vtprune import (
    AlreadyPrunedError,
    BudgetError,
    LayerError,
    UnknownStrategyError,
    UnsupportedCacheError,
    UnsupportedModelError,
)
from vtprune.compat import CACHE_KWARG, output_cache
from vtprune.schedule import BudgetWarning


def assert_unpatched(model):
    assert not hasattr(model, "_vtprune_handle")
    assert not model._forward_pre_hooks
    assert not any(layer._forward_pre_hooks for layer in model.model.language_model.layers)


def test_unknown_strategy_lists_the_known_ones(models):
    model = models("llava")
    with pytest.raises(UnknownStrategyError, match="known strategies: .*divprune.*random"):
        vtprune.prune(model, "divprnue", keep=4)
    assert_unpatched(model)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(), "needs a budget"),
        (dict(keep=4, keep_ratio=0.5), "exactly one"),
        (dict(keep=0), "positive int"),
        (dict(keep=2.5), "positive int"),
        (dict(keep_ratio=0.0), r"\(0, 1\]"),
        (dict(keep_ratio=1.5), r"\(0, 1\]"),
    ],
)
def test_budget_missing_or_out_of_range(models, kwargs, message):
    model = models("llava")
    with pytest.raises(BudgetError, match=message):
        vtprune.prune(model, "divprune", **kwargs)
    assert_unpatched(model)


def test_none_takes_no_budget(models):
    with pytest.raises(BudgetError, match="takes no budget"):
        vtprune.prune(models("llava"), "none", keep=4)


def test_keep_larger_than_the_image_keeps_all_with_a_warning(models, make_inputs):
    model = models("llava")
    inputs = make_inputs(model, "llava", 1)
    with torch.no_grad():
        expected = model(**inputs).logits
        with pytest.warns(BudgetWarning, match="keeping all"), vtprune.pruned(model, "divprune", keep=10_000):
            assert torch.equal(model(**inputs).logits, expected)


def test_unsupported_model_names_the_supported_ones():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(UnsupportedModelError, match="LlavaForConditionalGeneration.*Qwen3VLForConditionalGeneration"):
        vtprune.prune(model, "random", keep=2)


def test_pruning_an_already_pruned_model(models):
    model = models("qwen2_vl")
    with vtprune.pruned(model, "random", keep=2):
        with pytest.raises(AlreadyPrunedError, match="remove"):
            vtprune.prune(model, "divprune", keep=2)
        assert len(model._forward_pre_hooks) == 1  # the first wrapping is intact
    assert_unpatched(model)


@pytest.mark.parametrize(
    "spec, kwargs, message",
    [
        ("fastv", dict(keep_ratio=0.5, layer=4), r"layers 0\.\.3"),
        ("fastv", dict(keep_ratio=0.5, layer=0), "layer >= 1"),
        ("fastv", dict(keep_ratio=0.5), "inside the decoder"),
        ("divprune", dict(keep_ratio=0.5, layer=-1), ">= 0"),
        ("divprune@9:50%", dict(), r"layers 0\.\.3"),
        ("fastv@2:50%+random@2:50%", dict(), "same layer"),
    ],
)
def test_layer_errors(models, spec, kwargs, message):
    model = models("llava")
    with pytest.raises(LayerError, match=message):
        vtprune.prune(model, spec, **kwargs)
    assert_unpatched(model)


def test_static_cache_is_refused(models, make_inputs):
    model = models("llava")
    inputs = make_inputs(model, "llava", 1)
    with vtprune.pruned(model, "divprune", keep=4), pytest.raises(UnsupportedCacheError, match="DynamicCache"):
        model.generate(**inputs, max_new_tokens=2, cache_implementation="static")
    cache = StaticCache(config=model.config.text_config, max_cache_len=64)
    with vtprune.pruned(model, "divprune", keep=4), pytest.raises(UnsupportedCacheError, match="StaticCache"):
        model(**inputs, **{CACHE_KWARG: cache})
    assert_unpatched(model)


def test_continuing_generation_from_a_pruned_cache_is_refused(models, make_inputs):
    model = models("llava")
    inputs = make_inputs(model, "llava", 1)
    with torch.no_grad(), vtprune.pruned(model, "divprune", keep=4):
        out = model.generate(**inputs, max_new_tokens=2, return_dict_in_generate=True)
        follow_up = torch.cat([out.sequences, out.sequences[:, -3:]], dim=1)
        with pytest.raises(UnsupportedCacheError, match="fresh generate"):
            model.generate(
                input_ids=follow_up,
                attention_mask=torch.ones_like(follow_up),
                **{CACHE_KWARG: output_cache(out)},
                max_new_tokens=2,
            )


def test_images_on_top_of_an_existing_cache_are_refused(models, make_inputs):
    model = models("llava")
    inputs = make_inputs(model, "llava", 1)
    with torch.no_grad():
        prefix = output_cache(model(input_ids=inputs["input_ids"][:, :2], use_cache=True))
        with vtprune.pruned(model, "divprune", keep=4), pytest.raises(UnsupportedCacheError, match="existing cache"):
            model(**inputs, **{CACHE_KWARG: prefix})


def test_inputs_embeds_are_refused(models, make_inputs):
    model = models("llava")
    inputs = make_inputs(model, "llava", 1)
    embeds = model.get_input_embeddings()(inputs.pop("input_ids"))
    with vtprune.pruned(model, "divprune", keep=4), pytest.raises(vtprune.VTPruneError, match="input_ids"):
        model(inputs_embeds=embeds, **inputs)


def test_a_broken_user_strategy_fails_loudly(models, make_inputs):
    @vtprune.register_strategy("test_broken_duplicates", overwrite=True)
    class Broken(vtprune.Strategy):
        def select(self, ctx):
            return torch.zeros(ctx.keep, dtype=torch.long)

    model = models("llava")
    inputs = make_inputs(model, "llava", 1)
    with vtprune.pruned(model, "test_broken_duplicates", keep=3), pytest.raises(vtprune.VTPruneError, match="unique"):
        model(**inputs)
    assert_unpatched(model)


def test_bad_schedule_strings():
    with pytest.raises(ValueError, match="cannot parse"):
        vtprune.parse_schedule("divprune::64")
    with pytest.raises(ValueError, match="key:value"):
        vtprune.parse_schedule("random:4(seed)")
    with pytest.raises(ValueError, match="only one stage before the LLM"):
        vtprune.parse_schedule("divprune:4+random:2")
