"""Matryoshka (M3) nested average pooling of one token grid (Cai et al., ICLR 2025).

M3 represents an image at several nested granularities by average-pooling its raster grid of
projected tokens with non-overlapping square windows: on LLaVA-1.5's 24 x 24 grid the trained
scales 576 / 144 / 36 / 9 / 1 use windows of 1 / 2 / 4 / 8 / 24 tokens. Pooling *merges* tokens:
each output is a new vector, the mean of a window, placed at that window's position. The gains
need M3-finetuned weights; on vanilla weights this is the training-free pooling baseline.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

#: The token counts M3 was trained with on LLaVA-1.5's 24 x 24 grid.
M3_SCALES = (576, 144, 36, 9, 1)


def valid_scales(grid: tuple[int, int]) -> list[int]:
    """Token counts :func:`pool_grid` accepts for ``grid``, ascending: ``s * s`` for each ``s`` dividing h = w.

    Empty when the grid is not square (M3 pools square grids only).
    """
    h, w = grid
    if h != w or h < 1:
        return []
    return [s * s for s in range(1, h + 1) if h % s == 0]


def pool_grid(features: Tensor, grid: tuple[int, int], scale: int) -> tuple[Tensor, Tensor]:
    """Average-pool one raster-ordered ``grid`` of tokens ``features`` (h·w, C) down to ``scale`` tokens.

    The window is ``p = int(sqrt(h·w / scale))`` tokens a side, non-overlapping, as in M3; the
    output (scale, C) is in raster order of the pooled grid. Only the cases M3 defines exactly are
    accepted: a square grid (h == w) and a square ``scale`` whose side divides h, so the windows
    tile the grid (see :func:`valid_scales`, and :func:`nearest_scale` to round a budget to one).
    ``scale == h·w`` returns the tokens unchanged.

    The second return value (scale, 2) float32 is each pooled token's (row, col) position in the
    original grid, in token units with token (i, j) at (i, j): the centre of its window, i.e. the
    mean of its source tokens' coordinates, the same mean that made its features. It serves
    drawing (pixel centre = (coord + 0.5) · patch size) and positional encodings alike (round it,
    or divide by ``p`` for the pooled grid's own integer coordinates).
    """
    h, w = grid
    if features.ndim != 2 or features.shape[0] != h * w:
        raise ValueError(f"features must be (h*w, C) = ({h * w}, C) for grid {grid}, got {tuple(features.shape)}")
    if h != w:
        raise ValueError(f"M3 pooling needs a square grid, got {h} x {w}")
    if scale not in valid_scales(grid):
        raise ValueError(
            f"scale {scale} does not tile a {h} x {w} grid: it must be a square whose side divides {h}, "
            f"one of {valid_scales(grid)} (nearest_scale rounds a budget to one)"
        )
    side = math.isqrt(scale)
    window = h // side  # == int(sqrt(h * w / scale)), exact here
    image = features.T.reshape(1, -1, h, w)  # (1, C, h, w): avg_pool2d pools the last two dims
    pooled = F.avg_pool2d(image, window)[0].flatten(1).T.contiguous()
    centres = torch.arange(side, dtype=torch.float32, device=features.device) * window + (window - 1) / 2
    positions = torch.cartesian_prod(centres, centres).reshape(scale, 2)
    return pooled, positions


def nearest_scale(grid: tuple[int, int], count: int, scales: Iterable[int] | None = None) -> int:
    """The valid :func:`pool_grid` scale for ``grid`` nearest to a budget of ``count`` tokens.

    Nearest in token count (``|scale - count|``); a tie goes to the larger scale, which keeps more
    of the image. ``scales`` restricts the choice, e.g. to :data:`M3_SCALES` for the trained M3
    checkpoints (whose untrained scales such as 16 or 64 are valid pooling but out of distribution).
    Raises ValueError when nothing qualifies, e.g. for a non-square grid.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    allowed = valid_scales(grid)
    if scales is not None:
        wanted = tuple(scales)
        allowed = [s for s in allowed if s in wanted]
    if not allowed:
        among = "" if scales is None else f" among {wanted}"
        raise ValueError(f"no M3 pooling scale for grid {grid}{among}; valid scales: {valid_scales(grid)}")
    return min(allowed, key=lambda s: (abs(s - count), -s))
