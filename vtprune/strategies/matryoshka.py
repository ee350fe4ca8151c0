"""``matryoshka``: M3's nested average pooling of each token grid (Matryoshka Multimodal Models, ICLR 2025)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError
from ..vocabulary.grids import Segment
from .base import MergingStrategy, TokenContext
from .options import Option
from .pooling import nearest_scale, pool_grid, valid_scales
from .registry import register_strategy


@register_strategy("matryoshka")
class Matryoshka(MergingStrategy):
    """Average-pool each grid of projected tokens with non-overlapping windows.

    - Square grids (LLaVA-1.5's 24 x 24): exactly M3 — the budget is rounded to the nearest scale
      whose side divides the grid (576 / 144 / 36 / 9 / 1 on 24 x 24, plus 64, 16, 4 which are valid
      pooling but were not trained); ``scales=(576, 144, 36, 9, 1)`` restricts the choice to the
      trained ones, as M3-finetuned checkpoints want. On vanilla weights this is the training-free
      pooling baseline (it collapses at small scales: that is the point of comparing with it).
    - AnyRes (LLaVA-NeXT / OneVision): M3 pools every crop with the same window before the AnyRes
      merge. Here the window comes from the base tile's scale and is applied to the base tile and
      to the unpadded high-res grid alike; each pooled row of the high-res grid keeps one newline
      (the one ending its last source row), as if the newlines had been added after pooling. The
      budget is therefore tokens per crop, as in M3 — the total grows with the number of crops.
    - Dynamic grids (Qwen, any h x w, video frames): a square window ``p = round(sqrt(h·w/keep))``;
      windows at the right and bottom edges may be partial and average the tokens they cover
      (documented extension: M3 defines square grids only).
    Each pooled token takes the place — sequence slot and original position id (1-D or M-RoPE) — of
    its window's top-left token; the record lists those tokens. Tokens outside every grid (a
    trailing newline) are kept as they are.
    """

    scales = Option(int, at_least=1, many=True, optional=True)

    def __init__(self, scales: tuple[int, ...] | None = None) -> None:
        self.scales = scales

    def merge(self, ctx: TokenContext) -> tuple[Tensor, Tensor]:
        segments = ctx.segments or ((Segment(0, ctx.grid),) if ctx.grid is not None else None)
        if segments is None:
            raise InputError(
                "matryoshka pools a token grid and this image has none: pass grid=(t, h, w) to vtprune.select. "
                "Inside a model the engine supplies it before the LLM, but not after an earlier stage removed "
                "tokens or for a packing vtprune does not recognise"
            )
        n = ctx.num_tokens
        window = self._window(segments[0].grid, ctx.keep)
        places, rows = [], []
        covered = torch.zeros(n, dtype=torch.bool)
        for segment in segments:
            cells = segment.cells()
            covered[cells] = True
            local_places, local_weights = self._pool(segment.grid, window)
            weights = torch.zeros(len(local_places), n)
            weights[:, cells] = local_weights
            places.append(cells[local_places])
            rows.append(weights)
            if segment.row_newlines:
                last_rows = [
                    min(segment.grid[1], start + window[0]) - 1 for start in range(0, segment.grid[1], window[0])
                ]
                newlines = torch.tensor([segment.newline_after(row) for row in last_rows])
                covered[[segment.newline_after(row) for row in range(segment.grid[1])]] = True
                places.append(newlines)
                rows.append(torch.eye(n)[newlines])
        leftover = (~covered).nonzero()[:, 0]
        places.append(leftover)
        rows.append(torch.eye(n)[leftover])
        places_all = torch.cat(places)
        order = places_all.argsort()
        return places_all[order], torch.cat(rows)[order]

    def _window(self, grid: tuple[int, int, int], keep: int) -> tuple[int, int]:
        t, h, w = grid
        if t == 1 and valid_scales((h, w)):
            side = h // math.isqrt(nearest_scale((h, w), keep, self.scales))
            return side, side
        side = max(1, round(math.sqrt(h * w / keep)))
        return min(side, h), min(side, w)

    @staticmethod
    def _pool(grid: tuple[int, int, int], window: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """(top-left cell of each window, (windows, cells) averaging weights) for one grid."""
        t, h, w = grid
        # Pooling the identity gives each pooled token's averaging weights over the cells.
        identity = torch.eye(t * h * w)
        if t == 1 and h == w and h % window[0] == 0 and window[0] == window[1]:
            weights, _ = pool_grid(identity, (h, w), (h // window[0]) ** 2)  # exactly M3
        else:
            frames = torch.split(identity.T.reshape(1, -1, t * h, w), h, dim=2)
            kernel = (min(window[0], h), min(window[1], w))
            # ceil_mode keeps partial edge windows, each averaged over the cells it covers.
            weights = torch.cat([F.avg_pool2d(f, kernel, ceil_mode=True)[0].flatten(1).T for f in frames])
        rows, cols = torch.arange(0, h, window[0]), torch.arange(0, w, window[1])
        top_left = (rows[:, None] * w + cols[None, :]).flatten()
        return (torch.arange(t)[:, None] * h * w + top_left[None, :]).flatten(), weights
