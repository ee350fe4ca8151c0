"""``uniform``: spatially even subsampling of the token grid (the uniform/spatial baseline)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import Strategy, TokenContext
from .registry import register_strategy


def _evenly_spaced(count: int, total: int) -> Tensor:
    """``count`` unique ascending positions in ``range(total)``, at the centres of equal bins.

    Position i is ``floor((i + 0.5) * total / count)``. For ``count <= total`` consecutive
    centres are at least one apart, so the floors never collide and no de-duplication is needed.
    """
    return ((torch.arange(count, dtype=torch.float64) + 0.5) * (total / count)).floor().to(torch.int64)


def _lattice_shape(per_frame: int, h: int, w: int) -> tuple[int, int]:
    """Rows and columns of the smallest lattice with aspect close to h:w and >= ``per_frame`` points."""
    rows = min(h, math.ceil(math.sqrt(per_frame * h / w)))
    cols = min(w, math.ceil(per_frame / rows))
    # Refit rows to the columns: adds rows when cols was clamped to w, drops a surplus row otherwise.
    rows = min(h, math.ceil(per_frame / cols))
    return rows, cols


@register_strategy("uniform")
class UniformPruning(Strategy):
    """Keep tokens spread evenly over the image, ignoring their content.

    With ``ctx.grid = (t, h, w)`` and ``t * h * w == N`` (raster order, frame by frame), every
    frame gets the same lattice of ``rows x cols`` points, with ``rows * cols * t >= keep`` and
    ``rows : cols`` close to ``h : w``; the points sit at the centres of equal bins
    (``floor((i + 0.5) * h / rows)``), so ``keep = h * w / 4`` on an even square grid is every
    second row and column. When the lattice has more than ``keep`` points, an evenly spaced subset
    of its points (in raster order) is kept, so exactly ``keep`` tokens come out.

    AnyRes images (``ctx.segments``: a base tile and a high-res grid): the budget is shared between
    the grids in proportion to their sizes (largest remainders), each gets its own lattice, and
    newline tokens are not kept. Fallback: without a grid, or when the grid does not describe the N
    tokens, the tokens are treated as a 1-D sequence and ``keep`` evenly spaced positions in token
    order are kept.
    """

    def select(self, ctx: TokenContext) -> Tensor:
        n, keep = ctx.num_tokens, ctx.keep
        if ctx.segments is not None:
            cells = [segment.cells() for segment in ctx.segments]
            if keep <= sum(len(c) for c in cells):
                shares = _shares(keep, [len(c) for c in cells])
                picks = [c[_lattice(segment.grid, k)] for segment, c, k in zip(ctx.segments, cells, shares) if k]
                return torch.cat(picks).sort().values
        if ctx.grid is None or math.prod(ctx.grid) != n:
            return _evenly_spaced(keep, n)
        return _lattice(ctx.grid, keep)


def _shares(keep: int, sizes: list[int]) -> list[int]:
    """``keep`` split in proportion to ``sizes`` by largest remainders (sums to ``keep``, each <= its size)."""
    total = sum(sizes)
    exact = [keep * size / total for size in sizes]
    shares = [math.floor(x) for x in exact]
    for i in sorted(range(len(sizes)), key=lambda i: shares[i] - exact[i])[: keep - sum(shares)]:
        shares[i] += 1
    return shares


def _lattice(grid: tuple[int, int, int], keep: int) -> Tensor:
    """``keep`` indices of an evenly spread lattice over a raster (t, h, w) grid."""
    t, h, w = grid
    rows, cols = _lattice_shape(math.ceil(keep / t), h, w)
    ys, xs = _evenly_spaced(rows, h), _evenly_spaced(cols, w)
    frame_offsets = torch.arange(t, dtype=torch.int64) * (h * w)
    # Raster order (frame, row, col) keeps the lattice indices ascending.
    lattice = (frame_offsets[:, None, None] + ys[None, :, None] * w + xs[None, None, :]).flatten()
    return lattice[_evenly_spaced(keep, lattice.numel())]
