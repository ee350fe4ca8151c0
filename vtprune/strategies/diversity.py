"""Greedy diversity building blocks shared by DivPrune, ToDRE and the zeroth-order method.

The greedy loops run a whole group of images at once: matrices are (..., N, N) with any leading
batch dimensions, per-image picks are (...) index tensors, and each step is a few tensor ops for
the group (no Python work per token or per image, no host synchronisation). Every op in a loop is
elementwise, a min/max or an argmax, so a group gets bit for bit the picks each image gets alone.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .base import TokenContext

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


def stacked_similarities(contexts: Sequence[TokenContext]) -> Tensor:
    """(B, N, N) float64 cosine similarities of each image's features, for a group of images.

    Built image by image: a batched matmul may sum in another order than one image's (small sizes
    take another kernel), and the greedy meets near-ties, so the group must see exactly the
    matrices each image gets alone.
    """
    return torch.stack([cosine_similarities(ctx.features) for ctx in contexts])


def rows(matrix: Tensor, index: Tensor) -> Tensor:
    """Row ``index[b]`` of each image's matrix: (..., N, N) and (...) -> (..., N)."""
    return matrix.gather(-2, index[..., None, None].expand(*index.shape, 1, matrix.shape[-1])).squeeze(-2)


def most_isolated(dist: Tensor) -> Tensor:
    """(...) per image the token whose nearest neighbour is farthest, ``argmax_j min_{i != j} d(i, j)``
    (first on ties)."""
    # The diagonal is "distance to itself", excluded from the nearest-neighbour minimum.
    itself = torch.eye(dist.shape[-1], dtype=torch.bool, device=dist.device)
    return dist.masked_fill(itself, torch.inf).min(dim=-1).values.argmax(dim=-1)


def farthest_point_order(dist: Tensor, first: Tensor, count: int) -> Tensor:
    """Greedy k-center per image: start at ``first``, then repeatedly the token farthest from the chosen set.

    ``dist`` (..., N, N), ``first`` (...) -> picks (..., count). A running min-distance vector keeps it
    O(count·N) per image; chosen tokens are masked with -inf so exact duplicates are never picked twice;
    ties go to the lower index (``argmax``).
    """
    picks = [first]
    to_set = rows(dist, first)
    to_set.scatter_(-1, first[..., None], -torch.inf)
    for _ in range(count - 1):
        j = to_set.argmax(dim=-1)
        picks.append(j)
        torch.minimum(to_set, rows(dist, j), out=to_set)
        to_set.scatter_(-1, j[..., None], -torch.inf)
    return torch.stack(picks, dim=-1)


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
