"""``divprune``: max-min diversity selection (DivPrune, Alvar et al., CVPR 2025)."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from .base import GreedyStrategy, TokenContext
from .diversity import cosine_distances, farthest_point_order, most_isolated, pick_distances, stacked_similarities
from .registry import register_strategy


@register_strategy("divprune")
class DivPrune(GreedyStrategy):
    """Greedy max-min diversity over the cosine distance ``d = 1 - cos``.

    1. First pick: the most isolated token, ``argmax_j min_{i != j} d(i, j)``.
    2. Then repeatedly the token farthest from the chosen set, ``argmax_j min_{i in S} d(i, j)``.

    Ties go to the lower index (``argmax``), as in the reference code. Unlike the reference loop,
    chosen tokens are masked, so exact duplicate rows never make an index come out twice. A
    running min-distance vector makes the loop O(kN) after the O(N^2 D) distance matrix (the
    reference re-gathers every chosen row each step), and a group of images runs as one loop.
    The paper acts on the projected tokens before the LLM; the strategy itself works at either stage.
    """

    def order_batch(self, contexts: Sequence[TokenContext]) -> list[Tensor]:
        dist = 1.0 - stacked_similarities(contexts)
        return list(farthest_point_order(dist, most_isolated(dist), contexts[0].keep))

    def scores(self, ctx: TokenContext) -> Tensor:
        """Each token's cosine distance to the tokens picked before it, in the greedy order over all tokens."""
        dist = cosine_distances(ctx.features)
        return pick_distances(dist, farthest_point_order(dist, most_isolated(dist), ctx.num_tokens)).float()
