"""``matryoshka``: M3's nested average pooling of each token grid (Matryoshka Multimodal Models, ICLR 2025)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..pooling import nearest_scale, pool_grid, valid_scales
from .base import MergingStrategy, TokenContext
from .registry import register_strategy


@register_strategy("matryoshka")
class Matryoshka(MergingStrategy):
    """Average-pool each image's grid of projected tokens with non-overlapping windows.

    - Square grids (LLaVA-1.5's 24 x 24): exactly M3 — the budget is rounded to the nearest scale
      whose side divides the grid (576 / 144 / 36 / 9 / 1 on 24 x 24, plus 64, 16, 4 which are valid
      pooling but were not trained); ``scales=(576, 144, 36, 9, 1)`` restricts the choice to the
      trained ones, as M3-finetuned checkpoints want. On vanilla weights this is the training-free
      pooling baseline (it collapses at small scales: that is the point of comparing with it).
    - Dynamic grids (Qwen, any h x w and video frames): a square window ``p = round(sqrt(h·w/keep))``
      per frame; windows at the right and bottom edges may be partial and average the tokens they
      cover (documented extension: M3 defines square grids only).
    - AnyRes packing (LLaVA-NeXT / OneVision) has no single grid here; M3 pools each crop before the
      AnyRes merge, which vtprune does not reach: it raises.
    Each pooled token takes the place — sequence slot and original position id (1-D or M-RoPE) — of
    its window's top-left token; the record lists those tokens.
    """

    def __init__(self, scales: tuple[int, ...] | None = None) -> None:
        self.scales = None if scales is None else tuple(scales)

    def merge(self, ctx: TokenContext) -> tuple[Tensor, Tensor]:
        if ctx.grid is None:
            raise ValueError(
                "matryoshka pools a token grid; this image has none (AnyRes packing, or an earlier stage "
                "already removed tokens). Use it before the LLM on LLaVA-1.5 or Qwen-VL models"
            )
        t, h, w = ctx.grid
        # Pooling the identity gives each pooled token's averaging weights over the N tokens.
        identity = torch.eye(t * h * w, device=ctx.features.device)
        if t == 1 and valid_scales((h, w)):
            scale = nearest_scale((h, w), ctx.keep, self.scales)
            weights, _ = pool_grid(identity, (h, w), scale)
            window = (h // math.isqrt(scale),) * 2
        else:
            side = max(1, round(math.sqrt(h * w / ctx.keep)))
            window = (min(side, h), min(side, w))
            frames = identity.T.reshape(1, -1, t * h, w).split(h, dim=2)
            # ceil_mode keeps partial edge windows, each averaged over the tokens it covers.
            weights = torch.cat([F.avg_pool2d(f, window, ceil_mode=True)[0].flatten(1).T for f in frames])
        rows, cols = torch.arange(0, h, window[0]), torch.arange(0, w, window[1])
        top_left = (rows[:, None] * w + cols[None, :]).flatten()
        places = (torch.arange(t)[:, None] * h * w + top_left[None, :]).flatten()
        return places, weights

    def __repr__(self) -> str:
        return f"Matryoshka(scales={self.scales})"
