"""Bad input gets a clear error that says what to do, and never leaves the model half-patched."""

import re

import pytest
import torch
from conftest import STRATEGIES
from contexts import full_inputs
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
from vtprune.engine.selection import select_tokens
from vtprune.errors import InputError, RegistrationError, ScheduleError, StrategyOutputError
from vtprune.schedule import Budget, BudgetWarning, parse_strategy
from vtprune.strategies import Matryoshka, TokenContext
from vtprune.strategies.registry import make_strategy
from vtprune.vocabulary.compat import CACHE_KWARG, output_cache


def required_inputs(name: str) -> frozenset[str]:
    strategy = make_strategy(name)
    return strategy.needs - strategy.optional_needs


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
        (dict(keep_ratio=float("nan")), r"\(0, 1\]"),
        (dict(keep_ratio=True), r"\(0, 1\].*got True"),
        (dict(keep_ratio="25%"), r"\(0, 1\].*got '25%'"),
        (dict(keep=True), "positive int"),
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


@pytest.mark.parametrize(
    "text, message",
    [
        ("divprune::64", "cannot parse"),
        ("random:4(seed)", "key:value"),
        ("random:4(seed:1;seed:2)", "given twice"),
        ("divprune:4+random:2", "only one stage before the LLM"),
        ("divprune:.", r"budget '\.' is not a token count"),
        ("divprune:1.2.5", r"budget '1\.2\.5' is not"),
        ("", "cannot parse"),
    ],
)
def test_bad_schedule_strings(text, message):
    with pytest.raises(ScheduleError, match=message) as info:
        vtprune.parse_schedule(text)
    assert isinstance(info.value, ValueError) and isinstance(info.value, vtprune.VTPruneError)


def test_a_bad_budget_string_is_refused_before_the_model_is_touched(models):
    model = models("llava")
    with pytest.raises(ScheduleError, match="budget"):
        vtprune.prune(model, "divprune:.")
    assert_unpatched(model)


# --- vtprune.select and its siblings on plain tensors ---------------------------------------------------------


@pytest.mark.parametrize("call", ["select", "scores", "select_nested"])
@pytest.mark.parametrize("shape", [(1, 12, 4), (2, 12, 4), (12,), (12, 4, 1)])
def test_select_refuses_anything_but_one_images_tokens(call, shape):
    features = torch.randn(shape)
    run = {
        "select": lambda: vtprune.select("divprune", features, keep=3),
        "scores": lambda: vtprune.scores("divprune", features),
        "select_nested": lambda: vtprune.select_nested("divprune", features, [3]),
    }[call]
    with pytest.raises(InputError, match=rf"\(N, D\) tensor, got shape {re.escape(str(tuple(shape)))}"):
        run()


def test_select_refuses_a_list_of_tokens():
    with pytest.raises(InputError, match="got list"):
        vtprune.select("divprune", [[0.0, 1.0], [1.0, 0.0]], keep=1)


@pytest.mark.parametrize(
    "strategy, name, value",
    [
        ("fastv", "attention", torch.rand(11)),
        ("fastv", "attention", torch.rand(12, 1)),
        ("todre", "cls_attention", torch.rand(13)),
        ("mmtok", "pre_features", torch.randn(11, 3)),
        ("mmtok", "text_embeds", torch.randn(3, 5)),
        ("random", "newline", torch.zeros(11, dtype=torch.bool)),
        ("todre_relevance", "cross_shares", torch.rand(3)),
    ],
)
def test_select_refuses_inputs_that_do_not_fit_the_tokens(strategy, name, value):
    budget = {} if strategy == "todre_relevance" else {"keep": 3}
    with pytest.raises(InputError, match=rf"^{name} must be .* for N=12, D=4; got shape"):
        vtprune.select(strategy, torch.randn(12, 4), **budget, **{name: value})


REQUIRED = [(name, need) for name in STRATEGIES for need in sorted(required_inputs(name))]


def test_some_strategies_require_inputs():
    assert {("fastv", "attention"), ("zoo", "projector"), ("zoo", "pre_features")} <= set(REQUIRED)


@pytest.mark.parametrize(("strategy", "need"), REQUIRED)
def test_select_names_a_missing_input(strategy, need):
    inputs = full_inputs(16, 5, 0)
    features = inputs.pop("features")
    del inputs[need]
    budget = {"keep": 3} if make_strategy(strategy).needs_budget else {}
    with pytest.raises(InputError, match=rf"strategy '{strategy}' needs .*{need}.*: pass .*{need}="):
        vtprune.select(strategy, features, **budget, **inputs)


def test_matryoshka_without_a_grid_says_to_pass_one():
    with pytest.raises(InputError, match=r"pass grid=\(t, h, w\)"):
        vtprune.select("matryoshka", torch.randn(16, 4), keep=4)


def test_select_rounds_matryoshka_as_documented():
    features = torch.randn(16, 4)
    kept = vtprune.select("matryoshka", features, keep=3, grid=(1, 4, 4))
    # 3 rounds to the nearest pooling scale of a 4 x 4 grid (1, 4, 16): four 2 x 2 windows, at their top-left tokens.
    assert kept.tolist() == [0, 2, 8, 10]
    assert torch.equal(kept, Matryoshka().merge(TokenContext(features, 3, grid=(1, 4, 4)))[0])


@pytest.mark.parametrize("strategy", ["divprune", "random", "fastv", "mmtok"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_tokens_are_refused_naming_the_image(strategy, bad):
    inputs = full_inputs(16, 5, 0)
    features = inputs.pop("features")
    features[3, 1] = bad
    with pytest.raises(InputError, match=r"features of image 0 contain NaN or inf \(rows \[3\]\)"):
        vtprune.select(strategy, features, keep=4, **inputs)
    if strategy in ("divprune", "mmtok"):
        with pytest.raises(InputError, match="NaN or inf"):
            vtprune.select_nested(strategy, features, [4], **inputs)
        with pytest.raises(InputError, match="NaN or inf"):
            vtprune.scores(strategy, features, **inputs)


def test_non_finite_inputs_are_refused_in_a_batch_naming_the_image():
    good, bad = torch.randn(8, 4), torch.randn(8, 4)
    bad[5] = float("nan")
    images = [TokenContext(features=good, keep=8), TokenContext(features=bad, keep=8)]
    with pytest.raises(InputError, match="features of image 1 contain NaN"):
        select_tokens(make_strategy("divprune"), Budget(keep=3), images)
    attention = torch.rand(8)
    attention[0] = float("inf")
    with pytest.raises(InputError, match="attention of image 0"):
        vtprune.select("fastv", good, keep=3, attention=attention)


@pytest.mark.parametrize(
    "returned, message",
    [
        (lambda ctx: list(range(ctx.keep)), "1-D integer tensor of indices, got list"),
        (lambda ctx: None, "1-D integer tensor of indices, got NoneType"),
        (lambda ctx: torch.arange(ctx.keep).float(), "got torch.float32"),
    ],
)
def test_a_user_strategy_returning_the_wrong_type_fails_loudly(isolated_registry, returned, message):
    @vtprune.register_strategy("test_wrong_type")
    class WrongType(vtprune.Strategy):
        def select(self, ctx):
            return returned(ctx)

    with pytest.raises(StrategyOutputError, match=message):
        vtprune.select("test_wrong_type", torch.randn(10, 3), keep=3)


def test_a_user_select_batch_returning_none_fails_loudly(isolated_registry):
    @vtprune.register_strategy("test_batch_none")
    class BatchNone(vtprune.Strategy):
        def select_batch(self, contexts):
            return None

    with pytest.raises(StrategyOutputError, match="returned NoneType for 1 images; select_batch must return a list"):
        vtprune.select("test_batch_none", torch.randn(10, 3), keep=3)


# --- the registry --------------------------------------------------------------------------------------------


def test_a_class_registered_under_two_names_reports_the_name_it_was_used_under(isolated_registry, models, make_inputs):
    class FirstK(vtprune.Strategy):
        def select(self, ctx):
            return torch.arange(ctx.keep)

    vtprune.register_strategy("test_alias_a")(FirstK)
    vtprune.register_strategy("test_alias_b")(FirstK)
    assert make_strategy("test_alias_a").name == "test_alias_a"
    assert make_strategy("test_alias_b").name == "test_alias_b"
    assert str(vtprune.make_stage("test_alias_a", keep=2)) == "test_alias_a:2"
    model = models("llava")
    with torch.no_grad(), vtprune.pruned(model, "test_alias_a", keep=3) as handle:
        model(**make_inputs(model, "llava", 1))
    assert handle.last_record.schedule == "test_alias_a:3"


@pytest.mark.parametrize("name", ["a+b", "x:y", "", "a b", "f(x)", "v@2", "1st", "a;b", "é", 3])
def test_register_refuses_names_the_schedule_grammar_cannot_parse(isolated_registry, name):
    with pytest.raises(RegistrationError, match="cannot be written in a schedule string"):
        vtprune.register_strategy(name)


def test_register_refuses_needs_that_are_not_context_fields(isolated_registry):
    class NeedsTypo(vtprune.Strategy):
        needs = frozenset({"attention", "atention"})

    with pytest.raises(RegistrationError, match=r"needs \['atention'\], which are not TokenContext fields"):
        vtprune.register_strategy("test_needs_typo")(NeedsTypo)
    assert "test_needs_typo" not in vtprune.list_strategies()


@pytest.mark.parametrize("name", STRATEGIES)
def test_registered_names_parse_back(name):
    assert parse_strategy(name).name == name
