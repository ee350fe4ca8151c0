"""Where each visual token lies on the picture it came from: token index -> pixel box, per model family.

Nothing here draws. The geometry is read from the model's config and from the processed inputs
(``pixel_values``, ``image_sizes``, ``batch_num_images``, ``image_grid_thw``, ``video_grid_thw``), the
same information a user has after calling the processor; boxes are in pixels of the *original*
picture whenever its size is known, so drawings land on what the user gave the processor.

Token order is what the record's indices refer to (an item's placeholder tokens, its row of
``mm_encoder_outputs[...].pooler_output``):

- LLaVA-1.5: the (S/p) x (S/p) raster of the processed S x S image, mapped back through the
  processor's pad-to-square / shortest-edge resize / centre crop.
- LLaVA-NeXT / OneVision images: the base tile (the whole image resized to S x S), then the unpadded
  high-res grid with a newline token after each row. The order is taken from the model's own
  ``pack_image_features`` run on cell coordinates instead of features, so unpadding and OneVision's
  ``anyres_max_9`` downscaling (a bilinear resize of the grid: each token then stands for an s x s
  block of cells) are exactly the model's. Newline tokens have no region. OneVision rows with several
  images get one padded-to-square tile each; videos: frames pooled 2x2 by the model's
  ``apply_pooling``, then one newline.
- Qwen2/2.5/3-VL: the raster of merged (2 x 2 patch) tokens of each smart-resized image or frame
  group, frame by frame (2.5-VL's window order is undone by the model before the LLM sees tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
from transformers.image_transforms import get_resize_output_image_size
from transformers.image_utils import ChannelDimension
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, image_size_to_num_patches

from ..adapters.llava import anyres_segments
from ..errors import UnsupportedModelError, VTPruneError
from ..record import ImageRecord, PruneRecord
from ..vocabulary.grids import Segment

#: (height, width) in pixels.
Size = tuple[int, int]


@dataclass(frozen=True)
class View:
    """Tokens of one item whose regions lie on one picture: an image, AnyRes's base tile or high-res grid, a frame."""

    label: str
    """What the tokens show: "image", "base tile", "high-res", "frame 3", "frames 0-1"."""
    frame: int
    """Index of the picture among the item's frames that the boxes lie on (0 for images; a Qwen video token
    covers ``temporal_patch_size`` frames from this one)."""
    tokens: Tensor
    """(n,) token indices, in the item's own token order."""
    boxes: Tensor
    """(n, 4) float64 ``(x0, y0, x1, y1)`` in pixels of that picture, clipped to it."""


@dataclass(frozen=True)
class ItemRegions:
    """The regions of every token of one image or video of the processed inputs."""

    modality: str
    """"image" or "video"."""
    index: int
    """Order among the inputs' items of this modality (the order they were given to the processor)."""
    num_tokens: int
    size: Size
    """(height, width) of the picture the boxes are in: the original when known, else the processed one."""
    views: tuple[View, ...]
    newlines: Tensor
    """Token indices of AnyRes newline tokens, which stand for no region."""

    def boxes(self) -> Tensor:
        """(num_tokens, 4) box of every token, NaN for newline tokens (a lookup by token index)."""
        boxes = torch.full((self.num_tokens, 4), math.nan, dtype=torch.float64)
        for view in self.views:
            boxes[view.tokens] = view.boxes
        return boxes

    def frames(self) -> Tensor:
        """(num_tokens,) frame each token's box lies on, -1 for newline tokens."""
        frames = torch.full((self.num_tokens,), -1, dtype=torch.int64)
        for view in self.views:
            frames[view.tokens] = view.frame
        return frames


def token_regions(
    model: nn.Module,
    inputs: Mapping[str, Any],
    *,
    images: Sequence[Any] | None = None,
    videos: Sequence[Any] | None = None,
    processor: Any | None = None,
) -> list[ItemRegions]:
    """The region of every visual token of ``inputs``, per image then per video, in processor order.

    ``images`` / ``videos`` (what was given to the processor: PIL images or H x W x C arrays; a video is a
    sequence of frames or an F x H x W x C array) are read for their sizes only, so boxes land on them.
    Without them, LLaVA-1.5 and Qwen boxes are in pixels of the processed image (LLaVA-NeXT / OneVision
    carry the original sizes in ``image_sizes``). ``processor`` (or its image processor) gives LLaVA-1.5's
    pad / resize / crop settings; without it the CLIP default (shortest-edge resize, centre crop) is assumed.
    """
    kind = model.config.model_type
    family = _FAMILIES.get(kind)
    if family is None:
        raise UnsupportedModelError(f"vtprune.viz maps tokens of {', '.join(_FAMILIES)} models, not {kind!r}")
    return family(model, inputs, _sizes(images), _sizes(videos), processor)


def match_records(
    record: PruneRecord, regions: Sequence[ItemRegions], batch_size: int
) -> list[tuple[ImageRecord, ItemRegions]]:
    """Pair every item of ``record`` with its regions.

    ``batch_size`` is the processor's batch (``input_ids.shape[0]``): generate() may expand rows for beams
    or returned sequences, and every copy of a row maps to the same regions.
    """
    expand = max(1, record.layer_lengths.shape[0] // batch_size)
    by_modality = {m: [r for r in regions if r.modality == m] for m in {r.modality for r in regions}}
    pairs = []
    for item in record.images:
        source = item.row // expand
        # Items of the same modality in earlier rows (first copy of each row), then this one's rank in its row.
        before = sum(
            other.modality == item.modality and other.row % expand == 0 and other.row // expand < source
            for other in record.images
        )
        candidates = by_modality.get(item.modality, [])
        position = before + item.index
        if position >= len(candidates) or candidates[position].num_tokens != item.num_tokens:
            raise VTPruneError(
                f"record item (row {item.row}, {item.modality} {item.index}, {item.num_tokens} tokens) has no "
                "matching region: pass the same inputs (and model) that produced the record"
            )
        pairs.append((item, candidates[position]))
    return pairs


# --- LLaVA-1.5 -------------------------------------------------------------------------------------


def _llava(
    model: nn.Module, inputs: Mapping[str, Any], sizes: list[Size] | None, _: Any, processor: Any | None
) -> list[ItemRegions]:
    pixel_values = inputs["pixel_values"]
    side = pixel_values.shape[-1] // model.config.vision_config.patch_size
    cells = Segment(0, (1, side, side))
    items = []
    for i in range(pixel_values.shape[0]):
        processed = int(pixel_values.shape[-1])
        size = sizes[i] if sizes else (processed, processed)
        to_original = _clip_geometry(size, processed, processor) if sizes else _identity
        boxes = _clip(to_original(_cell_boxes(side, side, processed / side)), size)
        view = View("image", 0, cells.cells(), boxes)
        items.append(ItemRegions("image", i, side * side, size, (view,), _no_tokens()))
    return items


def _clip_geometry(size: Size, processed: int, processor: Any | None) -> Callable[[Tensor], Tensor]:
    """Processed-image pixels -> original pixels through pad-to-square, resize and centre crop."""
    image_processor = getattr(processor, "image_processor", processor)
    height, width = size
    pad_x = pad_y = 0
    if getattr(image_processor, "do_pad", False):
        side = max(height, width)
        pad_x, pad_y = (side - width) // 2, (side - height) // 2
        height = width = side
    resize = getattr(image_processor, "size", None) or {"shortest_edge": processed}
    if getattr(image_processor, "do_resize", True):
        target = _field(resize, "shortest_edge") or (_field(resize, "height"), _field(resize, "width"))
        resized = get_resize_output_image_size(
            _shape_only(height, width), target, default_to_square=False, input_data_format=ChannelDimension.FIRST
        )
    else:
        resized = (height, width)
    top = left = 0
    if getattr(image_processor, "do_center_crop", True):
        top, left = (resized[0] - processed) // 2, (resized[1] - processed) // 2
    scale = torch.tensor([width / resized[1], height / resized[0]] * 2, dtype=torch.float64)
    offset = torch.tensor([left, top] * 2, dtype=torch.float64)
    shift = torch.tensor([pad_x, pad_y] * 2, dtype=torch.float64)
    return lambda boxes: (boxes + offset) * scale - shift


# --- LLaVA-NeXT / OneVision -------------------------------------------------------------------------


def _anyres(
    model: nn.Module, inputs: Mapping[str, Any], _: Any, video_sizes: list[Size] | None, processor: Any | None
) -> list[ItemRegions]:
    config = model.config
    tile = config.vision_config.image_size
    side = tile // config.vision_config.patch_size
    items = []
    image_sizes = inputs.get("image_sizes")
    if image_sizes is not None and inputs.get("pixel_values") is not None:
        counts = inputs.get("batch_num_images")
        # OneVision tiles an image only when it is alone in its row (the model reads batch_num_images too).
        patching = [True] * len(image_sizes) if counts is None else [int(n) == 1 for n in counts for _ in range(int(n))]
        for i, (size, tiled) in enumerate(zip(image_sizes.tolist(), patching)):
            items.append(_anyres_image(model, i, (int(size[0]), int(size[1])), tiled, tile, side))
    videos = inputs.get("pixel_values_videos")
    if videos is not None:
        for v in range(videos.shape[0]):
            size = video_sizes[v] if video_sizes else (tile, tile)
            items.append(_anyres_video(model, v, int(videos.shape[1]), size, tile, side))
    return items


def _anyres_image(model: nn.Module, index: int, size: Size, tiled: bool, tile: int, side: int) -> ItemRegions:
    config = model.config
    pinpoints = config.image_grid_pinpoints
    height, width = size
    tiles = image_size_to_num_patches(size, pinpoints, tile) if tiled else 1
    # Cell coordinates stand in for features: channel 0 marks cells (newlines are 0), 1 the grid (0 base,
    # 1 high-res), 2-3 the row and column (of the base tile, or of the whole high-res canvas).
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    coords = [torch.stack([torch.ones(side, side), torch.zeros(side, side), rows, cols], -1).view(side * side, 4)]
    if tiles > 1:
        _, grid_w = get_anyres_image_grid_shape(size, pinpoints, tile)
        for k in range(tiles - 1):
            y, x = k // grid_w * side + rows, k % grid_w * side + cols
            coords.append(torch.stack([torch.ones(side, side), torch.ones(side, side), y, x], -1).view(side * side, 4))
    packed = _pack(model, torch.stack(coords).float(), size)
    newline = packed[:, 0] < 0.5
    segments = anyres_segments(newline, side)
    if segments is None:
        raise VTPruneError(f"unrecognised AnyRes packing for an image of size {size}")
    base = segments[0]
    cell = tile / side
    base_boxes = _cell_boxes(side, side, cell)
    if tiles > 1:  # the base tile is the whole image stretched to tile x tile
        scale = torch.tensor([width / tile, height / tile] * 2, dtype=torch.float64)
        base_boxes = base_boxes * scale
    else:  # OneVision's multi-image rows: padded to a square, then resized
        square = max(height, width)
        shift = torch.tensor([(square - width) // 2, (square - height) // 2] * 2, dtype=torch.float64)
        base_boxes = base_boxes * (square / tile) - shift
    views = [View("base tile", 0, base.cells(), _clip(base_boxes, size))]
    if len(segments) > 1:
        grid = segments[1]
        cells = grid.cells()
        canvas_boxes = _sample_boxes(packed[cells, 2], packed[cells, 3], grid.grid[1:]) * cell
        best_h, best_w = select_best_resolution(size, pinpoints)
        new_h, new_w = get_patch_output_size(_shape_only(height, width), (best_h, best_w), ChannelDimension.FIRST)
        paste = torch.tensor([(best_w - new_w) // 2, (best_h - new_h) // 2] * 2, dtype=torch.float64)
        scale = torch.tensor([width / new_w, height / new_h] * 2, dtype=torch.float64)
        views.append(View("high-res", 0, cells, _clip((canvas_boxes - paste) * scale, size)))
    return ItemRegions("image", index, packed.shape[0], size, tuple(views), newline.nonzero()[:, 0])


def _pack(model: nn.Module, coords: Tensor, size: Size) -> Tensor:
    """The model's own AnyRes packing (unpad, OneVision's downscaling, newlines) applied to cell coordinates."""
    inner, sizes, newline = model.model, torch.tensor([size]), torch.zeros(coords.shape[-1])
    if model.config.model_type == "llava_next":
        packed, _ = inner.pack_image_features([coords], sizes, model.config.vision_feature_select_strategy, newline)
    else:
        aspect = getattr(model.config, "vision_aspect_ratio", "anyres_max_9")
        packed, _ = inner.pack_image_features([coords], sizes, image_newline=newline, vision_aspect_ratio=aspect)
    return packed[0].double()


def _anyres_video(model: nn.Module, index: int, frames: int, size: Size, tile: int, side: int) -> ItemRegions:
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    coords = torch.stack([torch.ones(side, side), rows, cols], -1).view(1, side * side, 3).expand(frames, -1, -1)
    pooled = model.model.apply_pooling(coords.float().contiguous()).double()  # the model's 2x2 frame pooling
    flat = torch.cat([pooled.reshape(-1, 3), torch.zeros(1, 3, dtype=torch.float64)])  # one newline at the end
    pooled_side = math.isqrt(pooled.shape[1])
    grid = Segment(0, (frames, pooled_side, pooled_side))
    per_frame = pooled_side * pooled_side
    scale = torch.tensor([size[1] / tile, size[0] / tile] * 2, dtype=torch.float64)
    views = []
    for f in range(frames):
        cells = grid.cells()[f * per_frame : (f + 1) * per_frame]
        boxes = _sample_boxes(flat[cells, 1], flat[cells, 2], grid.grid[1:]) * (tile / side) * scale
        views.append(View(f"frame {f}", f, cells, _clip(boxes, size)))
    return ItemRegions("video", index, flat.shape[0], size, tuple(views), torch.tensor([flat.shape[0] - 1]))


def _sample_boxes(y: Tensor, x: Tensor, grid: tuple[int, int]) -> Tensor:
    """Boxes, in cell units, of a raster (h, w) grid of tokens whose cell-coordinate centres are ``y``, ``x``.

    A plain grid has centres one cell apart; a bilinearly resized one (OneVision) samples at spacing s, and
    each token then stands for the s x s block around its sample point.
    """
    h, w = grid
    y, x = y.view(h, w), x.view(h, w)
    step_y = float(y[1, 0] - y[0, 0]) if h > 1 else None
    step_x = float(x[0, 1] - x[0, 0]) if w > 1 else None
    step_y, step_x = step_y or step_x or 1.0, step_x or step_y or 1.0
    cy, cx = y.flatten() + 0.5, x.flatten() + 0.5  # a cell's centre is half a cell from its corner
    return torch.stack([cx - step_x / 2, cy - step_y / 2, cx + step_x / 2, cy + step_y / 2], -1)


# --- Qwen2/2.5/3-VL ---------------------------------------------------------------------------------


def _qwen(
    model: nn.Module,
    inputs: Mapping[str, Any],
    image_sizes: list[Size] | None,
    video_sizes: list[Size] | None,
    _: Any,
) -> list[ItemRegions]:
    vision = model.config.vision_config
    patch, merge, temporal = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
    items = []
    for modality, key, sizes in (("image", "image_grid_thw", image_sizes), ("video", "video_grid_thw", video_sizes)):
        grids = inputs.get(key)
        for i, (t, h, w) in enumerate([] if grids is None else grids.tolist()):
            rows, cols = h // merge, w // merge
            resized = (h * patch, w * patch)
            size = sizes[i] if sizes else resized
            scale = torch.tensor([size[1] / resized[1], size[0] / resized[0]] * 2, dtype=torch.float64)
            boxes = _clip(_cell_boxes(rows, cols, merge * patch) * scale, size)
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
            items.append(ItemRegions(modality, i, t * rows * cols, size, views, _no_tokens()))
    return items


# --- helpers ----------------------------------------------------------------------------------------

_FAMILIES = {
    "llava": _llava,
    "llava_next": _anyres,
    "llava_onevision": _anyres,
    "qwen2_vl": _qwen,
    "qwen2_5_vl": _qwen,
    "qwen3_vl": _qwen,
}


def _cell_boxes(rows: int, cols: int, cell: float) -> Tensor:
    """(rows * cols, 4) pixel boxes of a raster grid of square cells of side ``cell``."""
    y, x = torch.meshgrid(
        torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64), indexing="ij"
    )
    corners = torch.stack([x, y, x + 1, y + 1], -1).view(-1, 4)
    return corners * cell


def _clip(boxes: Tensor, size: Size) -> Tensor:
    height, width = size
    limits = torch.tensor([width, height] * 2, dtype=torch.float64)
    return boxes.clamp(min=0).minimum(limits)


def _identity(boxes: Tensor) -> Tensor:
    return boxes


def _no_tokens() -> Tensor:
    return torch.zeros(0, dtype=torch.int64)


def _field(size: Any, name: str) -> Any:
    """A field of a processor's size setting (a dict, or transformers' ``SizeDict``)."""
    return size.get(name) if isinstance(size, dict) else getattr(size, name, None)


def _shape_only(height: int, width: int) -> np.ndarray:
    """A channels-first array of that size without memory, for transformers' size helpers (they read .shape)."""
    return np.broadcast_to(np.zeros((), dtype=np.uint8), (3, height, width))


def _sizes(pictures: Sequence[Any] | None) -> list[Size] | None:
    """(height, width) of each image, or of each video's first frame."""
    if pictures is None:
        return None
    return [_size(p) for p in pictures]


def _size(picture: Any) -> Size:
    if hasattr(picture, "height") and hasattr(picture, "width"):  # PIL
        return int(picture.height), int(picture.width)
    shape = getattr(picture, "shape", None)
    if shape is not None:  # H x W x C image, or F x H x W x C video
        return (int(shape[0]), int(shape[1])) if len(shape) == 3 else (int(shape[1]), int(shape[2]))
    return _size(picture[0])  # a video as a sequence of frames
