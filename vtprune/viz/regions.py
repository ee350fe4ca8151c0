"""Where each visual token lies on the picture it came from: token index -> pixel box.

Nothing here draws, and nothing here knows a model family: each family's adapter declares its geometry
(``ModelAdapter.regions``), read from the model's config and from the processed inputs (``pixel_values``,
``image_sizes``, ``batch_num_images``, ``image_grid_thw``, ``video_grid_thw``), the same information a user has
after calling the processor; boxes are in pixels of the *original* picture whenever its size is known, so
drawings land on what the user gave the processor. Token order is what the record's indices refer to (an
item's placeholder tokens, its row of ``mm_encoder_outputs[...].pooler_output``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from ..adapters import adapter_for
from ..adapters.geometry import ItemRegions, PixelSize, View
from ..errors import VTPruneError
from ..record import ImageRecord, PruneRecord


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
    return adapter_for(model).regions(inputs, _sizes(images), _sizes(videos), processor)


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


def _sizes(pictures: Sequence[Any] | None) -> list[PixelSize] | None:
    """(height, width) of each image, or of each video's first frame."""
    if pictures is None:
        return None
    return [_size(p) for p in pictures]


def _size(picture: Any) -> PixelSize:
    if hasattr(picture, "height") and hasattr(picture, "width"):  # PIL
        return int(picture.height), int(picture.width)
    shape = getattr(picture, "shape", None)
    if shape is not None:  # H x W x C image, or F x H x W x C video
        return (int(shape[0]), int(shape[1])) if len(shape) == 3 else (int(shape[1]), int(shape[2]))
    return _size(picture[0])  # a video as a sequence of frames


__all__ = ["ItemRegions", "View", "match_records", "token_regions"]
