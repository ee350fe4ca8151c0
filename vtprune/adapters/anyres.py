"""LLaVA-NeXT and LLaVA-OneVision: AnyRes packing (base tile, unpadded high-res grid, newline tokens).

Token order of an image: the base tile (the whole image resized to S x S), then the unpadded high-res grid
with a newline token after each row. The geometry takes that order from the model's own
``pack_image_features`` run on cell coordinates instead of features, so unpadding and OneVision's
``anyres_max_9`` downscaling (a bilinear resize of the grid: each token then stands for an s x s block of
cells) are exactly the model's. Newline tokens have no region. OneVision rows with several images get one
padded-to-square tile each; OneVision videos: frames pooled 2x2 by the model's ``apply_pooling``, then one
newline.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from transformers import LlavaNextConfig, LlavaOnevisionConfig, Qwen2Config
from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
from transformers.image_utils import ChannelDimension
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, image_size_to_num_patches

from ..errors import VTPruneError
from ..vocabulary.grids import Segment
from .base import Architecture, ModelAdapter, Photo
from .geometry import ItemRegions, PixelSize, View, cell_boxes, clip_boxes, sample_boxes, shape_only
from .llava import LLAVA_HF, llava_sequences
from .random_weights import BOS, IMAGE, VIDEO, RowSpec, Size, clip_vision, llama_text, text_fields

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

    from ..engine.state import VisualItem


class AnyResAdapter(ModelAdapter):
    """Features are projector outputs packed per image by AnyRes; no item is one raster grid (``grids``: None)."""

    def projector_module(self) -> nn.Module:
        return self.inner.multi_modal_projector

    def segments(self, item: VisualItem) -> tuple[Segment, ...] | None:
        if item.newline is None:
            return None
        vision = self.config.vision_config
        return anyres_segments(item.newline, vision.image_size // vision.patch_size)

    def newline_embedding(self) -> Tensor | None:
        return getattr(self.inner, "image_newline", None)

    def pack(self, coords: Tensor, size: PixelSize) -> Tensor:
        """The model's own AnyRes packing (unpad, newlines, ...) of one image's tiles of cell coordinates."""
        raise NotImplementedError

    def regions(
        self,
        inputs: Mapping[str, Any],
        image_sizes: list[PixelSize] | None,
        video_sizes: list[PixelSize] | None,
        processor: Any | None,
    ) -> list[ItemRegions]:
        # ``image_sizes`` of the inputs carry the originals' sizes: the given ones are not needed for images.
        config = self.config
        tile = config.vision_config.image_size
        side = tile // config.vision_config.patch_size
        items = []
        sizes = inputs.get("image_sizes")
        if sizes is not None and inputs.get("pixel_values") is not None:
            counts = inputs.get("batch_num_images")
            # OneVision tiles an image only when it is alone in its row (the model reads batch_num_images too).
            tiled = [True] * len(sizes) if counts is None else [int(n) == 1 for n in counts for _ in range(int(n))]
            for i, (size, tiles) in enumerate(zip(sizes.tolist(), tiled)):
                items.append(self._image_regions(i, (int(size[0]), int(size[1])), tiles, tile, side))
        videos = inputs.get("pixel_values_videos")
        if videos is not None:
            for v in range(videos.shape[0]):
                size = video_sizes[v] if video_sizes else (tile, tile)
                items.append(self._video_regions(v, int(videos.shape[1]), size, tile, side))
        return items

    def _image_regions(self, index: int, size: PixelSize, tiled: bool, tile: int, side: int) -> ItemRegions:
        pinpoints = self.config.image_grid_pinpoints
        height, width = size
        tiles = image_size_to_num_patches(size, pinpoints, tile) if tiled else 1
        # Cell coordinates stand in for features: channel 0 marks cells (newlines are 0), 1 the grid (0 base,
        # 1 high-res), 2-3 the row and column (of the base tile, or of the whole high-res canvas).
        rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        ones, zeros = torch.ones(side, side), torch.zeros(side, side)
        coords = [torch.stack([ones, zeros, rows, cols], -1).view(side * side, 4)]
        if tiles > 1:
            _, grid_w = get_anyres_image_grid_shape(size, pinpoints, tile)
            for k in range(tiles - 1):
                y, x = k // grid_w * side + rows, k % grid_w * side + cols
                coords.append(torch.stack([ones, ones, y, x], -1).view(side * side, 4))
        packed = self.pack(torch.stack(coords).float(), size)
        newline = packed[:, 0] < 0.5
        segments = anyres_segments(newline, side)
        if segments is None:
            raise VTPruneError(f"unrecognised AnyRes packing for an image of size {size}")
        base = segments[0]
        cell = tile / side
        base_boxes = cell_boxes(side, side, cell)
        if tiles > 1:  # the base tile is the whole image stretched to tile x tile
            scale = torch.tensor([width / tile, height / tile] * 2, dtype=torch.float64)
            base_boxes = base_boxes * scale
        else:  # OneVision's multi-image rows: padded to a square, then resized
            square = max(height, width)
            shift = torch.tensor([(square - width) // 2, (square - height) // 2] * 2, dtype=torch.float64)
            base_boxes = base_boxes * (square / tile) - shift
        views = [View("base tile", 0, base.cells(), clip_boxes(base_boxes, size))]
        if len(segments) > 1:
            grid = segments[1]
            cells = grid.cells()
            canvas_boxes = sample_boxes(packed[cells, 2], packed[cells, 3], grid.grid[1:]) * cell
            best_h, best_w = select_best_resolution(size, pinpoints)
            new_h, new_w = get_patch_output_size(shape_only(height, width), (best_h, best_w), ChannelDimension.FIRST)
            paste = torch.tensor([(best_w - new_w) // 2, (best_h - new_h) // 2] * 2, dtype=torch.float64)
            scale = torch.tensor([width / new_w, height / new_h] * 2, dtype=torch.float64)
            views.append(View("high-res", 0, cells, clip_boxes((canvas_boxes - paste) * scale, size)))
        return ItemRegions("image", index, packed.shape[0], size, tuple(views), newline.nonzero()[:, 0])

    def _video_regions(self, index: int, frames: int, size: PixelSize, tile: int, side: int) -> ItemRegions:
        rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        coords = torch.stack([torch.ones(side, side), rows, cols], -1).view(1, side * side, 3).expand(frames, -1, -1)
        pooled = self.inner.apply_pooling(coords.float().contiguous()).double()  # the model's 2x2 frame pooling
        flat = torch.cat([pooled.reshape(-1, 3), torch.zeros(1, 3, dtype=torch.float64)])  # one newline at the end
        pooled_side = math.isqrt(pooled.shape[1])
        grid = Segment(0, (frames, pooled_side, pooled_side))
        per_frame = pooled_side * pooled_side
        scale = torch.tensor([size[1] / tile, size[0] / tile] * 2, dtype=torch.float64)
        views = []
        for f in range(frames):
            cells = grid.cells()[f * per_frame : (f + 1) * per_frame]
            boxes = sample_boxes(flat[cells, 1], flat[cells, 2], grid.grid[1:]) * (tile / side) * scale
            views.append(View(f"frame {f}", f, cells, clip_boxes(boxes, size)))
        return ItemRegions("video", index, flat.shape[0], size, tuple(views), torch.tensor([flat.shape[0] - 1]))


class LlavaNextAdapter(AnyResAdapter):
    def pack(self, coords: Tensor, size: PixelSize) -> Tensor:
        strategy = self.config.vision_feature_select_strategy
        packed, _ = self.inner.pack_image_features([coords], torch.tensor([size]), strategy, _no_newline(coords))
        return packed[0].double()


class LlavaOnevisionAdapter(AnyResAdapter):
    def pack(self, coords: Tensor, size: PixelSize) -> Tensor:
        aspect = getattr(self.config, "vision_aspect_ratio", "anyres_max_9")
        packed, _ = self.inner.pack_image_features(
            [coords], torch.tensor([size]), image_newline=_no_newline(coords), vision_aspect_ratio=aspect
        )
        return packed[0].double()


def _no_newline(coords: Tensor) -> Tensor:
    """A newline 'embedding' of zeros: newline tokens then read 0 in every cell-coordinate channel."""
    return torch.zeros(coords.shape[-1])


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


def _pinpoints(size: Size) -> list[list[int]]:
    return [[size.image, 2 * size.image], [2 * size.image, size.image], [2 * size.image, 2 * size.image]]


def _next_config(size: Size) -> LlavaNextConfig:
    return LlavaNextConfig(
        vision_config=clip_vision(size),
        text_config=llama_text(size),
        image_grid_pinpoints=_pinpoints(size),
        vision_feature_layer=-2,
        image_token_id=IMAGE,  # type: ignore[call-arg]  # accepted as a kwarg, not in the typed signature
    )


def _onevision_config(size: Size) -> LlavaOnevisionConfig:
    return LlavaOnevisionConfig(  # type: ignore[call-arg]  # accepted as a kwarg, not in the typed signature
        vision_config=clip_vision(size),
        text_config=Qwen2Config(**text_fields(size), head_dim=size.hidden // size.heads),  # type: ignore[call-arg]  # accepted as a kwarg, not in the typed signature
        image_grid_pinpoints=_pinpoints(size),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_token_id=IMAGE,
        video_token_id=VIDEO,
    )


def _random_inputs(
    model: nn.Module, rows: list[RowSpec], generator: torch.Generator
) -> tuple[list[list[int]], dict[str, Tensor]]:
    """Images are sizes in base tiles: (1, 1) one tile, (1, 2) a wide image (base tile + 2 tiles)."""
    config: Any = model.config  # a PretrainedConfig: torch types module attributes as Tensor | Module
    inner: Any = model.model  # the family's inner model, whose feature methods nn.Module does not type
    side = config.vision_config.image_size
    sizes = [(h * side, w * side) for row in rows for h, w in row.images]
    extra: dict[str, Tensor] = {}
    counts: list[int] = []
    if sizes:
        tiles = [image_size_to_num_patches(s, config.image_grid_pinpoints, side) for s in sizes]
        extra["pixel_values"] = torch.randn(len(sizes), max(tiles), 3, side, side, generator=generator)
        extra["image_sizes"] = torch.tensor(sizes)
        with torch.no_grad():  # the token counts, read off the model's own packing (base tile, tiles, newlines)
            features = inner.get_image_features(pixel_values=extra["pixel_values"], image_sizes=extra["image_sizes"])
        counts = [len(f) for f in features.pooler_output]
    video_count = 0
    videos = sum(row.videos for row in rows)
    if videos:
        extra["pixel_values_videos"] = torch.randn(videos, 4, 3, side, side, generator=generator)
        video_count = len(inner.get_video_features(extra["pixel_values_videos"][:1]).pooler_output[0])
    return llava_sequences(rows, counts, video_count, config.text_config.vocab_size, generator), extra


def _photo_inputs(model: nn.Module, photo: PILImage) -> tuple[Any, dict[str, Tensor]]:
    """AnyRes on 336 px tiles: base tile + high-res grid with row newlines, counted by the model itself."""
    from transformers import LlavaNextImageProcessor

    config: Any = model.config
    processor = LlavaNextImageProcessor(
        image_grid_pinpoints=config.image_grid_pinpoints,
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
    )
    out = processor(images=[photo], return_tensors="pt")
    inner: Any = model.model
    with torch.no_grad():
        count = len(inner.get_image_features(**out).pooler_output[0])
    ids = [BOS, 7, 8] + [IMAGE] * count + [9, 10, 11]
    return processor, {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "pixel_values": out["pixel_values"],
        "image_sizes": out["image_sizes"],
    }


ARCHITECTURES = (
    Architecture(
        model_class="LlavaNextForConditionalGeneration",
        model_type="llava_next",
        adapter=LlavaNextAdapter,
        random_config=_next_config,
        random_inputs=_random_inputs,
        test_images=((1, 1), (1, 2)),
        bench_image=(1, 2),
        backbone=LLAVA_HF,
        photo=Photo(_photo_inputs, "LLaVA-NeXT AnyRes geometry (base tile + high-res grid)"),
    ),
    Architecture(
        model_class="LlavaOnevisionForConditionalGeneration",
        model_type="llava_onevision",
        adapter=LlavaOnevisionAdapter,
        random_config=_onevision_config,
        random_inputs=_random_inputs,
        test_images=((1, 1), (1, 2)),
        bench_image=(1, 2),
        takes_video=True,
        backbone=LLAVA_HF,
    ),
)
