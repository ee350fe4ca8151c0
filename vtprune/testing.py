"""Random-weight models of every supported class, built from configs, with matching inputs, and the peak memory of
a call: fixtures for tests and benchmarks, not library code.

They prove the mechanics (and time them) without any download: tests use the tiny sizes,
``eval/bench_prefill.py`` the mid sizes. Each family declares its config and input layout in its adapter module
(``Architecture.random_config`` / ``random_inputs``): placeholder tokens where the images go, the counts taken
from the model's own vision encoder.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import transformers
from PIL import Image
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

from .adapters import ARCHITECTURES, architecture, architecture_of
from .adapters.random_weights import (
    BOS,
    FIRST_TEXT_ID,
    IMAGE,
    MID,
    PAD,
    TINY,
    VIDEO,
    VISION_END,
    VISION_START,
    RowSpec,
    Size,
)
from .errors import UnsupportedModelError

#: Every supported class by the name tests and benchmarks build it by (its ``config.model_type``).
MODEL_KINDS = tuple(arch.model_type for arch in ARCHITECTURES if arch.random_config is not None)


def build_model(kind: str, size: Size = TINY, *, attn_implementation: str = "sdpa", seed: int = 0) -> nn.Module:
    """A randomly initialised ``*ForConditionalGeneration`` of ``kind`` (one of ``MODEL_KINDS``), in eval mode."""
    arch = architecture(kind)
    if arch.random_config is None:
        raise UnsupportedModelError(f"{arch.model_class} is not a transformers class; vtprune.testing cannot build it")
    torch.manual_seed(seed)
    config = arch.random_config(size)
    config._attn_implementation = attn_implementation
    model = getattr(transformers, arch.model_class)(config)
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = None
    return model.eval()


def build_inputs(model: nn.Module, rows: list[RowSpec], *, seed: int = 0) -> dict[str, Tensor]:
    """Left-padded inputs for ``rows``, as the model's processor would lay them out.

    Image sizes are in the units of the model's family (``Architecture.test_images`` gives a square and a wide
    one): base tiles for the LLaVA family ((1, 1) one tile, (1, 2) a wide AnyRes image), the merged-token grid
    (h, w) for Qwen.
    """
    arch = architecture_of(model)
    if arch.random_inputs is None:
        raise UnsupportedModelError(
            f"{arch.model_class} is not a transformers class; vtprune.testing cannot lay out its inputs"
        )
    sequences, extra = arch.random_inputs(model, rows, torch.Generator().manual_seed(seed))
    length = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(rows), length), PAD, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, ids in enumerate(sequences):
        input_ids[i, length - len(ids) :] = torch.tensor(ids)
        attention_mask[i, length - len(ids) :] = 1
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, **extra)
    if arch.token_types is not None:
        inputs[arch.token_types] = (input_ids == IMAGE).long() + 2 * (input_ids == VIDEO).long()
    return inputs


def gradient(height: int, width: int, blue: int) -> Image.Image:
    """Red = 255 x / width, green = 255 y / height at pixel centres: every patch has its own colour."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([255 * (x + 0.5) / width, 255 * (y + 0.5) / height, np.full(x.shape, blue)], -1)
    return Image.fromarray(rgb.round().astype(np.uint8))


__all__ = ["BOS", "FIRST_TEXT_ID", "IMAGE", "MID", "MODEL_KINDS", "PAD", "TINY", "VIDEO", "VISION_END"]
__all__ += ["VISION_START", "RowSpec", "Size", "build_inputs", "build_model", "gradient", "peak_extra_bytes"]


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Largest net tensor memory ``fn`` holds at once on ``device``: the running sum of the profiler's allocation
    (+) and free (-) events (``profile_memory=True``: every tensor the allocator hands out and takes back; inputs
    made before the call and library-internal scratch such as MKL's are not counted), from zero at the call."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    wanted = "CUDA" if device.type == "cuda" else "CPU"
    held = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        if wanted in str(event.device_type()):
            held += event.nbytes()
            peak = max(peak, held)
    return peak
