"""Real photographs for pictures and benchmarks: scikit-learn's two sample images, as model inputs or as patches.

``sklearn.datasets.load_sample_images`` ships china.jpg and flower.jpg (CC BY 2.0; attribution in
docs/PHOTO_ATTRIBUTION.md). scikit-learn is in the ``eval`` extra, not the core install, so it is imported on use.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from ..adapters.llava import clip_photo_inputs

LLAVA_TOKENS = 576  # LLaVA-1.5: CLIP 336 px, patch 14 -> 24 x 24


def sample_photos() -> list[Image.Image]:
    """scikit-learn's sample photographs, [china.jpg, flower.jpg] (427 x 640 RGB each)."""
    try:
        from sklearn.datasets import load_sample_images
    except ImportError as error:
        raise ImportError("the sample photos come with scikit-learn: pip install 'vtprune[eval]'") from error
    return [Image.fromarray(image) for image in load_sample_images().images]


def photo_patches(photo: Image.Image, count: int, patch: int = 14) -> torch.Tensor:
    """``count`` flattened ``patch`` x ``patch`` RGB patches of ``photo`` in [0, 1], row by row, shape
    (count, 3 * patch²): the photo's centre square is resized to the smallest square grid of patches that holds
    ``count`` and the first ``count`` patches are taken (a vision encoder's patchify, without the encoder)."""
    side = math.isqrt(count - 1) + 1
    width, height = photo.size
    edge = min(width, height)
    left, top = (width - edge) // 2, (height - edge) // 2
    square = photo.convert("RGB").crop((left, top, left + edge, top + edge))
    pixels = np.asarray(square.resize((side * patch, side * patch), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    grid = pixels.reshape(side, patch, side, patch, 3).transpose(0, 2, 1, 3, 4).reshape(side * side, -1)
    return torch.from_numpy(grid[:count].copy())


def llava_photo_inputs(photo: Image.Image) -> tuple:
    """(processor, inputs) for one photo and a short prompt on ``vtprune.testing``'s LLaVA at the LLaVA-1.5
    geometry (``build_model("llava", MID)``): CLIP's 336 px resize and centre crop, 576 image tokens."""
    return clip_photo_inputs(photo, 336, LLAVA_TOKENS)
