"""Exact duplicate tokens tie exactly in the diversity strategies: distance 0, rows equal bit for bit, ties to the
lower index (the toy VLMs' background cells are such duplicates; rounding noise used to decide their ties)."""

from __future__ import annotations

import pytest
import torch

from vtprune.strategies import DivPrune, ToDRE, diversity
from vtprune.strategies.base import TokenContext
from vtprune.strategies.diversity import cosine_distances, cosine_similarities
from vtprune.strategies.zoo import product_order


def with_duplicates(count: int, distinct: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, width) tokens made of ``distinct`` random vectors of unlike norms, scattered over the rows so
    duplicates fall in different blocks of the Gram matrix; and each row's vector id."""
    generator = torch.Generator().manual_seed(seed)
    vectors = torch.randn(distinct, width, generator=generator) * torch.rand(distinct, 1, generator=generator) * 40
    ids = torch.cat([torch.arange(distinct), torch.randint(0, distinct, (count - distinct,), generator=generator)])
    ids = ids[torch.randperm(count, generator=generator)]
    return vectors[ids], ids


@pytest.fixture(params=["rows sharing a norm", "every entry"])
def snap(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both ways the snap finds duplicates: on a CPU among the rows that share a norm, on an accelerator everywhere."""
    monkeypatch.setattr(diversity, "compares_shared_norms_only", lambda device: request.param == "rows sharing a norm")


@pytest.mark.usefixtures("snap")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("count", "distinct", "width"), [(144, 4, 128), (600, 150, 1024)])
def test_exact_duplicates_are_at_distance_exactly_zero(count, distinct, width, dtype):
    # 600 tokens span three blocks of the Gram matrix, so some duplicates' dot products come from different calls.
    x, ids = with_duplicates(count, distinct, width, seed=count)
    dist = cosine_distances(x, dtype)
    same = ids[:, None] == ids[None, :]
    assert int(same.sum()) > count  # duplicates exist beyond the diagonal
    assert bool((dist[same] == 0).all())
    assert bool((dist[~same] > 0).all())
    assert torch.equal(dist, dist.T)


@pytest.mark.usefixtures("snap")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_duplicates_in_one_block_have_equal_rows(dtype):
    # One BLAS call sums every dot product in the same order, so within a block duplicates' rows are equal bit for
    # bit (the toys' 144 tokens are one block); across blocks their entries to other tokens may differ by an ulp.
    x, ids = with_duplicates(144, 4, 128, seed=7)
    dist = cosine_distances(x, dtype)
    first = torch.stack([(ids == ids[row]).nonzero()[0, 0] for row in range(144)])
    assert int((first != torch.arange(144)).sum()) > 100
    assert torch.equal(dist, dist[first][:, first])


@pytest.mark.parametrize("strategy", [DivPrune(), DivPrune(precision="float64"), ToDRE()], ids=repr)
@pytest.mark.parametrize("seed", range(4))
def test_once_every_distinct_vector_is_kept_the_duplicates_follow_in_index_order(strategy, seed):
    # Max-min distance: after one token per distinct vector every remaining token is at distance 0 from the
    # kept set, an exact tie, so the rest of the order is the remaining indices in ascending order.
    x, ids = with_duplicates(600, 150, 1024, seed=seed)
    order = strategy.order(TokenContext(features=x, keep=600)).tolist()
    assert sorted(ids[order[:150]].tolist()) == list(range(150))
    assert order[150:] == sorted(order[150:])


def test_zoo_gives_a_zero_score_token_and_kept_duplicates_the_same_gain_so_the_lower_index_wins():
    # ZOO's gain score·(1 - max cos to the kept set) is exactly 0 both for the least sensitive token (score 0 after
    # min-max normalisation) and for a duplicate of a kept token; ties go to the lower index.
    x, ids = with_duplicates(144, 4, 128, seed=3)
    score = torch.linspace(1.0, 0.5, 144, dtype=torch.float64)
    least = int((ids == ids[-1]).nonzero()[-1, 0])  # a token of a vector that repeats, the last of its copies
    x[least] = torch.randn(128, generator=torch.Generator().manual_seed(9))  # made distinct, with score 0
    score[least] = 0.0
    picks = product_order(score, cosine_similarities(x, torch.float32).double(), 10).tolist()
    distinct_first = [int((ids == vector).nonzero()[0, 0]) for vector in range(4)]
    # score falls with the index, so the first picks are each vector's first copy; then every gain is exactly 0.
    assert sorted(picks[:4]) == sorted(distinct_first)
    remaining = [row for row in range(144) if row not in picks[:4]]
    assert picks[4:] == remaining[:6]
