"""Greedy diversity building blocks shared by DivPrune, ToDRE and the zeroth-order method.

The greedy loops run a whole group of images at once: matrices are (..., N, N) with any leading
batch dimensions, per-image picks are (...) index tensors, and each step is a constant handful of
tensor ops for the group (no Python work per token or per image, no host synchronisation: nothing
in a loop reads a value back). Every op in a loop is elementwise, a min/max or an argmax, so a
group gets bit for bit the picks each image gets alone.

Distances are float32 by default (:data:`PRECISIONS`): the authors' DivPrune code runs in the
model's dtype, and its float32 picks (tests/data/parity) are reproduced exactly in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import TokenContext

#: The dtypes distances can be computed in, by name (a strategy option).
PRECISIONS = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: Floor on row norms so zero rows get cosine 0 to everything (distance 1) instead of NaN.
_NORM_EPS = 1e-12

#: Rows of the Gram matrix rescaled at a time: bounds the scratch memory at (block, N).
_BLOCK = 256


def precision_dtype(name: str) -> torch.dtype:
    """The dtype named ``name`` (one of :data:`PRECISIONS`)."""
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {name!r}")
    return PRECISIONS[name]


def cosine_similarities(features: Tensor, dtype: torch.dtype = torch.float32, out: Tensor | None = None) -> Tensor:
    """(N, N) matrix of ``cos(x_i, x_j)`` in ``dtype``, exactly symmetric; written into ``out`` when given.

    float32 / float64: the Gram matrix, its upper block triangle multiplied and mirrored, divided in
    place, a block of rows at a time, by the outer product of the row norms, so the only N x N buffer
    is the result (no normalised copy of the features). The self-cosines that division leaves a few
    ulps above or below 1 are set to exactly 1, and so is every entry equal to the self-cosine of its
    row or column among tokens of bit-equal norms: an exact duplicate of a token has the same norm and
    the same dot products in the same call, so duplicates get cosine exactly 1 (distance exactly 0) to
    each other and tie exactly (ties go to the lower index instead of following the sign of rounding
    noise). Only the rows that share a norm value are compared, so tokens without duplicates cost no
    pass over the matrix on a CPU (the comparison over all of it was a quarter of this function at 2880 x 1024).
    Half precision: the reference's own steps (normalise
    the rows in ``dtype``, then multiply), which reproduce its picks on fp16 / bf16 models and cannot
    overflow float16 as a Gram matrix of large-norm tokens would. Zero rows get cosine 0 to everything
    (themselves included) instead of NaN.
    """
    floor = max(_NORM_EPS, torch.finfo(dtype).tiny)  # float16 cannot hold 1e-12
    x = features.to(dtype)
    if dtype.itemsize < 4:
        unit = x / x.norm(dim=1, keepdim=True).clamp_min(floor)
        return torch.mm(unit, unit.T, out=out)
    norms = x.norm(dim=1).clamp_min(floor)
    n = x.shape[0]
    gram = torch.empty(n, n, dtype=dtype, device=x.device) if out is None else out
    for start in range(0, n, _BLOCK):
        block = slice(start, start + _BLOCK)
        # The block row from the diagonal on is multiplied; left of the diagonal is the transpose of blocks made
        # earlier: half the multiply-adds of the full product, and the matrix exactly symmetric.
        torch.mm(x[block], x[start:].T, out=gram[block, start:])
        gram[start + _BLOCK :, block] = gram[block, start + _BLOCK :].T
    for start in range(0, n, _BLOCK):
        gram[start : start + _BLOCK].div_(norms[start : start + _BLOCK, None] * norms)
    _snap_duplicates(gram, norms)
    return gram


def _snap_duplicates(cosines: Tensor, norms: Tensor) -> None:
    """Set to exactly 1, in place, each self-cosine and every entry equal to the self-cosine of its row or column
    among tokens whose norms are equal bit for bit (zero rows excepted: they stay at cosine 0).

    Exact duplicates have bit-equal norms (one reduction per row), so on a CPU only the rows that share a norm value
    are compared: no pass over the N x N matrix, and none at all for tokens without duplicates. Finding those rows
    reads their count back to the host, which an accelerator would wait for; there every entry is compared (a few
    fast passes), so that nothing in the selection reads back."""
    itself = cosines.diagonal()
    nonzero = itself != 0
    if compares_shared_norms_only(cosines.device):
        _, group, counts = torch.unique(norms, return_inverse=True, return_counts=True)
        shared = ((counts[group] > 1) & nonzero).nonzero()[:, 0]
        if shared.numel():
            block = cosines[shared[:, None], shared]  # a copy; its diagonal holds the rows' self-cosines
            own = block.diagonal()
            same_norm = group[shared][:, None] == group[shared]
            block.masked_fill_(same_norm & ((block == own[:, None]) | (block == own)), 1.0)
            cosines[shared[:, None], shared] = block
    else:
        own = itself.masked_fill(~nonzero, torch.nan)  # zero rows match nothing
        for start in range(0, cosines.shape[0], _BLOCK):
            rows = cosines[start : start + _BLOCK]
            same_norm = norms[start : start + _BLOCK, None] == norms
            rows.masked_fill_(same_norm & ((rows == own[start : start + _BLOCK, None]) | (rows == own)), 1.0)
    itself.masked_fill_(nonzero, 1.0)


def compares_shared_norms_only(device: torch.device) -> bool:
    """Whether :func:`_snap_duplicates` compares only the rows that share a norm value (on a CPU)."""
    return device.type == "cpu"


def cosine_distances(features: Tensor, dtype: torch.dtype = torch.float32, out: Tensor | None = None) -> Tensor:
    """(N, N) matrix of ``1 - cos(x_i, x_j)`` in ``dtype`` (in place over :func:`cosine_similarities`)."""
    return cosine_similarities(features, dtype, out).neg_().add_(1.0)


def stacked_cosines(contexts: Sequence[TokenContext], dtype: torch.dtype, distances: bool) -> Tensor:
    """(B, N, N) cosine distances (or similarities) of each image's features, for a group of images.

    Built image by image into one buffer: a batched matmul may sum in another order than one
    image's (small sizes take another kernel), and the greedy meets near-ties, so the group must
    see exactly the matrices each image gets alone.
    """
    n = contexts[0].num_tokens
    out = torch.empty(len(contexts), n, n, dtype=dtype, device=contexts[0].features.device)
    build = cosine_distances if distances else cosine_similarities
    for image, ctx in enumerate(contexts):
        build(ctx.features, dtype, out=out[image])
    return out


def memory_groups(
    contexts: Sequence[TokenContext], bytes_per_image: int, transient_bytes: int = 0
) -> list[Sequence[TokenContext]]:
    """On a CPU, the group cut into runs whose working matrices (``bytes_per_image`` each), plus
    ``transient_bytes`` held once while they are made, together take no more memory than one image's reference
    formulation does (a normalised float32 copy of the tokens and a float32 N x N matrix); at least one image a
    run. On an accelerator the group stays whole: its loop is launch-bound and its memory is large.

    Tokens that are not float32 (the context keeps the model's dtype) are converted by both, one image at a time:
    the reference's ``.to(float32)`` lives next to its normalised copy, ours while one image's matrix is made
    (:func:`cosine_similarities`) or is itself the normalised copy (MMTok's unit rows), so it is counted on
    neither side."""
    if contexts[0].features.device.type != "cpu":
        return [contexts]
    n, width = contexts[0].features.shape
    size = max(1, ((n * width + n * n) * 4 - transient_bytes) // bytes_per_image)
    return [contexts[start : start + size] for start in range(0, len(contexts), size)]


def matrix_bytes(contexts: Sequence[TokenContext], dtype: torch.dtype) -> int:
    """Bytes of one image's N x N matrix in ``dtype``."""
    return contexts[0].num_tokens ** 2 * dtype.itemsize


def rows(matrix: Tensor, index: Tensor) -> Tensor:
    """Row ``index[b]`` of each image's matrix: (..., N, N) and (...) -> (..., N)."""
    return matrix.gather(-2, index[..., None, None].expand(*index.shape, 1, matrix.shape[-1])).squeeze(-2)


def most_isolated(matrix: Tensor, similarities: bool = False) -> Tensor:
    """(...) per image the token whose nearest neighbour is farthest, ``argmax_j min_{i != j} d(i, j)``
    (first on ties), from cosine distances or, with ``similarities``, cosine similarities.

    From similarities the nearest distance is ``1 - max_{i != j} cos(i, j)``, the same number
    (``1 - x`` rounds monotonically). The diagonal ("distance to itself") is excluded in place and
    restored, so no N x N mask or copy is made.
    """
    diagonal = matrix.diagonal(dim1=-2, dim2=-1)
    itself = diagonal.clone()
    diagonal.fill_(-torch.inf if similarities else torch.inf)
    nearest = 1.0 - matrix.amax(dim=-1) if similarities else matrix.amin(dim=-1)
    diagonal.copy_(itself)
    return nearest.argmax(dim=-1)


def farthest_point_order(dist: Tensor, first: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """Greedy k-center per image: start at ``first``, then repeatedly the token farthest from the chosen set.

    ``dist`` (..., N, N), ``first`` (...) -> (picks, gains), both (..., count); ``gains[t]`` is pick
    t's distance to the picks before it (max-min's gain; inf for the first). A running min-distance
    vector keeps it O(count·N) per image; chosen tokens are masked with -inf so exact duplicates
    are never picked twice; ties go to the lower index (``max`` returns the first maximum).
    """
    picks, gains = [first], [torch.full_like(dist[..., 0, 0], torch.inf)]
    to_set = rows(dist, first)
    to_set.scatter_(-1, first[..., None], -torch.inf)
    for _ in range(count - 1):
        gain, j = to_set.max(dim=-1)
        picks.append(j)
        gains.append(gain)
        torch.minimum(to_set, rows(dist, j), out=to_set)
        to_set.scatter_(-1, j[..., None], -torch.inf)
    return torch.stack(picks, dim=-1), torch.stack(gains, dim=-1)


def max_min_order(dist: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """DivPrune's greedy max-min diversity: :func:`farthest_point_order` from the :func:`most_isolated` token."""
    return farthest_point_order(dist, most_isolated(dist), count)


def order_scores(order: Tensor, gains: Tensor) -> Tensor:
    """(N,) float32 for a full greedy order over one image's N tokens: each token's gain when it was picked.

    Farthest-point gains never grow along the order; the first pick, which has no predecessor, gets
    the second's, so the score is non-increasing in pick order.
    """
    gains = gains.float()
    gains[0] = gains[1] if gains.numel() > 1 else 1.0
    score = torch.empty_like(gains)
    score[order] = gains
    return score
