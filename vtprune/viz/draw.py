"""Drawing with PIL only: kept regions left as they are, the rest dimmed and hatched; score heat maps; panel grids.

Works headless and needs no matplotlib (``vtprune.viz.figure`` turns panels into a matplotlib figure).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

#: What Pillow's ``load_default`` returns: a scalable font (Pillow >= 10.1) or the bitmap one.
Font = ImageFont.FreeTypeFont | ImageFont.ImageFont

#: Brightness left to what the model never saw or dropped (kept pixels are untouched).
DIM = 0.3
#: Colour of the frame drawn around every picture of a grid.
FRAME = (90, 90, 90)
#: Anchors of the viridis colour map (perceptually even, readable in grey), interpolated linearly.
_VIRIDIS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)


@dataclass
class Panel:
    """One picture of a grid, with the caption that says what it shows."""

    title: str
    image: Image.Image
    scale: tuple[float, float] | None = None
    """(low, high) of a heat map's colours: a colour bar goes under the picture."""
    scale_label: str = "score"
    """What the heat map's colours measure, written on the colour bar."""


def draw_kept(
    picture: Image.Image, boxes: Tensor, kept: Tensor, *, dim: float = DIM, hatch: bool = True
) -> Image.Image:
    """``picture`` with the pixels of kept tokens' ``boxes`` unchanged and every other pixel dimmed.

    ``boxes`` (n, 4) are pixel boxes of the tokens drawn on this picture, ``kept`` (n,) bool which survived.
    Dropped tokens' boxes are also hatched, so they read as removed even in grey; pixels no token covers
    (cropped away or unpadded by the processor) are only dimmed.
    """
    rgb = np.asarray(picture.convert("RGB"))
    kept_mask = _mask(rgb.shape[:2], boxes[kept])
    dropped_mask = _mask(rgb.shape[:2], boxes[~kept]) & ~kept_mask
    out = (rgb * dim).astype(np.uint8)
    if hatch:
        y, x = np.indices(rgb.shape[:2])
        stripes = ((x + y) % 6 == 0) & dropped_mask
        out[stripes] = 0
    out[kept_mask] = rgb[kept_mask]
    return Image.fromarray(out)


def draw_scores(
    picture: Image.Image,
    boxes: Tensor,
    scores: Tensor,
    *,
    vmin: float | None = None,
    vmax: float | None = None,
    alpha: float = 0.7,
) -> Image.Image:
    """A heat map of per-token ``scores`` (n,) over their ``boxes``, blended onto a dimmed ``picture``.

    Colours run viridis from ``vmin`` (default: the lowest finite score) to ``vmax``; tokens without a
    score (NaN: not a candidate, or gone before that stage) show the dimmed picture.
    """
    rgb = np.asarray(picture.convert("RGB")).astype(np.float64)
    out = rgb * DIM
    finite = torch.isfinite(scores)
    if bool(finite.any()):
        low = float(scores[finite].min()) if vmin is None else vmin
        high = float(scores[finite].max()) if vmax is None else vmax
        colours = colormap((scores.double() - low) / (high - low) if high > low else torch.ones_like(scores.double()))
        for box, colour, ok in zip(_pixel_boxes(boxes, rgb.shape[:2]), colours, finite.tolist()):
            if ok:
                x0, y0, x1, y1 = box
                out[y0:y1, x0:x1] = (1 - alpha) * rgb[y0:y1, x0:x1] + alpha * colour
    return Image.fromarray(out.round().astype(np.uint8))


def colormap(values: Tensor) -> np.ndarray:
    """(n, 3) viridis colours for ``values`` in [0, 1] (clamped)."""
    v = np.clip(values.detach().cpu().double().numpy(), 0, 1) * (len(_VIRIDIS) - 1)
    low = np.floor(v).astype(int).clip(max=len(_VIRIDIS) - 2)
    frac = (v - low)[:, None]
    return _VIRIDIS[low] * (1 - frac) + _VIRIDIS[low + 1] * frac


def legend(width: int, low: float, high: float, *, height: int = 28) -> Image.Image:
    """A colour bar from ``low`` to ``high``, to put under heat maps."""
    bar = colormap(torch.linspace(0, 1, width))[None].repeat(height // 2, axis=0)
    image = Image.new("RGB", (width, height), "white")
    image.paste(Image.fromarray(bar.astype(np.uint8)), (0, 0))
    draw, font = ImageDraw.Draw(image), _font(10)
    draw.text((1, height // 2), f"{low:.3g}", fill="black", font=font)
    text = f"{high:.3g}"
    draw.text((width - 1 - draw.textlength(text, font=font), height // 2), text, fill="black", font=font)
    return image


def grid(panels: Sequence[Panel], columns: int | None = None, *, height: int = 192) -> Image.Image:
    """The panels in a grid, each scaled to ``height`` pixels (nearest: token boundaries stay sharp), captioned."""
    if not panels:
        raise ValueError("no panels to draw")
    columns = columns or len(panels)
    font = _font(12)
    scaled = [
        p.image.resize((max(1, round(p.image.width * height / p.image.height)), height), Image.Resampling.NEAREST)
        for p in panels
    ]
    lines = max(p.title.count("\n") + 1 for p in panels)
    caption = 16 * lines + 4
    bar = 28 + 14 if any(p.scale for p in panels) else 0  # the colour bar, then what it measures
    labels = [p.scale_label for p in panels if p.scale is not None]
    cell_w = max(max(s.width for s in scaled), max(_text_width(p.title, font) for p in panels)) + 12
    if labels:
        cell_w = max(cell_w, max(_text_width(label, _font(10)) for label in labels) + 12)
    cell_h = height + caption + bar + 12
    rows = math.ceil(len(panels) / columns)
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (panel, image) in enumerate(zip(panels, scaled)):
        x, y = (i % columns) * cell_w + 6, (i // columns) * cell_h + 6
        draw.multiline_text((x, y), panel.title, fill="black", font=font, spacing=4)
        sheet.paste(image, (x, y + caption))
        # A frame keeps kept (unchanged, often white) cells on the picture's edge apart from the white sheet.
        draw.rectangle((x - 2, y + caption - 2, x + image.width + 1, y + caption + height + 1), outline=FRAME, width=2)
        if panel.scale is not None:
            sheet.paste(legend(image.width, *panel.scale), (x, y + caption + height + 3))
            draw.text((x, y + caption + height + 3 + 28), panel.scale_label, fill="black", font=_font(10))
    return sheet


def _mask(shape: tuple[int, int], boxes: Tensor) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    for x0, y0, x1, y1 in _pixel_boxes(boxes, shape):
        mask[y0:y1, x0:x1] = True
    return mask


def _pixel_boxes(boxes: Tensor, shape: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """Boxes rounded to whole pixels: adjacent boxes share edges, so every pixel belongs to one token."""
    height, width = shape
    rounded = boxes.double().round().long()
    rounded[:, 0::2] = rounded[:, 0::2].clamp(0, width)
    rounded[:, 1::2] = rounded[:, 1::2].clamp(0, height)
    return [tuple(b) for b in rounded.tolist()]


def _font(size: int) -> Font:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def _text_width(text: str, font: Font) -> int:
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    return int(max(draw.textlength(line, font=font) for line in text.split("\n")))
