"""Heat maps of per-token information on the image, one panel per measured layer (``vtprune.viz`` pieces)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..errors import VTPruneError
from ..viz import Panel, draw_scores, token_regions
from .information import SampleInformation


def information_panels(
    information: SampleInformation,
    model: nn.Module,
    inputs: Mapping[str, Any],
    images: Sequence[Any],
    *,
    processor: Any | None = None,
    measure: str = "kl",
) -> list[Panel]:
    """One heat map per (measured layer, view of each image) of ``information`` over the sample's ``images``.

    All panels share one colour scale (0 to the sample's largest value), so the fall of information with depth
    shows; tokens not measured stay dimmed. ``inputs`` are the sample's processor inputs, ``images`` what was
    given to the processor (images only: a video's frames are not drawn here).
    """
    if any(modality != "image" for modality, _ in information.items):
        raise VTPruneError("information_panels draws images only; this sample has a video")
    regions = token_regions(model, inputs, images=images, processor=processor)
    values = information.full(measure)
    finite = values[torch.isfinite(values)]
    high = max(float(finite.max()), 1e-12) if finite.numel() else 1.0
    panels = []
    for row, layer in enumerate(information.layers):
        for item, span in zip(regions, information.item_slices()):
            picture = images[item.index]
            if not isinstance(picture, Image.Image):
                picture = Image.fromarray(np.asarray(picture, dtype=np.uint8))
            for view in item.views:
                scores = values[row, span][view.tokens]
                heat = draw_scores(picture.convert("RGB"), view.boxes, scores, vmin=0.0, vmax=high)
                label = "" if len(regions) == 1 and len(item.views) == 1 else f" · image {item.index} {view.label}"
                panels.append(Panel(f"removed from layer {layer}{label}\n{measure}", heat, scale=(0.0, high)))
    return panels
