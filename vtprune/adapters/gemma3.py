"""Gemma 3 (4B and up, with SigLIP vision): one square raster of average-pooled tokens per image.

The projector average-pools the S/p x S/p SigLIP patches to ``mm_tokens_per_image`` tokens (a k x k block
each), then normalises and projects them; the model scatters all images' tokens over the placeholders in
order. Image tokens attend to each other bidirectionally within their image (``token_type_ids``, shortened
with the sequence). Most text layers use sliding-window attention, so the decoder stage is refused where
they follow (``api``); the input stage works. 1-D RoPE positions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn
from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig
from transformers.modeling_outputs import ModelOutput

from .base import Architecture, Backbone, Grid, ModelAdapter
from .geometry import ItemRegions, PixelSize, square_grid_regions, stretch
from .internvl import flat_outputs
from .llava import square_grids
from .random_weights import BOS, IMAGE, VISION_END, VISION_START, RowSpec, Size, text_fields, text_ids

if TYPE_CHECKING:
    from ..engine.state import VisualItem

_POOLED = "Gemma 3's projector average-pools blocks of vision patches before projecting, so a token has no one"


class Gemma3Adapter(ModelAdapter):
    unavailable_inputs: ClassVar[Mapping[str, str]] = {
        "pre_features": f"{_POOLED} projector input row",
        "projector": f"{_POOLED} row-wise projector",
    }

    def special_token_ids(self) -> set[int]:
        # Gemma 3 names its image delimiters boi / eoi, not vision_start / vision_end.
        config = self.config
        return super().special_token_ids() | {config.boi_token_index, config.eoi_token_index}

    def grids(self, items: list[VisualItem], positions: Tensor) -> list[Grid]:
        return square_grids(items)

    def shorten_outputs(self, output: ModelOutput, kept: list[Tensor], weights: list[Tensor | None]) -> ModelOutput:
        return flat_outputs(output, kept, weights)

    def regions(
        self,
        inputs: Mapping[str, Any],
        image_sizes: list[PixelSize] | None,
        video_sizes: list[PixelSize] | None,
        processor: Any | None,
    ) -> list[ItemRegions]:
        # The processor resizes each image to S x S (no crop, no padding): boxes stretch back onto the original.
        pixel_values = inputs["pixel_values"]
        processed = int(pixel_values.shape[-1])
        side = round(self.config.mm_tokens_per_image**0.5)

        def to_original(boxes: Tensor, size: PixelSize) -> Tensor:
            return stretch(boxes, (processed, processed), size)

        return square_grid_regions(pixel_values, side, image_sizes, to_original)


def _random_config(size: Size) -> Gemma3Config:
    image = 2 * size.image  # 2 x 2 patches per token
    vision = SiglipVisionConfig(
        hidden_size=size.vision_hidden,
        intermediate_size=2 * size.vision_hidden,
        num_hidden_layers=size.vision_layers,
        num_attention_heads=2,
        image_size=image,
        patch_size=size.patch,
    )
    text = Gemma3TextConfig(**text_fields(size), head_dim=size.hidden // size.heads)
    return Gemma3Config(
        vision_config=vision,
        text_config=text,
        mm_tokens_per_image=(size.image // size.patch) ** 2,
        boi_token_index=VISION_START,
        eoi_token_index=VISION_END,
        image_token_index=IMAGE,
    )


def _random_inputs(
    model: nn.Module, rows: list[RowSpec], generator: torch.Generator
) -> tuple[list[list[int]], dict[str, Tensor]]:
    """Images are (1, 1): one S x S image each, its tokens between begin- and end-of-image tokens."""
    config: Any = model.config  # a PretrainedConfig: torch types module attributes as Tensor | Module
    image = config.vision_config.image_size
    vocab = config.text_config.vocab_size
    images, sequences = 0, []
    for row in rows:
        ids = [BOS] + text_ids(row.text_before, vocab, generator)
        for _ in row.images:
            images += 1
            ids += [VISION_START] + [IMAGE] * config.mm_tokens_per_image + [VISION_END] + text_ids(1, vocab, generator)
        sequences.append(ids + text_ids(row.text_after, vocab, generator))
    extra = {"pixel_values": torch.randn(images, 3, image, image, generator=generator)} if images else {}
    return sequences, extra


ARCHITECTURES = (
    Architecture(
        model_class="Gemma3ForConditionalGeneration",
        model_type="gemma3",
        adapter=Gemma3Adapter,
        random_config=_random_config,
        random_inputs=_random_inputs,
        test_images=((1, 1), (1, 1)),
        token_types="token_type_ids",
        backbone=Backbone("lmms_eval.models.simple.gemma3", "Gemma3"),
    ),
)
