"""TRIM: the IQR cut, the kept tokens and the merged remainder, on plain tensors and inside the models."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_matryoshka import llm_inputs

import vtprune
from vtprune.strategies import TRIM
from vtprune.strategies.base import TokenContext
from vtprune.strategies.registry import make_strategy
from vtprune.strategies.trim import iqr_outliers
from vtprune.testing import IMAGE, MODEL_KINDS

fast = settings(max_examples=30, deadline=None)


def test_iqr_cut_by_hand():
    # Sorted: 1 2 3 4 5 6 7 40 (n = 8). Linear interpolation: Q1 at rank 0.25·7 = 1.75 -> 2 + 0.75·(3-2) = 2.75,
    # Q3 at rank 5.25 -> 6 + 0.25·(7-6) = 6.25; IQR = 3.5; cut = 6.25 + 1.5·3.5 = 11.5: only 40 is above it.
    scores = torch.tensor([5.0, 40.0, 1.0, 7.0, 3.0, 2.0, 6.0, 4.0])
    assert iqr_outliers(scores).tolist() == [1]
    # Sorted 1..7, 13, 30 (n = 9): Q1 = 3, Q3 = 7 exactly, cut = 7 + 6 = 13; 13 is not above it, 30 is.
    scores = torch.tensor([13.0, 1.0, 2.0, 30.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    assert iqr_outliers(scores).tolist() == [3]
    assert iqr_outliers(torch.full((6,), 0.25)).tolist() == []  # no spread, no outlier


# Ten tokens: 0 and 2 along the question (x axis), eight orthogonal to it: cos = (1, 0, 1, 0, ..., 0).
TOKENS = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]] + [[0.0, float(k)] for k in range(2, 9)])
REST = [1, 3, 4, 5, 6, 7, 8, 9]
QUESTION = torch.tensor([[5.0, 0.0]])


def test_adaptive_keeps_the_outliers_and_appends_their_remainder_at_its_last_slot():
    ctx = TokenContext(features=TOKENS, keep=6, text_embeds=QUESTION)
    scores = TRIM().scores(ctx)
    torch.testing.assert_close(scores.sum(), torch.tensor(1.0))
    assert bool(scores[0] == scores[2]) and bool(scores[0] > scores[1])
    # Two high scores, eight equal low ones: Q1 (rank 2.25 of 0..9) = Q3 (rank 6.75) = the low one, IQR 0, so the
    # cut is the low score and exactly the two high ones are above it. (With six tokens Q3 would interpolate
    # between low and high and nothing would be an outlier.)
    places, weights = TRIM(adaptive=True).merge(ctx)
    assert places.tolist() == [0, 2, 9]  # tokens 0 and 2, then the average of the rest in the place of 9
    merged = weights @ TOKENS
    torch.testing.assert_close(merged[0], TOKENS[0])
    torch.testing.assert_close(merged[1], TOKENS[2])
    torch.testing.assert_close(merged[2], TOKENS[REST].mean(dim=0))


def test_a_budget_keeps_the_most_relevant_then_the_merged_token():
    ctx = TokenContext(features=TOKENS, keep=3, text_embeds=QUESTION)
    places, weights = TRIM().merge(ctx)
    assert places.tolist() == [0, 2, 9]
    ctx = TokenContext(features=TOKENS, keep=4, text_embeds=QUESTION)
    places, weights = TRIM().merge(ctx)  # the third pick is a tie among the orthogonal ones: the lower index wins
    assert places.tolist() == [0, 1, 2, 9]
    torch.testing.assert_close((weights @ TOKENS)[3], TOKENS[REST[1:]].mean(dim=0))
    places, weights = TRIM().merge(TokenContext(features=TOKENS, keep=1, text_embeds=QUESTION))
    assert places.tolist() == [9] and torch.allclose(weights, torch.full((1, 10), 1 / 10))


@fast
@given(seed=st.integers(0, 2**16), n=st.integers(2, 40), adaptive=st.booleans(), words=st.sampled_from([None, 0, 2]))
def test_contract(seed: int, n: int, adaptive: bool, words: int | None) -> None:
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(n, 4, generator=gen)
    text = None if words is None else torch.randn(words, 4, generator=gen)
    keep = int(torch.randint(1, n, (1,), generator=gen))
    ctx = TokenContext(features=features, keep=keep, text_embeds=text)
    strategy = make_strategy("trim", adaptive=adaptive)
    places, weights = strategy.merge(ctx)
    assert places.dtype == torch.int64 and bool((places[1:] > places[:-1]).all())
    if not adaptive:
        assert places.numel() == keep
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(places.numel()))
    assert bool((weights.sum(dim=0) > 0).all())  # every token is kept or merged
    again = TRIM(adaptive=adaptive).merge(ctx)
    assert torch.equal(places, again[0]) and torch.equal(weights, again[1])


def test_options_are_checked_and_the_adaptive_form_takes_no_budget():
    with pytest.raises(ValueError, match="temperature"):
        TRIM(temperature=0)
    assert TRIM().needs_budget and not TRIM(adaptive=True).needs_budget
    with pytest.raises(vtprune.BudgetError):
        vtprune.make_stage("trim", keep=4, adaptive=True)


def test_the_llm_gets_the_kept_tokens_and_the_average_of_the_rest(models, make_inputs):
    model = models("llava")
    inputs = make_inputs(model, "llava", 1)
    seen, record = llm_inputs(model, inputs, "trim:4")
    with torch.no_grad():
        tokens = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]
    image = record.images[0]
    assert image.kept.numel() == 4
    rest = torch.ones(len(tokens), dtype=torch.bool)
    rest[image.kept[:-1]] = False
    assert int(image.kept[-1]) == int(rest.nonzero()[-1])  # the merged token sits in the last averaged slot
    columns = (inputs["input_ids"][0] == IMAGE).nonzero()[:, 0]
    slots = (seen["mask"][0] == 1).nonzero()[:, 0]
    start = int(columns[0])  # text before the image is unchanged, so the image starts at the same slot
    got = seen["embeds"][0][slots][start : start + 4]
    torch.testing.assert_close(got[:3], tokens[image.kept[:3]])
    torch.testing.assert_close(got[3], tokens[rest].mean(dim=0))
    assert seen["positions"][0][slots][start : start + 4].tolist() == columns[image.kept].tolist()


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_every_class_generates_with_a_budget_and_with_the_adaptive_count(models, make_inputs, kind):
    model = models(kind)
    inputs = make_inputs(model, kind, 3)
    with torch.no_grad():
        with vtprune.pruned(model, "trim:3") as handle:
            tokens = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert tokens.shape[0] == inputs["input_ids"].shape[0]
        assert all(image.kept.numel() == 3 for image in handle.last_record.images)
        with vtprune.pruned(model, "trim", adaptive=True) as handle:
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
    for image in handle.last_record.images:  # outliers + 1 merged token, as many as each image has
        assert 1 <= image.kept.numel() < image.num_tokens
