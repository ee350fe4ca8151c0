"""LLaVA family: LLaVA-1.5, LLaVA-NeXT (AnyRes + newline tokens), LLaVA-OneVision (adds video)."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from .base import Grid, ModelAdapter


class LlavaAdapter(ModelAdapter):
    """1-D RoPE positions; features are projector outputs, packed per image by AnyRes on NeXT/OneVision."""

    model_classes = (
        "LlavaForConditionalGeneration",
        "LlavaNextForConditionalGeneration",
        "LlavaOnevisionForConditionalGeneration",
    )

    def grids(self, modality: str, kwargs: dict[str, Any], sizes: list[int]) -> list[Grid]:
        # LLaVA-1.5 images are one square grid; AnyRes packing (base tile + unpadded tiles + newlines)
        # and OneVision videos are not one raster grid, so strategies get no grid for them.
        if type(self.model).__name__ != "LlavaForConditionalGeneration" or kwargs.get("image_sizes") is not None:
            return [None] * len(sizes)
        side = [math.isqrt(size) for size in sizes]
        return [(1, s, s) if s * s == size else None for s, size in zip(side, sizes)]

    def newline_embedding(self) -> Tensor | None:
        return getattr(self.inner, "image_newline", None)
