"""LLaVA family: LLaVA-1.5, LLaVA-NeXT (AnyRes + newline tokens), LLaVA-OneVision (adds video)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from torch import Tensor, nn

from ..vocabulary.grids import Grid, Segment
from .base import ModelAdapter

if TYPE_CHECKING:
    from ..engine.state import VisualItem


class LlavaAdapter(ModelAdapter):
    """1-D RoPE positions; features are projector outputs, packed per image by AnyRes on NeXT/OneVision."""

    model_classes = (
        "LlavaForConditionalGeneration",
        "LlavaNextForConditionalGeneration",
        "LlavaOnevisionForConditionalGeneration",
    )

    def grids(self, items: list[VisualItem], positions: Tensor) -> list[Grid]:
        # LLaVA-1.5 images are one square grid; AnyRes packing (base tile + unpadded tiles + newlines)
        # and OneVision videos are not one raster grid, so strategies get no grid for them.
        if type(self.model).__name__ != "LlavaForConditionalGeneration":
            return [None] * len(items)
        sizes = [item.columns.numel() for item in items]
        return [(1, math.isqrt(n), math.isqrt(n)) if math.isqrt(n) ** 2 == n else None for n in sizes]

    def projector_module(self) -> nn.Module:
        return self.inner.multi_modal_projector

    def cls_attention_layer(self) -> nn.Module | None:
        # The layer whose output the projector reads (hidden_states[k] is the output of layers[k] for k < 0).
        # Only LLaVA-1.5 maps one tower pass to one image's tokens; SigLIP towers have no [CLS].
        layer = self.model.config.vision_feature_layer
        tower = self.inner.vision_tower
        encoder = getattr(getattr(tower, "vision_model", tower), "encoder", None)  # nesting varies by version
        if type(self.model).__name__ != "LlavaForConditionalGeneration" or not isinstance(layer, int) or layer >= 0:
            return None
        if encoder is None or getattr(self.model.config.vision_config, "model_type", "") != "clip_vision_model":
            return None
        if len(encoder.layers) + layer < 0:  # the projector reads the patch embeddings: no attention before them
            return None
        return encoder.layers[layer].self_attn

    def segments(self, item: VisualItem) -> tuple[Segment, ...] | None:
        if item.newline is None:
            return None
        vision = self.model.config.vision_config
        return anyres_segments(item.newline, vision.image_size // vision.patch_size)

    def newline_embedding(self) -> Tensor | None:
        return getattr(self.inner, "image_newline", None)


def anyres_segments(newline: Tensor, side: int) -> tuple[Segment, ...] | None:
    """The grids of one LLaVA-NeXT / OneVision item, read off its newline tokens (``newline``: (N,) bool).

    A base tile of side ``side`` (the vision grid), then, for tiled images, an unpadded h x w grid with a
    newline after each row; a single tile or OneVision's pooled video frames end with one newline instead.
    None when the item has no newline or a packing this does not recognise.
    """
    if not bool(newline.any()):
        return None
    n, newlines = newline.numel(), newline.nonzero()[:, 0].tolist()
    base = side * side
    if newlines == [n - 1]:
        frame = math.ceil(side / 2)  # OneVision pools video frames 2x2
        if n - 1 == base:
            return (Segment(0, (1, side, side)),)
        if (n - 1) % (frame * frame) == 0:
            return (Segment(0, ((n - 1) // (frame * frame), frame, frame)),)
        return None
    width = newlines[0] - base
    rows = len(newlines)
    if width < 1 or newlines != [base + (r + 1) * (width + 1) - 1 for r in range(rows)] or n != newlines[-1] + 1:
        return None
    return (Segment(0, (1, side, side)), Segment(base, (1, rows, width), row_newlines=True))
