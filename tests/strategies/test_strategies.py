"""The contract every registered strategy meets, and algorithm tests for none, random, uniform, divprune, fastv."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import STRATEGIES
from contexts import assert_valid_selection as assert_valid
from contexts import full_context, full_inputs
from hypothesis import given, settings
from hypothesis import strategies as st

import vtprune
from vtprune.errors import UnknownStrategyError
from vtprune.strategies import DivPrune, FastV, GreedyStrategy, NoPruning, RandomPruning, UniformPruning
from vtprune.strategies.base import DECODER_PLACE, TokenContext
from vtprune.strategies.diversity import cosine_distances
from vtprune.strategies.registry import list_strategies, make_strategy

BUILTINS = ("none", "random", "uniform", "divprune", "fastv")

# Small sizes and few examples: the machine is shared and every property is cheap to falsify.
fast = settings(max_examples=40, deadline=None)


@st.composite
def contexts(draw: st.DrawFn, max_tokens: int = 48) -> TokenContext:
    """A context with seeded Gaussian features, a budget, an optional grid and an attention vector."""
    use_grid = draw(st.booleans())
    if use_grid:
        t, h, w = draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
        n, grid = t * h * w, (t, h, w)
    else:
        n, grid = draw(st.integers(1, max_tokens)), None
    dim = draw(st.integers(1, 8))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    return TokenContext(
        features=torch.randn(n, dim, generator=gen).to(dtype),
        keep=draw(st.integers(1, n)),
        seed=draw(st.integers(0, 2**31 - 1)),
        grid=grid,
        attention=torch.rand(n, generator=gen),
    )


def assert_valid_selection(kept: torch.Tensor, n: int, keep: int) -> None:
    """The Strategy.select contract: ``keep`` unique int64 indices in [0, n), ascending."""
    assert kept.dtype == torch.int64
    assert kept.ndim == 1 and kept.numel() == keep
    assert int(kept.min()) >= 0 and int(kept.max()) < n
    assert bool((kept[1:] > kept[:-1]).all()), f"not strictly ascending: {kept.tolist()}"


def min_gap_to_earlier(dist: torch.Tensor, picks: list[int], step: int, candidate: int) -> float:
    """Distance from ``candidate`` to the nearest of the first ``step`` picks."""
    return float(dist[picks[:step], candidate].min())


# --- registry and context ---------------------------------------------------------------------


def test_registry_lists_the_builtins() -> None:
    assert set(BUILTINS) <= set(list_strategies())
    for name, cls in zip(BUILTINS, (NoPruning, RandomPruning, UniformPruning, DivPrune, FastV), strict=True):
        strategy = make_strategy(name)
        assert type(strategy) is cls and strategy.name == name


def test_unknown_strategy_names_the_known_ones() -> None:
    with pytest.raises(UnknownStrategyError) as info:
        make_strategy("no-such-strategy")
    message = str(info.value)
    assert "no-such-strategy" in message
    for name in BUILTINS:
        assert name in message


@pytest.mark.parametrize("keep", [0, -1, 6])
def test_context_rejects_out_of_range_keep(keep: int) -> None:
    with pytest.raises(ValueError, match="keep"):
        TokenContext(features=torch.zeros(5, 3), keep=keep)


# --- the contract, for every budgeted strategy ------------------------------------------------


# Every registered strategy (a new one is covered without editing this file), with a context that fills every
# field a strategy may need (tests/contexts.py).
EVERY = list(STRATEGIES)
# Token counts with grids: 1 x 1, 2 x 3, 4 x 4 (square, for pooling), 5 x 6; every budget from 1 to N for small N.
CONTRACT_CASES = [
    (n, keep, seed) for n, seed in ((1, 0), (6, 1), (16, 2), (30, 3)) for keep in sorted({1, min(2, n), n // 2 or 1, n})
]


@pytest.mark.parametrize("name", EVERY)
def test_every_strategy_meets_the_selection_contract(name: str) -> None:
    checked = 0
    for n, keep, seed in CONTRACT_CASES:
        ctx = full_context(n, keep, seed)
        strategy = make_strategy(name)
        kept = strategy.select(ctx)
        assert_valid(strategy, kept, ctx)
        assert torch.equal(kept, make_strategy(name).select(ctx)), "not deterministic"
        # Exactly what vtprune.select gives on the same plain tensors.
        inputs = full_inputs(n, ctx.features.shape[1], seed)
        features = inputs.pop("features")
        budget = {} if not strategy.needs_budget else {"keep": keep}
        assert torch.equal(vtprune.select(name, features, **budget, **inputs), kept)
        checked += 1
    assert checked == len(CONTRACT_CASES)


@pytest.mark.parametrize("name", EVERY)
def test_every_strategy_selects_each_image_of_a_group_as_alone(name: str) -> None:
    strategy = make_strategy(name)
    for n, keep in ((6, 2), (16, 5)):
        group = [full_context(n, keep, seed) for seed in (4, 5, 6)]
        together = strategy.select_batch(group)
        assert len(together) == len(group)
        for ctx, kept in zip(group, together, strict=True):
            assert torch.equal(kept, strategy.select(ctx))


#: The inputs the context keeps in the model's dtype (TokenContext), and the half precision each is given in below.
HALF_PRECISION = {"features": torch.bfloat16, "text_embeds": torch.bfloat16, "pre_features": torch.float16}


@pytest.mark.parametrize("name", EVERY)
def test_every_strategy_picks_on_half_precision_inputs_what_it_picks_on_their_float32_values(name: str) -> None:
    # The engine hands strategies the model's bfloat16 / float16 tensors, not float32 copies: each converts where it
    # computes, so the picks are those on the same values in float32 (a strategy computing in half precision, or
    # failing on it, differs here).
    checked = 0
    for n, keep, seed in ((16, 5, 8), (30, 7, 9)):
        inputs = full_inputs(n, 5, seed)
        half = inputs | {key: inputs[key].to(dtype) for key, dtype in HALF_PRECISION.items()}
        exact = half | {key: half[key].float() for key in HALF_PRECISION}
        budget = {} if not make_strategy(name).needs_budget else {"keep": keep}
        picks = vtprune.select(name, half.pop("features"), **budget, **half)
        assert torch.equal(picks, vtprune.select(name, exact.pop("features"), **budget, **exact))
        checked += 1
    assert checked == 2


GREEDY_NAMES = [name for name in EVERY if isinstance(make_strategy(name), GreedyStrategy)]


def test_the_greedy_list_is_not_empty() -> None:
    assert {"divprune", "todre", "mmtok", "zoo"} <= set(GREEDY_NAMES)


@pytest.mark.parametrize("name", GREEDY_NAMES)
def test_every_greedy_strategy_nests_its_keep_sets(name: str) -> None:
    strategy = make_strategy(name)
    ctx = full_context(30, 30, 7)
    order = strategy.order(ctx)
    assert sorted(order.tolist()) == list(range(30))
    for keep in (1, 4, 17):
        shorter = strategy.order(full_context(30, keep, 7))
        assert torch.equal(shorter, order[:keep])
        assert torch.equal(strategy.select(full_context(30, keep, 7)), shorter.sort().values)


@fast
@given(ctx=contexts())
def test_none_keeps_every_token(ctx: TokenContext) -> None:
    assert NoPruning.needs_budget is False
    assert torch.equal(NoPruning().select(ctx), torch.arange(ctx.num_tokens, dtype=torch.int64))


# --- random -------------------------------------------------------------------------------------


def test_random_depends_on_the_seed_only() -> None:
    features = torch.randn(200, 4)

    def pick(seed: int) -> torch.Tensor:
        return RandomPruning().select(TokenContext(features=features, keep=20, seed=seed))

    assert torch.equal(pick(7), pick(7))
    assert not torch.equal(pick(0), pick(1))
    # The features play no part: same seed, other features, same subset.
    assert torch.equal(pick(3), RandomPruning().select(TokenContext(features=torch.zeros(200, 4), keep=20, seed=3)))


# --- uniform ------------------------------------------------------------------------------------


def test_uniform_quarter_of_a_square_grid_is_every_second_row_and_column() -> None:
    kept = UniformPruning().select(TokenContext(features=torch.zeros(576, 2), keep=144, grid=(1, 24, 24)))
    rows, cols = kept // 24, kept % 24
    every_second = list(range(1, 24, 2))
    assert sorted(set(rows.tolist())) == every_second
    assert sorted(set(cols.tolist())) == every_second
    assert kept.numel() == len(every_second) ** 2  # the full lattice, no point missing


def test_uniform_lattice_follows_the_grid_aspect() -> None:
    # A 12x48 grid keeping 36 tokens: a 3x12 lattice (aspect 1:4 like the grid), not 6x6.
    kept = UniformPruning().select(TokenContext(features=torch.zeros(576, 2), keep=36, grid=(1, 12, 48)))
    assert len(set((kept // 48).tolist())) == 3
    assert len(set((kept % 48).tolist())) == 12


@fast
@given(data=st.data())
def test_uniform_shares_the_budget_evenly_between_frames(data: st.DataObject) -> None:
    t = data.draw(st.integers(1, 4))
    h, w = data.draw(st.integers(1, 8)), data.draw(st.integers(1, 8))
    keep = data.draw(st.integers(1, t * h * w))
    kept = UniformPruning().select(TokenContext(features=torch.zeros(t * h * w, 1), keep=keep, grid=(t, h, w)))
    assert_valid_selection(kept, t * h * w, keep)
    per_frame = torch.bincount(kept // (h * w), minlength=t)
    assert int(per_frame.max() - per_frame.min()) <= 1


@fast
@given(n=st.integers(1, 200), data=st.data())
def test_uniform_without_grid_is_evenly_spaced_in_token_order(n: int, data: st.DataObject) -> None:
    keep = data.draw(st.integers(1, n))
    kept = UniformPruning().select(TokenContext(features=torch.zeros(n, 1), keep=keep))
    assert_valid_selection(kept, n, keep)
    gaps = kept.diff()
    if gaps.numel():
        assert int(gaps.max() - gaps.min()) <= 1
        assert int(gaps.min()) >= math.floor(n / keep)


def test_uniform_ignores_a_grid_that_does_not_describe_the_tokens() -> None:
    features = torch.zeros(50, 1)
    with_bad_grid = UniformPruning().select(TokenContext(features=features, keep=10, grid=(1, 6, 6)))
    assert torch.equal(with_bad_grid, UniformPruning().select(TokenContext(features=features, keep=10)))


# --- divprune -----------------------------------------------------------------------------------


@fast
@given(ctx=contexts(), data=st.data())
def test_divprune_orders_are_nested(ctx: TokenContext, data: st.DataObject) -> None:
    k1 = data.draw(st.integers(1, ctx.keep))
    longer = DivPrune().order(ctx)
    shorter = DivPrune().order(TokenContext(features=ctx.features, keep=k1))
    assert torch.equal(shorter, longer[:k1])


@fast
@given(ctx=contexts())
def test_divprune_each_pick_is_farthest_from_the_earlier_picks(ctx: TokenContext) -> None:
    dist = cosine_distances(ctx.features)
    picks = DivPrune().order(ctx).tolist()
    n = ctx.num_tokens
    if n > 1:
        nearest = [min(float(dist[i, j]) for i in range(n) if i != j) for j in range(n)]
        # The float64 matrix is symmetric only to rounding, so compare with a rounding-sized tolerance.
        assert nearest[picks[0]] >= max(nearest) - 1e-12
    for step in range(1, len(picks)):
        remaining = [j for j in range(n) if j not in picks[:step]]
        best = max(min_gap_to_earlier(dist, picks, step, j) for j in remaining)
        assert min_gap_to_earlier(dist, picks, step, picks[step]) >= best - 1e-12


@fast
@given(distinct=st.integers(1, 6), n=st.integers(1, 40), seed=st.integers(0, 2**16), data=st.data())
def test_divprune_never_repeats_an_index_with_duplicate_rows(
    distinct: int, n: int, seed: int, data: st.DataObject
) -> None:
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(distinct, 5, generator=gen)
    features = rows[torch.randint(distinct, (n,), generator=gen)]
    keep = data.draw(st.integers(1, n))
    kept = DivPrune().select(TokenContext(features=features, keep=keep))
    assert_valid_selection(kept, n, keep)


def test_divprune_zero_rows_give_no_nan() -> None:
    features = torch.zeros(6, 3)
    features[1] = torch.tensor([1.0, 0.0, 0.0])
    assert not cosine_distances(features).isnan().any()
    assert_valid_selection(DivPrune().select(TokenContext(features=features, keep=6)), 6, 6)


def test_divprune_starts_from_the_most_isolated_token() -> None:
    # Two tight pairs and one loner: the loner comes first, then one token of each pair.
    features = torch.tensor([[1.0, 0.0], [1.0, 0.05], [0.0, 1.0], [0.05, 1.0], [-1.0, -1.0]])
    order = DivPrune().order(TokenContext(features=features, keep=3)).tolist()
    assert order[0] == 4
    assert {order[1] // 2, order[2] // 2} == {0, 1}


# --- fastv --------------------------------------------------------------------------------------


def test_fastv_declares_attention_at_the_decoder() -> None:
    assert FastV.needs == frozenset({"attention"})
    assert FastV.places == frozenset({DECODER_PLACE})


@fast
@given(ctx=contexts())
def test_fastv_keeps_the_most_attended_tokens(ctx: TokenContext) -> None:
    kept = FastV().select(ctx)
    dropped = torch.ones(ctx.num_tokens, dtype=torch.bool)
    dropped[kept] = False
    if dropped.any():
        assert float(ctx.attention[kept].min()) >= float(ctx.attention[dropped].max())


def test_fastv_ties_go_to_the_lower_index() -> None:
    attention = torch.tensor([0.1, 0.5, 0.5, 0.5, 0.2, 0.5])
    kept = FastV().select(TokenContext(features=torch.zeros(6, 2), keep=3, attention=attention))
    assert kept.tolist() == [1, 2, 3]


@pytest.mark.parametrize("attention", [None, torch.rand(4), torch.rand(5, 1)])
def test_fastv_without_matching_attention_explains_where_it_acts(attention: torch.Tensor | None) -> None:
    with pytest.raises(ValueError, match="inside the decoder"):
        FastV().select(TokenContext(features=torch.zeros(5, 2), keep=2, attention=attention))


def test_uniform_spreads_over_anyres_segments_and_skips_newlines() -> None:
    from vtprune.vocabulary.grids import Segment

    segments = (Segment(0, (1, 4, 4)), Segment(16, (1, 4, 8), row_newlines=True))  # 16 + 4 * 9 tokens
    ctx = TokenContext(features=torch.randn(52, 4), keep=12, segments=segments)
    kept = UniformPruning().select(ctx)
    newlines = {segments[1].newline_after(row) for row in range(4)}
    assert len(kept) == 12 and not newlines & set(kept.tolist())
    assert (kept < 16).sum() == 4  # the base tile's share: 12 * 16 / 48
    assert kept[kept < 16].tolist() == [5, 7, 13, 15]  # its own 2 x 2 lattice
