"""Greedy maximum coverage: MMTok's selection loop, for a whole group of images at once.

The objective of a non-negative (R, N) matrix ``W`` is ``f(S) = sum_r max_{j in S} W[r, j]`` (0 for the empty set),
monotone submodular. The greedy adds, each step, the column with the largest marginal gain
``sum_r max(0, W[r, j] - best_r)``, where ``best_r`` is row r's maximum over the columns chosen so far (the authors'
formula); ties go to the lower index; a chosen column is never chosen again, even when every gain is 0.

Two loops compute that same greedy:

- on an accelerator, every column's gain is evaluated every step (two passes over the matrix, as the paper's loop),
  in a fixed number of kernel launches for the whole group and without reading anything back to the host;
- on a CPU, each column's gain is kept in a float64 running total and only the rows a pick raises are visited
  (Minoux's lazy greedy keeps stale gains as upper bounds; here every gain is kept up to date instead). A pick
  raises a row only when it covers it better than every earlier pick, so after the first few steps a step touches a
  small share of the rows: O(N·R) for the first step and far less for each later one, against O(N·R) per step.

The picks agree wherever float32 can tell the gains apart. Gains within :data:`TIE_TOLERANCE` of the largest are ties
for the CPU loop (exact duplicates among them, whose float64 totals may differ in the last bit), which goes to the
lower index; closer than float32's resolution (about 1e-7 of the gain), the dense loop's pick follows its rounding,
the CPU loop's the gains' true order.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Relative to the largest gain of the first step (no gain is ever larger), the gap under which two float64 running
#: gains are a tie. Far above their drift (a few 1e-16 per step), far below float32 weights' resolution.
TIE_TOLERANCE = 1e-11

#: Rows of the matrix converted to float64 at a time, which bounds the scratch memory at (block, N).
_BLOCK = 256


def coverage_order(weights: Tensor, count: int) -> Tensor:
    """Greedy maximum coverage of the rows of ``weights`` (..., R, N) by ``count`` of its N columns: (..., count)."""
    if not updates_gains_incrementally(weights.device):
        return dense_coverage_order(weights, count)
    matrices = weights.reshape(-1, *weights.shape[-2:])
    picks = [incremental_coverage_order(matrix, count) for matrix in matrices]
    return torch.stack(picks).reshape(*weights.shape[:-2], count)


def updates_gains_incrementally(device: torch.device) -> bool:
    """Whether :func:`coverage_order` keeps running gains and visits only the rows a pick raises (on a CPU).

    Finding those rows reads their count back to the host each step, which an accelerator would wait for; there
    every gain is evaluated every step instead."""
    return device.type == "cpu"


def dense_coverage_order(weights: Tensor, count: int) -> Tensor:
    """The greedy, every column's gain evaluated every step: eight tensor ops per step for the whole group of
    matrices (the leading dimensions), nothing read back to the host. O(count·R·N) per matrix.

    The columns are copied once into the rows of an (..., N, R) matrix (:func:`dense_coverage_order_of_columns`).
    """
    return dense_coverage_order_of_columns(weights.mT.contiguous(), count)


def dense_coverage_order_of_columns(columns: Tensor, count: int) -> Tensor:
    """:func:`dense_coverage_order` of the matrices whose columns are the contiguous rows of ``columns`` (..., N, R).

    Each column's gain is summed along its contiguous row: every column is then summed in the same order, so exact
    duplicates tie exactly and go to the lower index (summed down the columns of an (R, N) matrix, a column's
    rounding depends on its position). A caller that builds the matrices in this layout (MMTok, a group at a time)
    holds no (R, N) copy besides: the loop needs ``columns`` and one buffer like it.
    """
    best = columns.new_zeros(columns.shape[:-2] + columns.shape[-1:])
    taken = torch.zeros(columns.shape[:-1], dtype=torch.bool, device=columns.device)
    terms = torch.empty_like(columns)  # one buffer reused by every step
    picks = []
    for _ in range(count):
        gain = torch.sub(columns, best[..., None, :], out=terms).clamp_min_(0).sum(dim=-1)
        j = gain.masked_fill_(taken, -torch.inf).argmax(dim=-1)
        picks.append(j)
        taken.scatter_(-1, j[..., None], True)
        column = columns.gather(-2, j[..., None, None].expand(*j.shape, 1, columns.shape[-1])).squeeze(-2)
        torch.maximum(best, column, out=best)
    return torch.stack(picks, dim=-1)


def incremental_coverage_order(weights: Tensor, count: int) -> Tensor:
    """The greedy for one (R, N) matrix with running float64 gains: (count,).

    Picking column p raises ``best_r`` from ``lo`` to ``hi = W[r, p]`` on the rows it covers better, and lowers
    every column j's gain by ``clamp(W[r, j] - lo, 0, hi - lo)`` on each of them; no other row changes any gain.
    """
    gains = weights.new_zeros(weights.shape[1], dtype=torch.float64)  # the empty set's: the column sums
    for block in torch.split(weights, _BLOCK):
        gains += block.sum(dim=0, dtype=torch.float64)
    tolerance = TIE_TOLERANCE * float(gains.max())
    best = weights.new_zeros(weights.shape[0])
    picks = torch.empty(count, dtype=torch.long)
    for step in range(count):
        near_best = gains >= gains.max() - tolerance
        pick = int(near_best.to(torch.uint8).argmax())  # the lowest index among the ties
        picks[step] = pick
        gains[pick] = -torch.inf  # never chosen again; no update brings it back
        column = weights[:, pick]
        for rows in torch.split((column > best).nonzero()[:, 0], _BLOCK):
            raised = column[rows]
            lo, hi = best[rows].double()[:, None], raised.double()[:, None]
            lowered = weights[rows].double().sub_(lo).clamp_(min=0)
            gains -= torch.minimum(lowered, hi - lo, out=lowered).sum(dim=0)
            best[rows] = raised
    return picks
