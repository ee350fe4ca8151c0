"""DivPrune against the authors' reference outputs (tests/data/parity; see its README)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from parity import DATA, paper_selectors, parity_cases

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


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_divprune_in_half_precision_picks_what_the_reference_loop_picks_in_it(
    case: dict, dtype: str, arrays: np.lib.npyio.NpzFile
) -> None:
    # The authors' code computes distances in the model's dtype; tokens of a bf16 / fp16 model reach the strategy
    # in that dtype (or as float32 copies, from a user), and precision=<dtype> must pick what their loop picks.
    half = getattr(torch, dtype)
    features = torch.from_numpy(arrays[case["input"]]).to(half)
    expected = paper_selectors.divprune(features, case["k"], dtype=half).tolist()
    for tokens in (features, features.float()):
        assert DivPrune(precision=dtype).order(TokenContext(features=tokens, keep=case["k"])).tolist() == expected


def test_divprune_refuses_an_unknown_precision() -> None:
    with pytest.raises(ValueError, match="precision must be one of"):
        DivPrune(precision="float8")


def test_the_benchmarks_paper_formulations_reproduce_the_authors_outputs(arrays: np.lib.npyio.NpzFile) -> None:
    # eval/bench_selection.py times vtprune against these; they must be the papers' selections, not a strawman.
    for case in CASES:
        order = paper_selectors.divprune(torch.from_numpy(arrays[case["input"]]), case["k"])
        assert order.tolist() == case["selection_order"], case["id"]
    mmtok_cases = parity_cases("mmtok")
    for case in mmtok_cases:
        inputs = {name: torch.from_numpy(arrays[key]) for name, key in case["inputs"].items()}
        order = paper_selectors.mmtok(
            inputs["text"],
            inputs["vis_proj"],
            inputs["vis_clip"],
            case["k"],
            case["alpha"],
            case["tv_temp"],
            case["vv_temp"],
        )
        assert sorted(order.tolist()) == case["kept_sorted"], case["id"]
    assert CASES and mmtok_cases


def test_divprune_cases_exist() -> None:
    # An empty parametrize list would skip silently; make a missing or renamed data file fail.
    assert CASES, f"no divprune cases in {DATA / 'parity.json'}"
