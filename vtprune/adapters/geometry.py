"""Token -> image-region vocabulary shared by the family adapters (who know a family's geometry) and ``viz``.

Boxes are ``(x0, y0, x1, y1)`` float64 pixels. Nothing here draws or knows a model family.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError

#: (height, width) in pixels.
PixelSize = tuple[int, int]


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
    size: PixelSize
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


def cell_boxes(rows: int, cols: int, cell: float) -> Tensor:
    """(rows * cols, 4) pixel boxes of a raster grid of square cells of side ``cell``."""
    y, x = torch.meshgrid(
        torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64), indexing="ij"
    )
    corners = torch.stack([x, y, x + 1, y + 1], -1).view(-1, 4)
    return corners * cell


def clip_boxes(boxes: Tensor, size: PixelSize) -> Tensor:
    height, width = size
    limits = torch.tensor([width, height] * 2, dtype=torch.float64)
    return boxes.clamp(min=0).minimum(limits)


def stretch(boxes: Tensor, source: PixelSize, target: PixelSize) -> Tensor:
    """Boxes on a ``source``-sized picture moved onto the ``target``-sized one it was resized from."""
    scale = torch.tensor([target[1] / source[1], target[0] / source[0]] * 2, dtype=torch.float64)
    return boxes * scale


def sample_boxes(y: Tensor, x: Tensor, grid: tuple[int, int]) -> Tensor:
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


def no_tokens() -> Tensor:
    return torch.zeros(0, dtype=torch.int64)


def shape_only(height: int, width: int) -> np.ndarray:
    """A channels-first array of that size without memory, for transformers' size helpers (they read .shape)."""
    return np.broadcast_to(np.zeros((), dtype=np.uint8), (3, height, width))


def setting(config: Any, name: str) -> Any:
    """A field of a processor's size setting (a dict, or transformers' ``SizeDict``)."""
    return config.get(name) if isinstance(config, dict) else getattr(config, name, None)


def square_grid_regions(
    pixel_values: Tensor, side: int, sizes: list[PixelSize] | None, to_original: Any
) -> list[ItemRegions]:
    """One square raster of ``side`` x ``side`` tokens per processed square image (``pixel_values``: (N, 3, S, S)).

    ``to_original(boxes, size)`` maps boxes in processed pixels onto the original picture of ``size``; it is
    used only when ``sizes`` (the originals') are known, else boxes stay in processed pixels.
    """
    processed = int(pixel_values.shape[-1])
    if sizes and len(sizes) != pixel_values.shape[0]:  # e.g. Gemma 3's pan-and-scan crops: extra square images
        raise InputError(
            f"images gives {len(sizes)} pictures but the inputs hold {pixel_values.shape[0]} square images; pass "
            "one picture per processed image, or images=None for boxes in processed pixels"
        )
    cells = torch.arange(side * side)
    grid = cell_boxes(side, side, processed / side)
    items = []
    for i in range(pixel_values.shape[0]):
        size = sizes[i] if sizes else (processed, processed)
        boxes = to_original(grid, size) if sizes else grid
        view = View("image", 0, cells, clip_boxes(boxes, size))
        items.append(ItemRegions("image", i, side * side, size, (view,), no_tokens()))
    return items
