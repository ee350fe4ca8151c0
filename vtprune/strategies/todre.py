"""``todre`` and ``todre_relevance``: ToDRE's two stages (diversity, then task relevance in the decoder).

ToDRE (no public code; paper v1 and v2) prunes in two places. Stage 1, before the LLM, keeps a
diverse subset of the projected tokens, greedily from a pivot. Stage 2, deep in the decoder,
drops every remaining visual token once text and image stop attending to each other. Use both as
one schedule: ``"todre:25%+todre_relevance"``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .base import DECODER_PLACE, INPUT_PLACE, GreedyStrategy, Strategy, TokenContext
from .diversity import (
    farthest_point_order,
    matrix_bytes,
    memory_groups,
    most_isolated,
    order_scores,
    rows,
    stacked_cosines,
)
from .options import Option
from .registry import register_strategy

METHODS = ("k-center", "max-sum")


def max_sum_order(similarity: Tensor, first: Tensor, count: int) -> Tensor:
    """Greedy max-sum diversity per image: from ``first``, repeatedly the token whose summed similarity
    to the chosen set is least.

    ``similarity`` (..., N, N), ``first`` (...) -> picks (..., count). A running sum
    ``s_j = sum_{i in S} cos(V_i, V_j)`` makes it O(count·N) per image; chosen tokens are masked with
    +inf; ties go to the lower index (``argmin``).
    """
    picks = [first]
    running = rows(similarity, first)
    running.scatter_(-1, first[..., None], torch.inf)
    for _ in range(count - 1):
        j = running.argmin(dim=-1)
        picks.append(j)
        running += rows(similarity, j)
        running.scatter_(-1, j[..., None], torch.inf)
    return torch.stack(picks, dim=-1)


@register_strategy("todre")
class ToDRE(GreedyStrategy):
    """Stage 1: greedy diversity from a [CLS]-attention pivot, on L2-normalised projected tokens.

    - Pivot: the token the vision tower's [CLS] attends to most (last layer the projector reads,
      heads averaged). Models without a [CLS] token (Qwen, SigLIP towers) and AnyRes models (whose
      per-tile [CLS] rows vtprune does not map back to packed tokens) fall back to the most
      isolated token, DivPrune's first pick — a documented choice, the paper leaves it open.
    - ``method="k-center"`` (v1, the default, the method this project follows): farthest point from
      the chosen set each step, ``argmax_j min_{i in S} d(i, j)`` with ``d = 1 - cos``.
    - ``method="max-sum"`` (v2): keep a running sum ``s_j = sum_{i in S} cos(V_i, V_j)`` and add
      ``argmin s`` each step.
    Ties go to the lower index; chosen tokens are never picked twice.
    """

    needs = frozenset({"cls_attention"})
    optional_needs = frozenset({"cls_attention"})  # the most isolated token is the pivot without it
    places = frozenset({INPUT_PLACE})
    method = Option(str, choices=METHODS)

    def __init__(self, method: str = "k-center") -> None:
        self.method = method

    def order_batch(self, contexts: Sequence[TokenContext]) -> list[Tensor]:
        orders: list[Tensor] = []
        for group in memory_groups(contexts, matrix_bytes(contexts, torch.float32)):
            orders += self._greedy(group, group[0].keep)[0]
        return orders

    def scores(self, ctx: TokenContext) -> Tensor | None:
        """k-center: each token's cosine distance to the tokens picked before it; max-sum: pick order."""
        if self.method != "k-center":
            return super().scores(ctx)
        order, gains = self._greedy([ctx], ctx.num_tokens)
        assert gains is not None, "k-center returns its gains"
        return order_scores(order[0], gains[0])

    def _greedy(self, contexts: Sequence[TokenContext], count: int) -> tuple[Tensor, Tensor | None]:
        """(B, count) picks of the group and, for k-center, their gains (max-sum: None)."""
        k_center = self.method == "k-center"
        # k-center reads distances, max-sum similarities; the pivot fallback reads either.
        matrix = stacked_cosines(contexts, torch.float32, distances=k_center)
        first = most_isolated(matrix, similarities=not k_center)  # the pivot of images without a [CLS]
        for image, ctx in enumerate(contexts):
            if ctx.cls_attention is not None:
                first[image] = ctx.cls_attention.argmax()
        if k_center:
            return farthest_point_order(matrix, first, count)
        return max_sum_order(matrix, first, count), None


@register_strategy("todre_relevance")
class ToDRERelevance(Strategy):
    """Stage 2: inside the decoder, drop all visual tokens of a row when they stopped mattering.

    From the attention of layer K-1 (heads averaged, exact under SDPA), if both the share of
    text-query attention that goes to visual keys and the share of visual-query attention that
    goes to text keys are below ``tau`` (default 0.10), every visual token of the row is dropped
    for layers K.. and for decoding; otherwise all are kept. The paper checks at layer
    ``floor(7L/8)`` (28 of 32) and drops from there on; with vtprune's convention (scores at K-1,
    pruning from K) the default is ``K = floor(7L/8) + 1``. Text queries are all non-visual tokens
    of the row (the paper does not say which); shares are per row, not per image.
    """

    needs = frozenset({"cross_shares"})
    places = frozenset({DECODER_PLACE})
    needs_budget = False
    tau = Option(float, at_least=0, at_most=1)
    """0: never drops (no share is below 0); 1: drops unless a share is 1 (the shares are in [0, 1])."""

    def __init__(self, tau: float = 0.10) -> None:
        self.tau = tau

    def default_layer(self, num_layers: int) -> int:
        return 7 * num_layers // 8 + 1

    def select(self, ctx: TokenContext) -> Tensor:
        if ctx.cross_shares is None:
            raise ValueError(
                "todre_relevance acts inside the decoder (layer=K), where the engine supplies attention shares"
            )
        if bool((ctx.cross_shares < self.tau).all()):
            return torch.zeros(0, dtype=torch.int64)
        return torch.arange(ctx.num_tokens)
