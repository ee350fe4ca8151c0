import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

# Everything the tests load is local; never wait on a hub (CI has no network but the package registries).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))  # tests/reference.py

from vtprune.strategies.registry import list_strategies  # noqa: E402
from vtprune.testing import MODEL_KINDS, RowSpec, build_inputs, build_model  # noqa: E402

#: The enrolment every generic test runs over: what vtprune itself registers (taken before any test module
#: registers a probe), so a new built-in strategy is covered without editing the tests.
STRATEGIES = tuple(list_strategies())

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def models():
    """One tiny random-weight model per class, built once (tests must not leave hooks on them)."""
    cache = {}

    def get(kind: str, attn_implementation: str = "sdpa"):
        key = (kind, attn_implementation)
        if key not in cache:
            cache[key] = build_model(kind, attn_implementation=attn_implementation)
        return cache[key]

    return get


def batch_rows(kind: str, rows: int) -> list[RowSpec]:
    """B=1: one image. B=3: rows with different visual token counts, two images in a row, a text-only row
    (and a video where the class takes video)."""
    # LLaVA family: image sizes in base tiles; Qwen: the merged-token grid (h, w) of each image.
    square, wide = ((2, 2), (2, 3)) if kind.startswith("qwen") else ((1, 1), (1, 1) if kind == "llava" else (1, 2))
    if rows == 1:
        return [RowSpec(images=[square])]
    spec = [RowSpec(images=[square]), RowSpec(images=[wide, square], text_before=1), RowSpec(images=[], text_before=2)]
    if kind in ("llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        spec[2] = RowSpec(images=[], videos=1, text_before=2)
    return spec


@pytest.fixture(scope="session")
def arrays():
    """The input and output arrays of the parity cases, by name."""
    from parity import DATA

    with np.load(DATA / "parity.npz") as npz:
        yield npz


@pytest.fixture
def make_inputs():
    def make(model, kind: str, rows: int, seed: int = 0):
        return build_inputs(model, batch_rows(kind, rows), seed=seed)

    return make


@pytest.fixture(autouse=True)
def _quiet_budget_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        yield


__all__ = ["MODEL_KINDS", "STRATEGIES"]


@pytest.fixture(autouse=True)
def isolated_registry(monkeypatch):
    """Strategies a test registers are gone after it (the registry is global; other tests list it)."""
    from vtprune.strategies import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
