"""MMTok: the authors' reference outputs (tests/data/parity), the greedy's properties, variants and fallbacks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from parity import DATA, parity_cases

from vtprune.strategies.base import TokenContext
from vtprune.strategies import coverage as coverage_loops
from vtprune.strategies.coverage import coverage_order, dense_coverage_order, incremental_coverage_order
from vtprune.strategies.mmtok import VARIANTS, MMTok
from vtprune.strategies.registry import make_strategy

CASES = parity_cases("mmtok")

# Few examples and small sizes: the machine is shared and every property is cheap to falsify.
fast = settings(max_examples=25, deadline=None)


def coverage(weights: torch.Tensor, kept: list[int]) -> float:
    """MMTok's objective f(S): the sum over the weight rows of their maximum over the kept columns."""
    return float(weights[:, kept].max(dim=1).values.sum()) if kept else 0.0


def random_context(
    seed: int, n: int, keep: int, words: int | None = 4, dim: int = 8, clip_dim: int = 6
) -> TokenContext:
    """Clustered tokens (so coverage has structure), their pre-projector features and ``words`` question rows."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(max(1, n // 6), dim, generator=gen)
    features = centres[torch.randint(len(centres), (n,), generator=gen)] + 0.3 * torch.randn(n, dim, generator=gen)
    pre = features @ torch.randn(dim, clip_dim, generator=gen) + 0.1 * torch.randn(n, clip_dim, generator=gen)
    text = None if words is None else torch.randn(words, dim, generator=gen)
    return TokenContext(features=features, keep=keep, text_embeds=text, pre_features=pre)


def assert_valid_selection(kept: torch.Tensor, n: int, keep: int) -> None:
    assert kept.dtype == torch.int64 and kept.shape == (keep,)
    assert int(kept.min()) >= 0 and int(kept.max()) < n
    assert bool((kept[1:] > kept[:-1]).all()), f"not strictly ascending: {kept.tolist()}"


# --- parity -----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_mmtok_matches_reference(case: dict, arrays: np.lib.npyio.NpzFile) -> None:
    inputs = {name: torch.from_numpy(arrays[key]) for name, key in case["inputs"].items()}
    ctx = TokenContext(
        features=inputs["vis_proj"], keep=case["k"], text_embeds=inputs["text"], pre_features=inputs["vis_clip"]
    )
    # tv_temp is the text-vision temperature, vv_temp the vision-vision one (parity README).
    strategy = MMTok(alpha=case["alpha"], text_temp=case["tv_temp"], vision_temp=case["vv_temp"])
    kept = strategy.select(ctx).tolist()
    weights = strategy.coverage_weights(ctx)
    # The README's rule: if the sets differ, the lower coverage is the wrong one.
    assert kept == case["kept_sorted"], (
        f"coverage: ours {coverage(weights, kept):.9g}, reference {coverage(weights, case['kept_sorted']):.9g}"
    )


def test_mmtok_cases_exist() -> None:
    # An empty parametrize list would skip silently; make a missing or renamed data file fail.
    assert CASES, f"no mmtok cases in {DATA / 'parity.json'}"


# --- contract and properties ------------------------------------------------------------------


@fast
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(1, 40),
    words=st.one_of(st.none(), st.integers(0, 6)),
    variant=st.sampled_from(VARIANTS),
    data=st.data(),
)
def test_selection_contract_determinism_and_nesting(
    seed: int, n: int, words: int | None, variant: str, data: st.DataObject
) -> None:
    big = data.draw(st.integers(1, n), label="big")
    small = data.draw(st.integers(1, big), label="small")
    strategy = MMTok(variant=variant)
    ctx = random_context(seed, n, big, words)
    kept = strategy.select(ctx)
    assert_valid_selection(kept, n, big)
    assert torch.equal(kept, strategy.select(random_context(seed, n, big, words)))
    order = strategy.order(ctx)
    assert torch.equal(order.sort().values, kept)
    small_order = strategy.order(random_context(seed, n, small, words))
    assert torch.equal(small_order, order[:small]), "keep sets for smaller budgets must be prefixes"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_gains_shrink_and_beat_random_sets(variant: str, seed: int) -> None:
    strategy = MMTok(variant=variant)
    ctx = random_context(seed, n=96, keep=24, words=5, dim=16, clip_dim=12)
    weights = strategy.coverage_weights(ctx)
    order = strategy.order(ctx).tolist()
    values = [coverage(weights, order[:t]) for t in range(len(order) + 1)]
    gains = np.diff(values)
    assert (gains >= -1e-6).all(), "the objective must not decrease along the greedy order"
    # Submodularity: the greedy's marginal gains never grow.
    assert (np.diff(gains) <= 1e-6).all(), gains
    gen = torch.Generator().manual_seed(100 + seed)
    for _ in range(20):
        random_set = torch.randperm(ctx.num_tokens, generator=gen)[: ctx.keep].tolist()
        assert values[-1] >= coverage(weights, random_set)


def test_objective_weights_follow_the_formula() -> None:
    ctx = random_context(3, n=12, keep=4, words=3)
    alpha, tau_t, tau_v = 0.7, 0.05, 0.3

    def softmax_cos(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
        cos = torch.nn.functional.cosine_similarity(a[:, None], b[None], dim=2)
        return torch.softmax(cos / tau, dim=1)

    p = softmax_cos(ctx.text_embeds, ctx.features, tau_t)
    q = softmax_cos(ctx.pre_features, ctx.pre_features, tau_v)
    expected = torch.cat([p / 3, alpha * q / 12])
    weights = MMTok(alpha=alpha, text_temp=tau_t, vision_temp=tau_v).coverage_weights(ctx)
    torch.testing.assert_close(weights, expected)
    torch.testing.assert_close(MMTok(variant="text", text_temp=tau_t).coverage_weights(ctx), p / 3)
    torch.testing.assert_close(MMTok(variant="vision", vision_temp=tau_v).coverage_weights(ctx), q / 12)


LOOPS = {"dense": dense_coverage_order, "incremental": incremental_coverage_order}


@pytest.mark.parametrize("loop", LOOPS)
@fast
@given(seed=st.integers(0, 2**16), rows=st.integers(1, 8), n=st.integers(1, 12), data=st.data())
def test_coverage_order_is_the_textbook_greedy(loop: str, seed: int, rows: int, n: int, data: st.DataObject) -> None:
    count = data.draw(st.integers(1, n), label="count")
    weights = torch.rand(rows, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    picks: list[int] = []
    for _ in range(count):
        # Re-evaluate f(S + j) from scratch; the first best candidate wins ties.
        values = [coverage(weights, picks + [j]) if j not in picks else -np.inf for j in range(n)]
        picks.append(int(np.argmax(values)))
    assert LOOPS[loop](weights, count).tolist() == picks


@pytest.mark.parametrize("loop", LOOPS)
def test_ties_and_zero_gains_never_repeat_a_token(loop: str) -> None:
    # Every column identical: all gains tie at the first step and are 0 afterwards.
    assert LOOPS[loop](torch.ones(3, 5), 5).tolist() == [0, 1, 2, 3, 4]
    # Identical tokens (and no question words): the same through the strategy.
    ctx = TokenContext(features=torch.ones(8, 4), keep=8, pre_features=torch.ones(8, 3))
    assert MMTok().order(ctx).tolist() == list(range(8))


def test_both_loops_pick_alike_and_exact_duplicates_go_to_the_lower_index() -> None:
    # Real coverage weights of 150 tokens (8 question words), every fifth token from 75 on a copy of the one 75
    # places before it: copies and originals sit at many positions of a row's vectorised body and tail.
    ctx = random_context(11, n=150, keep=150, words=8, dim=32, clip_dim=24)
    copies = torch.arange(75, 150, 5)
    features, pre = ctx.features.clone(), ctx.pre_features.clone()
    features[copies], pre[copies] = features[copies - 75], pre[copies - 75]
    weights = MMTok().coverage_weights(TokenContext(features, 150, text_embeds=ctx.text_embeds, pre_features=pre))
    dense, incremental = dense_coverage_order(weights, 150), incremental_coverage_order(weights, 150)
    assert torch.equal(dense[:60], incremental[:60])
    position = {int(token): step for step, token in enumerate(incremental)}
    assert all(position[int(c) - 75] < position[int(c)] for c in copies)
    assert sorted(incremental.tolist()) == list(range(150))


def test_coverage_order_takes_the_incremental_loop_on_a_cpu_for_each_matrix_of_a_group(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    weights = MMTok().coverage_weights(random_context(12, n=40, keep=40, words=3))
    group = torch.stack([weights, weights.flip(-1)])
    seen: list[torch.Tensor] = []

    def spy(matrix: torch.Tensor, count: int) -> torch.Tensor:
        seen.append(matrix)
        return incremental_coverage_order(matrix, count)

    monkeypatch.setattr(coverage_loops, "incremental_coverage_order", spy)
    monkeypatch.setattr(coverage_loops, "dense_coverage_order", None)  # not called on a CPU
    order = coverage_order(group, 12)
    assert len(seen) == 2 and all(torch.equal(a, b) for a, b in zip(seen, group))
    assert torch.equal(order, torch.stack([incremental_coverage_order(w, 12) for w in group]))


# --- variants and fallbacks -------------------------------------------------------------------


def test_without_question_words_the_vision_term_decides() -> None:
    vision = MMTok(variant="vision").select(random_context(5, n=30, keep=7))
    for variant in ("multimodal", "text"):
        for words in (None, 0):
            ctx = random_context(5, n=30, keep=7, words=words)
            assert torch.equal(MMTok(variant=variant).select(ctx), vision), (variant, words)


def test_without_pre_features_the_tokens_are_the_vision_features() -> None:
    ctx = random_context(6, n=30, keep=7)
    ctx_without = TokenContext(features=ctx.features, keep=ctx.keep, text_embeds=ctx.text_embeds)
    ctx_tokens = TokenContext(ctx.features, ctx.keep, text_embeds=ctx.text_embeds, pre_features=ctx.features)
    assert torch.equal(MMTok().select(ctx_without), MMTok().select(ctx_tokens))


def test_variants_read_only_their_inputs() -> None:
    base = random_context(7, n=30, keep=7)
    other_text = random_context(8, n=30, keep=7).text_embeds
    other_pre = random_context(9, n=30, keep=7).pre_features
    swapped_text = TokenContext(base.features, base.keep, text_embeds=other_text, pre_features=base.pre_features)
    swapped_pre = TokenContext(base.features, base.keep, text_embeds=base.text_embeds, pre_features=other_pre)
    assert torch.equal(MMTok(variant="vision").select(base), MMTok(variant="vision").select(swapped_text))
    assert torch.equal(MMTok(variant="text").select(base), MMTok(variant="text").select(swapped_pre))
    # The multimodal objective mixes both: the three variants disagree on this input.
    picks = {variant: tuple(MMTok(variant=variant).select(base).tolist()) for variant in VARIANTS}
    assert len(set(picks.values())) == 3, picks


def test_needs_follow_the_variant() -> None:
    assert MMTok.needs == frozenset({"text_embeds", "pre_features"})
    assert MMTok().needs == frozenset({"text_embeds", "pre_features"})
    assert MMTok(variant="vision").needs == frozenset({"pre_features"})
    assert MMTok(variant="text").needs == frozenset({"text_embeds"})


def test_registered_with_options() -> None:
    strategy = make_strategy("mmtok", alpha=0.25, text_temp=0.01, variant="text")
    assert isinstance(strategy, MMTok) and strategy.name == "mmtok"
    assert (strategy.alpha, strategy.text_temp, strategy.vision_temp, strategy.variant) == (0.25, 0.01, 0.2, "text")


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(variant="audio"), "variant"),
        (dict(alpha=-0.1), "alpha"),
        (dict(text_temp=0.0), "text_temp"),
        (dict(vision_temp=-1.0), "vision_temp"),
    ],
)
def test_bad_options_are_refused(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MMTok(**options)


def test_mismatched_inputs_are_refused() -> None:
    ctx = random_context(10, n=12, keep=3)
    with pytest.raises(ValueError, match="width"):
        MMTok().select(TokenContext(ctx.features, 3, text_embeds=torch.randn(2, 5), pre_features=ctx.pre_features))
    with pytest.raises(ValueError, match="rows"):
        MMTok().select(TokenContext(ctx.features, 3, text_embeds=ctx.text_embeds, pre_features=ctx.pre_features[:5]))
