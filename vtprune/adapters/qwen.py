"""Qwen-VL family: Qwen2-VL, Qwen2.5-VL, Qwen3-VL (M-RoPE positions; Qwen3-VL adds deepstack).

Token geometry: the raster of merged (2 x 2 patch) tokens of each smart-resized image or frame group,
frame by frame (2.5-VL's window order is undone by the model before the LLM sees tokens).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from transformers import (
    PretrainedConfig,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2VLConfig,
    Qwen3VLConfig,
)
from transformers.modeling_outputs import ModelOutput

from ..vocabulary.compat import CACHE_KWARG
from ..vocabulary.grids import Grid, Segment
from ..vocabulary.layout import take
from .base import Architecture, Backbone, ModelAdapter, Photo, reduce_tokens
from .geometry import ItemRegions, PixelSize, View, cell_boxes, clip_boxes, no_tokens, stretch
from .random_weights import IMAGE, VIDEO, VISION_END, VISION_START, RowSpec, Size, text_fields, text_ids
from .toys import ToyGeometry, ToyVLM, token_id

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

    from ..engine.state import VisualItem


class QwenVLAdapter(ModelAdapter):
    """Features are merger outputs in raster order of the merged (t, h/m, w/m) grid."""

    # (3, B, L) t/h/w rows, or (4, B, L) with the text positions first as generate() passes them.
    position_seq_dim = 2

    def original_positions(self, kwargs: dict[str, Any], input_ids: Tensor) -> Tensor:
        if kwargs.get("position_ids") is not None:
            return kwargs["position_ids"]
        # M-RoPE must come from the unpruned ids: recomputing it on shortened ids fails. Every argument of the
        # model's own function that the caller passed goes through (second_per_grid_ts, mm_token_type_ids, and
        # whatever a later version adds), so the positions are the model's for every input it accepts.
        compute = self.inner.compute_3d_position_ids
        arguments = {name: kwargs.get(name, default) for name, default in _parameter_defaults(compute.__func__)}
        arguments.update(input_ids=input_ids, inputs_embeds=None, **{CACHE_KWARG: None})
        positions = compute(**arguments)
        if positions is None:  # text only: the text model's own default
            return super().original_positions(kwargs, input_ids)[None].expand(3, -1, -1)
        return positions

    def grids(self, items: list[VisualItem], positions: Tensor) -> list[Grid]:
        # M-RoPE gives each token (t, h, w) = start + its grid coordinates, so a frame's extent in h
        # and w is its grid. A frame is the first contiguous run of the item's tokens: Qwen3-VL puts
        # each video frame in its own run, Qwen2/2.5-VL one run per item.
        hw = positions[-2:]  # (2, B, L): the h and w rows, for (3, B, L) and (4, B, L) alike
        grids: list[Grid] = []
        for item in items:
            columns = item.columns
            breaks = (columns[1:] - columns[:-1] != 1).nonzero()
            frame = columns[: int(breaks[0]) + 1] if breaks.numel() else columns
            coords = hw[:, item.row, frame]
            h, w = (int(extent) for extent in coords.max(dim=1).values - coords.min(dim=1).values + 1)
            t, rest = divmod(columns.numel(), h * w)
            grids.append((t, h, w) if rest == 0 and t * h * w == columns.numel() else None)
        return grids

    def projector_module(self) -> nn.Module:
        return self.inner.visual.merger

    @property
    def projector_rows(self) -> int:  # the merger reads each spatial_merge_size^2 block as one token
        return self.inner.config.vision_config.spatial_merge_size**2

    def shorten_outputs(self, output: ModelOutput, kept: list[Tensor], weights: list[Tensor | None]) -> ModelOutput:
        shortened = super().shorten_outputs(output, kept, weights)
        deepstack = output.get("deepstack_features")
        if deepstack is not None:
            # Qwen3-VL adds these vision-layer features to the visual tokens of early decoder layers.
            shortened["deepstack_features"] = [reduce_tokens(level, kept, weights) for level in deepstack]
        return shortened

    def install_decoder_remap(self, current_source: Callable[[], Tensor | None]) -> Callable[[], None]:
        text_model: Any = self.text_model  # Qwen3-VL's: a method torch's typing of module attributes cannot see
        if not hasattr(text_model, "_deepstack_process"):
            return lambda: None
        original = text_model._deepstack_process

        def deepstack_process(hidden_states: Tensor, visual_pos_masks: Tensor, visual_embeds: Tensor) -> Tensor:
            source = current_source()
            if source is not None:
                # visual_embeds has one row per visual slot of the decoder's input sequence, row-major.
                rank = visual_pos_masks.flatten().long().cumsum(0).view_as(visual_pos_masks) - 1
                visual_pos_masks = take(visual_pos_masks, source, fill=False)
                visual_embeds = visual_embeds[take(rank, source)[visual_pos_masks]]
            return original(hidden_states, visual_pos_masks, visual_embeds)

        # An attribute on this one instance; removing it brings back the class method.
        text_model._deepstack_process = deepstack_process
        return lambda: delattr(text_model, "_deepstack_process")

    def regions(
        self,
        inputs: Mapping[str, Any],
        image_sizes: list[PixelSize] | None,
        video_sizes: list[PixelSize] | None,
        processor: Any | None,
    ) -> list[ItemRegions]:
        vision = self.config.vision_config
        patch, merge, temporal = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
        items = []
        for modality, key, sizes in (
            ("image", "image_grid_thw", image_sizes),
            ("video", "video_grid_thw", video_sizes),
        ):
            grids = inputs.get(key)
            for i, (t, h, w) in enumerate([] if grids is None else grids.tolist()):
                rows, cols = h // merge, w // merge
                resized = (h * patch, w * patch)
                size = sizes[i] if sizes else resized
                boxes = clip_boxes(stretch(cell_boxes(rows, cols, merge * patch), resized, size), size)
                cells = Segment(0, (t, rows, cols)).cells().view(t, rows * cols)
                views = tuple(
                    View(
                        "image" if modality == "image" else f"frames {f * temporal}-{(f + 1) * temporal - 1}",
                        f * temporal,
                        cells[f],
                        boxes,
                    )
                    for f in range(t)
                )
                items.append(ItemRegions(modality, i, t * rows * cols, size, views, no_tokens()))
        return items


@functools.cache
def _parameter_defaults(method: Callable[..., Any]) -> tuple[tuple[str, Any], ...]:
    """(name, default or None) of each parameter of a model class's ``method`` after ``self``: its signature is
    read once per class, not at every prefill."""
    parameters = list(inspect.signature(method).parameters.values())[1:]
    return tuple((p.name, None if p.default is inspect.Parameter.empty else p.default) for p in parameters)


def _text(size: Size, mrope_interleaved: bool = False) -> dict:
    head_dim = size.hidden // size.heads
    quarter = head_dim // 8  # M-RoPE sections (t, h, w) must add up to head_dim / 2
    rope = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "mrope_section": [head_dim // 2 - 2 * quarter, quarter, quarter],
    }
    if mrope_interleaved:
        rope["mrope_interleaved"] = True
    return dict(text_fields(size), head_dim=head_dim, rope_parameters=rope)


def _vision(size: Size) -> dict:
    return {
        "depth": size.vision_layers,
        "hidden_size": size.vision_hidden,
        "num_heads": 2,
        "in_channels": 3,
        "patch_size": size.patch,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "intermediate_size": 2 * size.vision_hidden,
        "out_hidden_size": size.hidden,
    }


_TOKENS: dict[str, Any] = {
    "image_token_id": IMAGE,
    "video_token_id": VIDEO,
    "vision_start_token_id": VISION_START,
    "vision_end_token_id": VISION_END,
}


def _qwen2_config(size: Size) -> PretrainedConfig:
    vision = {k: v for k, v in _vision(size).items() if k not in ("intermediate_size", "out_hidden_size")}
    vision.update(embed_dim=size.vision_hidden, hidden_size=size.hidden, mlp_ratio=2)
    return Qwen2VLConfig(text_config=_text(size), vision_config=vision, **_TOKENS)


def _qwen2_5_config(size: Size) -> PretrainedConfig:
    vision = dict(_vision(size), window_size=4 * size.patch, fullatt_block_indexes=[size.vision_layers - 1])
    return Qwen2_5_VLConfig(text_config=_text(size), vision_config=vision, **_TOKENS)


def _qwen3_config(size: Size) -> PretrainedConfig:
    deepstack = list(range(min(2, size.vision_layers)))
    vision = dict(_vision(size), num_position_embeddings=64, deepstack_visual_indexes=deepstack)
    return Qwen3VLConfig(text_config=_text(size, mrope_interleaved=True), vision_config=vision, **_TOKENS)


#: The toy Qwen2-VL's special tokens; a prompt writes an image as <|vision_start|><|image_pad|><|vision_end|> and the
#: processor repeats <|image_pad|> per token.
_TOY_TOKENS = {
    "vision_start_token": "<|vision_start|>",
    "image_token": "<|image_pad|>",
    "vision_end_token": "<|vision_end|>",
    "video_token": "<|video_pad|>",
}
#: 8 px patches merged 2 x 2: one visual token per cell of the toy's images.
_TOY_MERGE = 2


def _toy_geometry(geometry: ToyGeometry) -> dict[str, int]:
    return {"patch_size": geometry.cell // _TOY_MERGE, "merge_size": _TOY_MERGE, "temporal_patch_size": 2}


def _toy_processor(tokenizer: PreTrainedTokenizerFast, geometry: ToyGeometry, chat_template: str) -> ProcessorMixin:
    # Imported here: without torchvision, importing these warns about Qwen2-VL on every command that imports vtprune.
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    patches = _toy_geometry(geometry)
    # Pixel limits keep a task image at its size (one token per cell) and shrink larger pictures to that area.
    pixels = {"min_pixels": (2 * geometry.cell) ** 2, "max_pixels": geometry.image_size**2}
    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**patches, **pixels),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**patches, **pixels),
        chat_template=chat_template,
    )


def _toy_config(
    tokenizer: PreTrainedTokenizerFast, geometry: ToyGeometry, text: dict[str, Any], sizes: Mapping[str, int]
) -> PretrainedConfig:
    head_dim = text["hidden_size"] // sizes["heads"]
    # M-RoPE splits a head's rotary half-dimensions over (t, h, w), in Qwen2-VL's 1:1.5:1.5 proportion.
    mrope = [head_dim // 8, 3 * head_dim // 16, head_dim // 2 - head_dim // 8 - 3 * head_dim // 16]
    patches = _toy_geometry(geometry)
    vision = {
        "depth": sizes["vision_layers"],
        "embed_dim": sizes["vision_hidden"],
        "hidden_size": text["hidden_size"],
        "num_heads": sizes["heads"],
        "patch_size": patches["patch_size"],
        "spatial_merge_size": patches["merge_size"],
        "temporal_patch_size": patches["temporal_patch_size"],
    }
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope}
    ids: dict[str, Any] = {f"{name}_id": token_id(tokenizer, token) for name, token in _TOY_TOKENS.items()}
    return Qwen2VLConfig(vision_config=vision, text_config={**text, "rope_parameters": rope}, **ids)


#: The toy Qwen2-VL: its vision transformer at depth 0, so a visual token carries only its own cell (as the toy
#: LLaVA's patch embeddings do); torchvision's image processor (its processor needs torchvision for videos anyway).
TOY = ToyVLM(
    image_placeholder=_TOY_TOKENS["vision_start_token"] + _TOY_TOKENS["image_token"] + _TOY_TOKENS["vision_end_token"],
    special_tokens=("<pad>", "<unk>", "</s>", *_TOY_TOKENS.values()),
    named_tokens=_TOY_TOKENS,
    processor=_toy_processor,
    config=_toy_config,
    processor_class="Qwen2VLProcessor",
    image_backend="torchvision",
    sizes={"vision_layers": 0},
)


def _random_inputs(
    model: nn.Module, rows: list[RowSpec], generator: torch.Generator, *, frame_groups: bool = False
) -> tuple[list[list[int]], dict[str, Tensor]]:
    """Images are their merged-token grid (h, w); a video is 2 frames of 2 x 2 merged tokens. ``frame_groups``:
    each video frame gets its own placeholder group after its timestamp text (Qwen3-VL)."""
    config: Any = model.config  # a Qwen*VLConfig
    vision, vocab = config.vision_config, config.text_config.vocab_size
    patch, temporal, merge = vision.patch_size, vision.temporal_patch_size, vision.spatial_merge_size
    pixels, grids, video_pixels, video_grids, sequences = [], [], [], [], []
    for row in rows:
        ids = text_ids(row.text_before, vocab, generator)
        for h, w in row.images:
            grid = (1, h * merge, w * merge)
            grids.append(grid)
            pixels.append(torch.randn(math.prod(grid), 3 * temporal * patch * patch, generator=generator))
            ids += [VISION_START] + [IMAGE] * (h * w) + [VISION_END]
        for _ in range(row.videos):
            grid = (2, 2 * merge, 2 * merge)
            video_grids.append(grid)
            video_pixels.append(torch.randn(math.prod(grid), 3 * temporal * patch * patch, generator=generator))
            if frame_groups:
                for _ in range(2):
                    ids += text_ids(1, vocab, generator) + [VISION_START] + [VIDEO] * 4 + [VISION_END]
            else:
                ids += [VISION_START] + [VIDEO] * (2 * 2 * 2) + [VISION_END]
        sequences.append(ids + text_ids(row.text_after, vocab, generator))
    extra: dict[str, Tensor] = {}
    if pixels:
        extra.update(pixel_values=torch.cat(pixels), image_grid_thw=torch.tensor(grids))
    if video_pixels:
        extra.update(pixel_values_videos=torch.cat(video_pixels), video_grid_thw=torch.tensor(video_grids))
    return sequences, extra


def _qwen3_inputs(
    model: nn.Module, rows: list[RowSpec], generator: torch.Generator
) -> tuple[list[list[int]], dict[str, Tensor]]:
    return _random_inputs(model, rows, generator, frame_groups=True)


def _photo_inputs(model: nn.Module, photo: PILImage) -> tuple[Any, dict[str, Tensor]]:
    """Patch 14, 2 x 2 merge, a dynamic grid from the photo's own size."""
    from transformers import Qwen2VLImageProcessor

    processor = Qwen2VLImageProcessor(min_pixels=200 * 28 * 28, max_pixels=320 * 28 * 28, patch_size=14)
    out = processor(images=[photo], return_tensors="pt")
    tokens = int(out["image_grid_thw"].prod()) // 4
    ids = torch.tensor([[7, 8, VISION_START] + [IMAGE] * tokens + [VISION_END, 9, 10, 11]])
    return processor, {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": out["pixel_values"],
        "image_grid_thw": out["image_grid_thw"],
        "mm_token_type_ids": (ids == IMAGE).long(),
    }


_QWEN: dict[str, Any] = {
    "adapter": QwenVLAdapter,
    "test_images": ((2, 2), (2, 3)),
    "bench_image": (24, 24),
    "takes_video": True,
    "token_types": "mm_token_type_ids",
}
ARCHITECTURES = (
    Architecture(
        model_class="Qwen2VLForConditionalGeneration",
        model_type="qwen2_vl",
        random_config=_qwen2_config,
        random_inputs=_random_inputs,
        backbone=Backbone("lmms_eval.models.simple.qwen2_vl", "Qwen2_VL"),
        toy=TOY,
        **_QWEN,
    ),
    Architecture(
        model_class="Qwen2_5_VLForConditionalGeneration",
        model_type="qwen2_5_vl",
        random_config=_qwen2_5_config,
        random_inputs=_random_inputs,
        backbone=Backbone("lmms_eval.models.simple.qwen2_5_vl", "Qwen2_5_VL"),
        photo=Photo(_photo_inputs, "Qwen2.5-VL dynamic grid", sample=1),
        **_QWEN,
    ),
    Architecture(
        model_class="Qwen3VLForConditionalGeneration",
        model_type="qwen3_vl",
        random_config=_qwen3_config,
        random_inputs=_qwen3_inputs,
        backbone=Backbone("lmms_eval.models.simple.qwen3_vl", "Qwen3_VL"),
        **_QWEN,
    ),
)
