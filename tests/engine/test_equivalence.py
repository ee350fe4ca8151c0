"""Pruning inside every supported transformers class (every family of the registry): keep-all is bit-identical,
real pruning equals masking; what a family cannot run it refuses loudly."""

import pytest
import torch
from conftest import refuses
from reference import final_keep, kept_logits, reference

import vtprune
from vtprune.testing import MODEL_KINDS
from vtprune.vocabulary.compat import CACHE_KWARG, output_cache

GEN = {"max_new_tokens": 4, "do_sample": False}

# Input stage, decoder stage, and both (keep-all forms of each, then real pruning).
KEEP_ALL = ["none", "divprune:100%", "fastv@2:100%", "random:100%+random@2:100%"]
PRUNING = ["divprune:40%", "random:3", "uniform:50%", "fastv@2:50%", "divprune@1:40%", "divprune:60%+random@2:50%"]


@pytest.mark.parametrize("kind", MODEL_KINDS)
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("schedule", KEEP_ALL)
def test_keep_all_is_bit_identical(models, make_inputs, kind, rows, schedule):
    model = models(kind)
    if refuses(model, schedule):
        return
    inputs = make_inputs(model, kind, rows)
    with torch.no_grad():
        logits = model(**inputs).logits
        tokens = model.generate(**inputs, **GEN)
        with vtprune.pruned(model, schedule) as handle:
            pruned_logits = model(**inputs).logits
            pruned_tokens = model.generate(**inputs, **GEN)
    assert torch.equal(logits, pruned_logits)
    assert torch.equal(tokens, pruned_tokens)
    record = handle.last_record
    assert record.images  # the probe below ran
    assert all(image.kept.numel() == image.num_tokens for image in record.images)


@pytest.mark.parametrize("kind", MODEL_KINDS)
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("schedule", PRUNING)
def test_pruning_equals_masking_reference(models, make_inputs, kind, rows, schedule):
    model = models(kind)
    if refuses(model, schedule):
        return
    inputs = make_inputs(model, kind, rows)
    with torch.no_grad(), vtprune.pruned(model, schedule) as handle:
        pruned_logits = model(**inputs).logits
        record = handle.last_record
        pruned_tokens = model.generate(**inputs, **GEN)
    assert handle.last_record.visual_tokens() == record.visual_tokens()
    totals = record.visual_tokens()
    assert list(totals.values())[-1] < totals["before"], "the schedule must actually prune something"
    keep = final_keep(inputs, record)
    for expected, got in kept_logits(reference(model, inputs, record), keep, pruned_logits):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    if kind == "qwen3_vl" and "@" in schedule:
        return  # the reference decodes without a cache, which Qwen3-VL's generate() does not support
    assert torch.equal(pruned_tokens, reference(model, inputs, record, generate_tokens=GEN["max_new_tokens"]))


@pytest.mark.parametrize("kind", ["llava", "llava_next", "llava_onevision"])
def test_renumbered_positions_equal_the_renumbered_reference(models, make_inputs, kind):
    model = models(kind)
    inputs = make_inputs(model, kind, 3)
    with torch.no_grad(), vtprune.pruned(model, "divprune:40%", renumber=True) as handle:
        pruned_logits = model(**inputs).logits
        record = handle.last_record
        pruned_tokens = model.generate(**inputs, **GEN)
    keep = final_keep(inputs, record)
    for expected, got in kept_logits(reference(model, inputs, record, renumber=True), keep, pruned_logits):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    expected_tokens = reference(model, inputs, record, generate_tokens=GEN["max_new_tokens"], renumber=True)
    assert torch.equal(pruned_tokens, expected_tokens)


def test_renumbering_m_rope_is_refused(models):
    with pytest.raises(vtprune.VTPruneError, match="M-RoPE"):
        vtprune.prune(models("qwen2_vl"), "divprune", keep=2, renumber=True)


@pytest.mark.parametrize("kind", ["llava", "qwen3_vl"])
def test_kept_tokens_keep_original_positions(models, make_inputs, kind):
    """The text model receives each kept token's original position id (1-D or M-RoPE)."""
    model = models(kind)
    inputs = make_inputs(model, kind, 3)
    seen = {}

    def capture(module, args, kwargs):
        seen.setdefault("position_ids", kwargs["position_ids"])

    hook = model.model.language_model.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad(), vtprune.pruned(model, "divprune:50%") as handle:
            model(**inputs)
    finally:
        hook.remove()
    keep = final_keep(inputs, handle.last_record)
    from reference import original_positions

    full = original_positions(model, inputs)
    if full is None:
        full = torch.arange(inputs["input_ids"].shape[1]).expand_as(inputs["input_ids"])
    got = seen["position_ids"]
    for row in range(keep.shape[0]):
        n = int(keep[row].sum())
        torch.testing.assert_close(got[..., row, -n:], full[..., row, keep[row]])


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_beam_search_and_return_sequences(models, make_inputs, kind):
    model = models(kind)
    inputs = make_inputs(model, kind, 3)
    schedule = "divprune:50%" if refuses(model, "divprune:50%+fastv@2:50%") else "divprune:50%+fastv@2:50%"
    for options in ({"num_beams": 2}, {"num_return_sequences": 2, "num_beams": 2}):
        with torch.no_grad():
            expected = model.generate(**inputs, max_new_tokens=3, do_sample=False, **options)
            with vtprune.pruned(model, "none"):
                assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False, **options), expected)
            with vtprune.pruned(model, schedule) as handle:
                out = model.generate(**inputs, max_new_tokens=3, do_sample=False, **options)
        assert out.shape[0] == expected.shape[0]
        # Beams of one sample saw the same prompt, so they kept the same tokens.
        per_row = {row: [im.kept.tolist() for im in handle.last_record.for_row(row)] for row in range(out.shape[0])}
        assert per_row[0] == per_row[1]


@pytest.mark.parametrize("kind", ["llava_next", "qwen2_5_vl"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_and_keep_all_is_identical(models, make_inputs, kind, dtype):
    model = models(kind).to(dtype)
    try:
        inputs = make_inputs(model, kind, 3)
        inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        with torch.no_grad():
            expected = model.generate(**inputs, **GEN)
            with vtprune.pruned(model, "none+fastv@2:100%"):
                assert torch.equal(model.generate(**inputs, **GEN), expected)
            with vtprune.pruned(model, "divprune:50%+fastv@2:50%") as handle:
                model.generate(**inputs, **GEN)
        assert handle.last_record.visual_tokens()["layer 2"] < handle.last_record.visual_tokens()["before"]
    finally:
        model.to(torch.float32)


@pytest.mark.parametrize("kind", ["llava", "qwen2_vl"])
def test_eager_attention_matches_reference(models, make_inputs, kind):
    model = models(kind, attn_implementation="eager")
    inputs = make_inputs(model, kind, 3)
    with torch.no_grad(), vtprune.pruned(model, "fastv@2:50%") as handle:
        pruned_logits = model(**inputs).logits
    record = handle.last_record
    for expected, got in kept_logits(reference(model, inputs, record), final_keep(inputs, record), pruned_logits):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_fastv_attention_equals_eager_attention_weights(models, make_inputs):
    """The SDPA-side recomputation of the last token's attention matches eager attention's own weights."""
    from vtprune.engine.attention import last_token_attention

    model = models("qwen3_vl", attn_implementation="eager")
    inputs = make_inputs(model, "qwen3_vl", 3)
    layer = model.model.language_model.layers[1]
    captured = {}

    def capture(module, args, kwargs, output):
        captured["weights"] = output[1]
        captured["ours"] = last_token_attention(
            module, kwargs["hidden_states"], kwargs["position_embeddings"], inputs["attention_mask"].bool()
        )

    hook = layer.self_attn.register_forward_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs, output_attentions=True)
    finally:
        hook.remove()
    eager = captured["weights"][:, :, -1].float().mean(dim=1)
    torch.testing.assert_close(captured["ours"], eager, atol=1e-6, rtol=0)


def test_remove_restores_the_model_exactly(models, make_inputs):
    model = models("qwen3_vl")
    inputs = make_inputs(model, "qwen3_vl", 3)
    with torch.no_grad():
        expected = model(**inputs).logits
        handle = vtprune.prune(model, "divprune:50%+fastv@1:50%")
        assert model(**inputs).logits.shape[1] < expected.shape[1]
        model.generate(**inputs, **GEN)
        handle.remove()
        assert torch.equal(model(**inputs).logits, expected)
    text_model = model.model.language_model
    assert "_deepstack_process" not in vars(text_model)
    assert not model._forward_pre_hooks and not any(layer._forward_pre_hooks for layer in text_model.layers)
    assert not hasattr(model, "_vtprune_handle")
    vtprune.prune(model, "random:2").remove()  # can be wrapped again


def test_use_cache_false_and_a_hand_written_decode_loop(models, make_inputs):
    model = models("llava_next")
    inputs = make_inputs(model, "llava_next", 3)
    # Without a cache every step is a new prefill; attention-based stages would re-score on the newest
    # token, so this uses selections that depend on the prompt only.
    with torch.no_grad(), vtprune.pruned(model, "divprune:40%+random@2:50%"):
        cached = model.generate(**inputs, **GEN)
        uncached = model.generate(**inputs, **GEN, use_cache=False)
        assert torch.equal(cached, uncached)
        # The loops pass only new ids and the growing original-length mask, as a user would; one passes
        # positions numbered like generate() does, one leaves them to vtprune.
        for pass_positions in (True, False):
            out = model(**inputs, position_ids=(inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0), use_cache=True)
            cache, mask, ids = output_cache(out), inputs["attention_mask"], inputs["input_ids"]
            positions = mask.cumsum(-1)[:, -1:] - 1
            for step in range(GEN["max_new_tokens"]):
                next_token = out.logits[:, -1].argmax(-1, keepdim=True)
                ids = torch.cat([ids, next_token], dim=1)
                mask = torch.cat([mask, torch.ones_like(next_token)], dim=1)
                positions = positions + 1
                out = model(
                    input_ids=next_token,
                    attention_mask=mask,
                    position_ids=positions if pass_positions else None,
                    **{CACHE_KWARG: cache},
                )
            assert torch.equal(ids, cached)


# Every registered strategy, where it acts, with a budget that prunes; inputs it cannot get raise clearly.
EVERY_STRATEGY = {
    "random": "random:50%",
    "uniform": "uniform:50%",
    "divprune": "divprune:50%",
    "fastv": "fastv@2:50%",
    "todre": "todre:50%+todre_relevance@3(tau:1.0)",
    "mmtok": "mmtok:50%",
    "zoo": "zoo:50%(directions:4)",
    "random_deep": "random_deep:50%",
    "cdpruner": "cdpruner:50%",
}
UNAVAILABLE = {("zoo", "llava_onevision")}  # its test batch has a video: frames are pooled after the projector


@pytest.mark.parametrize("kind", MODEL_KINDS)
@pytest.mark.parametrize("name", sorted(EVERY_STRATEGY))
def test_every_strategy_on_every_class(models, make_inputs, kind, name):
    model = models(kind)
    inputs = make_inputs(model, kind, 3)
    schedule = EVERY_STRATEGY[name]
    if refuses(model, schedule):
        return
    if (name, kind) in UNAVAILABLE:
        with vtprune.pruned(model, schedule), pytest.raises(ValueError, match="not a projector output"):
            model(**inputs)
        return
    keep_all = schedule.split("+")[0].replace("50%", "100%").replace("(tau:1.0)", "")
    with torch.no_grad():
        expected = model(**inputs).logits
        with vtprune.pruned(model, keep_all):
            assert torch.equal(model(**inputs).logits, expected)
        with vtprune.pruned(model, schedule) as handle:
            pruned_logits = model(**inputs).logits
            tokens = model.generate(**inputs, **GEN)
    record = handle.last_record
    assert list(record.visual_tokens().values())[-1] < record.visual_tokens()["before"]
    for want, got in kept_logits(reference(model, inputs, record), final_keep(inputs, record), pruned_logits):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert tokens.shape[0] == inputs["input_ids"].shape[0]
