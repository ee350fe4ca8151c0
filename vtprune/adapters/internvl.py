"""InternVL (InternVL2.5 / InternVL3 in transformers): tiles of a square raster, pixel-shuffled 2 x 2.

Each processed tile (the processor's dynamic tiles and thumbnail) is one S x S image through the vision
tower; its (S/p)^2 patches are pixel-shuffled to (S/2p)^2 tokens (token (r, c) holds patches 2r..2r+1 x
2c..2c+1) before the projector, and the model scatters all tiles' tokens over the placeholders in order. vtprune
prunes each tile as one item (budgets are per tile) on a square grid; 1-D RoPE positions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from transformers import InternVLConfig, InternVLVisionConfig, Qwen2Config
from transformers.modeling_outputs import ModelOutput

from .base import Architecture, Grid, ModelAdapter, reduce_tokens
from .geometry import ItemRegions, PixelSize, square_grid_regions
from .llava import square_grids
from .random_weights import IMAGE, VISION_END, VISION_START, RowSpec, Size, text_fields, text_ids

if TYPE_CHECKING:
    from ..engine.state import VisualItem


class InternVLAdapter(ModelAdapter):
    def grids(self, items: list[VisualItem], positions: Tensor) -> list[Grid]:
        return square_grids(items)

    def image_delimiter_ids(self, input_ids: Tensor) -> set[int]:
        # InternVL's config names only the context (placeholder) token; <img> and </img> are the tokenizer's. Its
        # processor writes every image and video frame as <img> + placeholders + </img>, so the tokens flanking each
        # run of placeholders are the delimiters, read from the prompt with or without a tokenizer.
        placeholder = input_ids == self.config.image_token_id
        opens = placeholder[..., 1:] & ~placeholder[..., :-1]  # a run starts at j + 1: <img> at j
        closes = placeholder[..., :-1] & ~placeholder[..., 1:]  # a run ends at j: </img> at j + 1
        return set(input_ids[..., :-1][opens].tolist()) | set(input_ids[..., 1:][closes].tolist())

    def projector_module(self) -> nn.Module:
        return self.inner.multi_modal_projector  # reads one pixel-shuffled row per token

    def cls_attention_layer(self) -> nn.Module | None:
        # InternViT has a [CLS] token, but pixel shuffle folds each 2 x 2 block of its patches into one token: its
        # row ranks patches, not tokens, so ToDRE takes its declared fallback (the most isolated token as the pivot).
        return None

    def shorten_outputs(self, output: ModelOutput, kept: list[Tensor], weights: list[Tensor | None]) -> ModelOutput:
        return flat_outputs(output, kept, weights)

    def regions(
        self,
        inputs: Mapping[str, Any],
        image_sizes: list[PixelSize] | None,
        video_sizes: list[PixelSize] | None,
        processor: Any | None,
    ) -> list[ItemRegions]:
        # One item per tile, boxes in the tile's own pixels: the inputs do not say how tiles cut the original.
        pixel_values = inputs["pixel_values"]
        vision = self.config.vision_config
        side = int(pixel_values.shape[-1]) // _side(vision.patch_size)
        side = round(side * self.config.downsample_ratio)
        return square_grid_regions(pixel_values, side, None, None)


def flat_outputs(output: ModelOutput, kept: list[Tensor], weights: list[Tensor | None]) -> ModelOutput:
    """The encoder output with each item's tokens reduced, as one (1, total, D) tensor: models that scatter the
    features over the placeholders in order (``masked_scatter``) read them flat, so items may differ in length."""
    shortened = type(output)(**dict(output.items()))
    # Item access (kept in step with the attribute): ModelOutput declares no fields, its subclasses do.
    shortened["pooler_output"] = torch.cat(reduce_tokens(list(output["pooler_output"]), kept, weights))[None]
    return shortened


def _side(value: int | list[int] | tuple[int, ...]) -> int:
    """A square size given as one int or (height, width)."""
    return value if isinstance(value, int) else int(value[0])


def _random_config(size: Size) -> InternVLConfig:
    image = 2 * size.image  # an even patch grid for the 2 x 2 pixel shuffle
    vision = InternVLVisionConfig(
        hidden_size=size.vision_hidden,
        intermediate_size=2 * size.vision_hidden,
        num_hidden_layers=size.vision_layers,
        num_attention_heads=2,
        image_size=(image, image),
        patch_size=(size.patch, size.patch),
    )
    text = Qwen2Config(**text_fields(size), head_dim=size.hidden // size.heads)  # type: ignore[call-arg]  # accepted as a kwarg, not in the typed signature
    return InternVLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE, image_seq_length=0)


def _random_inputs(
    model: nn.Module, rows: list[RowSpec], generator: torch.Generator
) -> tuple[list[list[int]], dict[str, Tensor]]:
    """Images are (h, w) tiles; a tiled image (more than one) also gets the processor's thumbnail tile."""
    config: Any = model.config  # a PretrainedConfig: torch types module attributes as Tensor | Module
    image = _side(config.vision_config.image_size)
    per_tile = round((image // _side(config.vision_config.patch_size)) * config.downsample_ratio) ** 2
    vocab = config.text_config.vocab_size
    tiles, sequences = 0, []
    for row in rows:
        ids = text_ids(row.text_before, vocab, generator)
        for h, w in row.images:
            count = h * w + (h * w > 1)
            tiles += count
            ids += [VISION_START] + [IMAGE] * (count * per_tile) + [VISION_END] + text_ids(1, vocab, generator)
        sequences.append(ids + text_ids(row.text_after, vocab, generator))
    extra = {"pixel_values": torch.randn(tiles, 3, image, image, generator=generator)} if tiles else {}
    return sequences, extra


ARCHITECTURES = (
    Architecture(
        model_class="InternVLForConditionalGeneration",
        model_type="internvl",
        adapter=InternVLAdapter,
        random_config=_random_config,
        random_inputs=_random_inputs,
        test_images=((1, 1), (1, 2)),
        # lmms-eval 0.7.3 has InternVL only as a chat model (models.chat.internvl_hf) and as remote-code
        # wrappers (internvl2, internvl3, ...); the harness wraps simple models of transformers classes.
        backbone=None,
    ),
)
