"""Zeroth-order sensitivity: finite differences through the projector, then sensitivity x diversity."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vtprune
from vtprune.strategies import ZOOPrune
from vtprune.strategies.base import TokenContext
from vtprune.strategies.diversity import cosine_similarities


def context(n: int, seed: int, keep: int) -> TokenContext:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(6, 5, generator=generator)
    pre = torch.randn(n, 6, generator=generator)

    def projector(rows):
        return torch.tanh(rows @ weight)

    return TokenContext(features=projector(pre), keep=keep, seed=seed, pre_features=pre, projector=projector)


def test_sensitivity_is_the_central_difference_averaged_over_directions():
    ctx = context(7, 0, 3)
    zoo = ZOOPrune(directions=5, step=1e-3, chunk=2)
    got = zoo.sensitivity(ctx)
    generator = ctx.generator()
    directions = torch.randn(5, 6, generator=generator)
    directions = directions / directions.norm(dim=1, keepdim=True)
    expected = torch.zeros(7)
    for i in range(7):
        for u in directions:
            plus, minus = ctx.projector(ctx.pre_features[i] + 1e-3 * u), ctx.projector(ctx.pre_features[i] - 1e-3 * u)
            expected[i] += (plus - minus).norm() / 2e-3 / 5
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 30), seed=st.integers(0, 1000), data=st.data())
def test_greedy_follows_the_product_rule(n, seed, data):
    keep = data.draw(st.integers(1, n))
    ctx = context(n, seed, keep)
    zoo = ZOOPrune(directions=4)
    order = zoo.order(ctx)
    assert len(set(order.tolist())) == keep
    score = zoo.sensitivity(ctx).double()
    score = (score - score.min()) / (score.max() - score.min())
    similarity = cosine_similarities(ctx.features)
    assert order[0] == int(score.argmax())
    for step in range(1, keep):
        chosen = order[:step]
        value = score * (1 - similarity[:, chosen].max(dim=1).values)
        value[chosen] = -torch.inf
        assert value[order[step]] >= value.max() - 1e-12
    assert torch.equal(zoo.select(ctx), zoo.select(ctx))  # directions come from the per-image seed
    assert torch.equal(zoo.order(context(n, seed, n))[:keep], order)  # nested


def test_low_rank_directions_and_bad_options():
    ctx = context(12, 3, 4)
    assert ZOOPrune(directions=6, rank=2).select(ctx).numel() == 4
    with pytest.raises(ValueError):
        ZOOPrune(directions=0)
    with pytest.raises(ValueError, match="pre-projector"):
        ZOOPrune().select(TokenContext(features=torch.randn(5, 3), keep=2))


@pytest.mark.parametrize("kind", ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_zoo_runs_through_the_models_own_projector(models, make_inputs, kind):
    model = models(kind)
    inputs = make_inputs(model, kind, 3)
    with torch.no_grad(), vtprune.pruned(model, "zoo:50%(directions:8)") as handle:
        model.generate(**inputs, max_new_tokens=2)
    totals = handle.last_record.visual_tokens()
    assert totals["input"] < totals["before"]


def test_zoo_says_where_it_cannot_run(models, make_inputs):
    model = models("llava_onevision")  # the batch has a video, whose frames OneVision pools after the projector
    with vtprune.pruned(model, "zoo:50%"), pytest.raises(ValueError, match="not a projector output"):
        model(**make_inputs(model, "llava_onevision", 3))


def test_perturbed_passes_bypass_hooks_on_the_projector(models):
    # vtprune records what the projector reads with a hook on it; zoo's 2·m perturbed passes must not
    # land there (on a float32 model the selection projector is the model's own module).
    model = models("llava")
    adapter = vtprune.adapters.adapter_for(model)
    calls = []
    hook = adapter.projector_module().register_forward_hook(lambda *args: calls.append(1))
    try:
        width = model.config.vision_config.hidden_size
        adapter.projector()(torch.randn(3, width))
    finally:
        hook.remove()
    assert calls == []
