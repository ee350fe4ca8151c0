"""DivPrune against the authors' reference outputs (tests/data/parity; see its README)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from parity import DATA, parity_cases

from vtprune.strategies import DivPrune
from vtprune.strategies.base import TokenContext
from vtprune.strategies.diversity import cosine_distances

CASES = parity_cases("divprune")


def min_pairwise_distance(features: torch.Tensor, kept: list[int]) -> float:
    """DivPrune's objective: the smallest cosine distance between two kept tokens (inf for one token)."""
    dist = cosine_distances(features)[kept][:, kept].fill_diagonal_(float("inf"))
    return float(dist.min())


def objectives(features: torch.Tensor, ours: list[int], reference: list[int]) -> str:
    # The README's rule: if the sets differ, the lower objective is the wrong one.
    return (
        f"min pairwise distance: ours {min_pairwise_distance(features, ours):.9g}, "
        f"reference {min_pairwise_distance(features, reference):.9g}"
    )


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_divprune_matches_reference(case: dict, arrays: np.lib.npyio.NpzFile) -> None:
    features = torch.from_numpy(arrays[case["input"]])
    ctx = TokenContext(features=features, keep=case["k"])
    kept = DivPrune().select(ctx).tolist()
    assert kept == case["kept_sorted"], objectives(features, kept, case["kept_sorted"])
    order = DivPrune().order(ctx).tolist()
    assert order == case["selection_order"], objectives(features, order, case["selection_order"])


def test_divprune_cases_exist() -> None:
    # An empty parametrize list would skip silently; make a missing or renamed data file fail.
    assert CASES, f"no divprune cases in {DATA / 'parity.json'}"
