"""CDPruner: the conditional kernel, the exact greedy MAP of its DPP, and the strategy inside the models."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vtprune
from vtprune.engine.question_words import QuestionTokens
from vtprune.errors import OptionError
from vtprune.strategies import CDPruner
from vtprune.strategies.base import TokenContext
from vtprune.strategies.cdpruner import dpp_greedy_order
from vtprune.strategies.registry import make_strategy

fast = settings(max_examples=30, deadline=None)

# Three unit tokens in the plane and a question along the x axis: cos(v0, v1) = 0.96, v2 is orthogonal to both
# v0 and the question. Relevance r = cos(question, v) = (1, 0.96, 0), min-max normalised (1, 0.96/1, 0).
TOKENS = torch.tensor([[1.0, 0.0], [0.96, 0.28], [0.0, 1.0]])
QUESTION = torch.tensor([[1.0, 0.0]])


def context(keep: int = 3, **fields) -> TokenContext:
    return TokenContext(features=TOKENS, keep=keep, text_embeds=QUESTION, **fields)


def test_paper_kernel_gives_zero_quality_to_the_least_relevant_token():
    # q = r = (1, 0.96, 0): L_00 = 1 is the largest diagonal, then the Schur complement of v1 given v0 is
    # 0.96^2 (1 - 0.96^2) = 0.0723 > 0 = v2's (q_2 = 0), so the order is relevance order.
    strategy = CDPruner()
    torch.testing.assert_close(strategy.relevance(context()), torch.tensor([1.0, 0.96, 0.0]))
    assert strategy.order(context()).tolist() == [0, 1, 2]


def test_theta_trades_relevance_for_diversity_by_hand():
    # theta = 0.5: alpha = 0.5 / (2 * 0.5) = 0.5, q = exp(0.5 r) -> q^2 = exp(r) = (e, e^0.96, 1).
    # Step 1: argmax q^2 -> v0. Step 2: gain(v1) = e^0.96 (1 - 0.96^2) = 0.2046, gain(v2) = 1 * (1 - 0^2) = 1,
    # so the orthogonal v2 beats the more relevant near-duplicate v1. Step 3: v1.
    strategy = CDPruner(theta=0.5)
    kernel = strategy.kernel(context())
    torch.testing.assert_close(kernel.diagonal(), torch.tensor([math.e, math.exp(0.96), 1.0]))
    assert strategy.order(context()).tolist() == [0, 2, 1]
    # theta = 0 is a DPP on S alone: v0 first (ties on the diagonal go to the lower index), then v2.
    assert CDPruner(theta=0.0).order(context()).tolist() == [0, 2, 1]


def test_negative_relevance_prefers_the_tokens_unlike_the_question():
    # -r = (-1, -0.96, 0) -> normalised (0, 0.04, 1): v2 first, then v1 (gain 0.04^2 (1 - 0.28^2) > 0), then v0
    # whose quality is 0 (the kernel's rank is exhausted: the diagonal decides).
    strategy = CDPruner(negative_relevance=True)
    torch.testing.assert_close(strategy.relevance(context()), torch.tensor([0.0, 0.04 / 1.0, 1.0]), atol=1e-6, rtol=0)
    assert strategy.order(context()).tolist() == [2, 1, 0]


def brute_force_order(kernel: torch.Tensor, count: int) -> tuple[list[int], float]:
    """Greedy by explicit log-determinants in float64; also the smallest margin between best and runner-up."""
    kernel = kernel.double()
    chosen: list[int] = []
    margin = math.inf
    for _ in range(count):
        dets = {
            j: float(torch.linalg.det(kernel[chosen + [j]][:, chosen + [j]]))
            for j in range(kernel.shape[0])
            if j not in chosen
        }
        ranked = sorted(dets.values(), reverse=True)
        if len(ranked) > 1:
            margin = min(margin, ranked[0] - ranked[1])
        chosen.append(max(dets, key=lambda j: (dets[j], -j)))
    return chosen, margin


def test_greedy_order_is_the_brute_force_log_det_greedy():
    compared = 0
    for seed in range(60):
        gen = torch.Generator().manual_seed(seed)
        n = int(torch.randint(2, 7, (1,), generator=gen))
        features = torch.randn(n, 4, generator=gen)
        ctx = TokenContext(features=features, keep=n, text_embeds=torch.randn(2, 4, generator=gen))
        kernel = CDPruner(theta=0.6).kernel(ctx)
        count = min(n, 4)  # full rank: a random 4-D set of at most 4 has positive determinants
        expected, margin = brute_force_order(kernel, count)
        if margin < 1e-4:  # a near-tie float32 may break either way
            continue
        assert dpp_greedy_order(kernel, count).tolist() == expected, f"seed {seed}"
        compared += 1
    assert compared >= 40


@fast
@given(seed=st.integers(0, 2**16), n=st.integers(1, 40), words=st.sampled_from([None, 0, 1, 3]))
def test_contract_nesting_and_determinism(seed: int, n: int, words: int | None) -> None:
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(n, 5, generator=gen)
    text = None if words is None else torch.randn(words, 5, generator=gen)
    full = CDPruner(theta=0.5).order(TokenContext(features=features, keep=n, text_embeds=text))
    assert sorted(full.tolist()) == list(range(n))  # every token once, even after the rank runs out
    for keep in {1, max(1, n // 3), n}:
        ctx = TokenContext(features=features, keep=keep, text_embeds=text)
        kept = make_strategy("cdpruner", theta=0.5).select(ctx)
        assert kept.dtype == torch.int64 and kept.numel() == keep
        assert bool((kept[1:] > kept[:-1]).all())
        assert torch.equal(kept, full[:keep].sort().values)  # nested: a prefix of the full order
        assert torch.equal(kept, CDPruner(theta=0.5).select(ctx))


def test_duplicates_are_never_picked_twice_and_follow_relevance_once_the_rank_is_spent():
    # Two distinct vectors, each three times: the kernel has rank 2, so after two picks the diagonal decides.
    base = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    features = base[[0, 1, 0, 1, 0, 1]]
    question = torch.tensor([[1.0, 0.2, 0.0]])
    order = CDPruner(theta=0.5).order(TokenContext(features=features, keep=6, text_embeds=question))
    assert order.tolist() == [0, 1, 2, 4, 3, 5]  # then the more relevant copies (of v0) first, lower index first


def test_without_question_words_it_is_a_dpp_on_similarity():
    gen = torch.Generator().manual_seed(3)
    features = torch.randn(12, 6, generator=gen)
    plain = CDPruner().order(TokenContext(features=features, keep=5))
    unit = features / features.norm(dim=1, keepdim=True)
    assert plain.tolist() == dpp_greedy_order(unit @ unit.T, 5).tolist()
    empty = CDPruner().order(TokenContext(features=features, keep=5, text_embeds=torch.zeros(0, 6)))
    assert torch.equal(plain, empty)


@pytest.mark.parametrize("theta", [-0.1, 1.0])
def test_theta_outside_its_range_is_refused(theta):
    with pytest.raises(ValueError, match="theta"):
        make_strategy("cdpruner", theta=theta)


def test_relevance_source_declares_what_the_engine_computes():
    # With a tower: tests/strategies/test_text_towers.py.
    assert make_strategy("cdpruner").needs == frozenset({"text_embeds"})


def test_a_text_tower_that_does_not_load_is_refused_when_the_strategy_is_built():
    with pytest.raises(OptionError, match="text_tower='no/such/clip'"):
        make_strategy("cdpruner", text_tower="no/such/clip")


@pytest.mark.parametrize("kind", ["llava", "qwen2_5_vl"])
def test_in_the_model_it_selects_what_select_gives_on_the_question_embeddings(models, make_inputs, kind):
    model = models(kind)
    inputs = make_inputs(model, kind, 1)
    with torch.no_grad(), vtprune.pruned(model, "cdpruner", keep_ratio=0.25, theta=0.5) as handle:
        model(**inputs)
    ids = inputs["input_ids"][0]
    adapter = vtprune.adapters.adapter_for(model)
    words = QuestionTokens(adapter.special_token_ids()).select(ids[inputs["attention_mask"][0].bool()])
    question = model.get_input_embeddings()(words)
    with torch.no_grad():
        encoded = adapter.encode(dict(inputs))["mm_encoder_outputs"]["image"].pooler_output[0]
        expected = vtprune.select("cdpruner", encoded, keep_ratio=0.25, text_embeds=question, theta=0.5)
    image = handle.last_record.images[0]
    assert image.kept.numel() < image.num_tokens
    assert torch.equal(image.kept.cpu(), expected.cpu())
