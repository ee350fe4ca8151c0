"""``divprune``: max-min diversity selection (DivPrune, Alvar et al., CVPR 2025)."""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import register_strategy
from .base import GreedyStrategy, TokenContext

#: Floor on row norms so zero rows get cosine 0 to everything (distance 1) instead of NaN.
_NORM_EPS = 1e-12


def cosine_distances(features: Tensor) -> Tensor:
    """(N, N) matrix of ``1 - cos(x_i, x_j)`` in float64."""
    # float64: greedy max-min meets near-ties; the parity cases are reproduced exactly in float64.
    x = features.to(torch.float64)
    unit = x / x.norm(dim=1, keepdim=True).clamp_min(_NORM_EPS)
    return 1.0 - unit @ unit.T


@register_strategy("divprune")
class DivPrune(GreedyStrategy):
    """Greedy max-min diversity over the cosine distance ``d = 1 - cos``.

    1. First pick: the most isolated token, ``argmax_j min_{i != j} d(i, j)``.
    2. Then repeatedly the token farthest from the chosen set, ``argmax_j min_{i in S} d(i, j)``.

    Ties go to the lower index (``argmax``), as in the reference code. Unlike the reference loop,
    chosen tokens are masked, so exact duplicate rows never make an index come out twice. A
    running min-distance vector makes the loop O(kN) after the O(N^2 D) distance matrix (the
    reference re-gathers every chosen row each step). The paper acts on the projected tokens
    before the LLM; the strategy itself works at either stage.
    """

    def order(self, ctx: TokenContext) -> Tensor:
        dist = cosine_distances(ctx.features)
        # The diagonal is "distance to itself", excluded from the nearest-neighbour minimum.
        nearest = dist.clone().fill_diagonal_(float("inf")).min(dim=1).values
        first = int(nearest.argmax())
        picks = [first]
        # min distance from each token to the chosen set; -inf marks chosen tokens so argmax skips them.
        to_set = dist[first].clone()
        to_set[first] = -torch.inf
        for _ in range(ctx.keep - 1):
            j = int(to_set.argmax())
            picks.append(j)
            torch.minimum(to_set, dist[j], out=to_set)
            to_set[j] = -torch.inf
        return torch.tensor(picks, dtype=torch.int64)
