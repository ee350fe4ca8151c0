"""Greedy diversity building blocks shared by DivPrune, ToDRE and the zeroth-order method."""

from __future__ import annotations

import torch
from torch import Tensor

#: Floor on row norms so zero rows get cosine 0 to everything (distance 1) instead of NaN.
_NORM_EPS = 1e-12


def cosine_similarities(features: Tensor) -> Tensor:
    """(N, N) matrix of ``cos(x_i, x_j)`` in float64."""
    # float64: greedy max-min meets near-ties; the parity cases are reproduced exactly in float64.
    x = features.to(torch.float64)
    unit = x / x.norm(dim=1, keepdim=True).clamp_min(_NORM_EPS)
    return unit @ unit.T


def cosine_distances(features: Tensor) -> Tensor:
    """(N, N) matrix of ``1 - cos(x_i, x_j)`` in float64."""
    return 1.0 - cosine_similarities(features)


def most_isolated(dist: Tensor) -> int:
    """The token whose nearest neighbour is farthest: ``argmax_j min_{i != j} d(i, j)`` (first on ties)."""
    # The diagonal is "distance to itself", excluded from the nearest-neighbour minimum.
    return int(dist.clone().fill_diagonal_(float("inf")).min(dim=1).values.argmax())


def farthest_point_order(dist: Tensor, first: int, count: int) -> Tensor:
    """Greedy k-center: start at ``first``, then repeatedly the token farthest from the chosen set.

    A running min-distance vector keeps it O(count·N); chosen tokens are masked with -inf so exact
    duplicates are never picked twice; ties go to the lower index (``argmax``).
    """
    picks = [first]
    to_set = dist[first].clone()
    to_set[first] = -torch.inf
    for _ in range(count - 1):
        j = int(to_set.argmax())
        picks.append(j)
        torch.minimum(to_set, dist[j], out=to_set)
        to_set[j] = -torch.inf
    return torch.tensor(picks, dtype=torch.int64)


def pick_distances(dist: Tensor, order: Tensor) -> Tensor:
    """(N,) for a full greedy order, each token's distance to the tokens picked before it (max-min's gain).

    Farthest-point gains never grow along the order; the first pick, which has no predecessor, gets the
    second's, so the score is non-increasing in pick order.
    """
    n = order.numel()
    ranked = dist[order][:, order]
    ranked = ranked.masked_fill(torch.ones(n, n, dtype=torch.bool, device=dist.device).triu(), torch.inf)
    gains = ranked.min(dim=1).values
    gains[0] = gains[1] if n > 1 else 1.0
    score = torch.empty(n, dtype=torch.float64, device=dist.device)
    score[order] = gains
    return score
