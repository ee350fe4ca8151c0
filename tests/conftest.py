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

import vtprune  # noqa: E402
from vtprune.adapters import architecture, architecture_of  # noqa: E402
from vtprune.errors import VTPruneError  # noqa: E402
from vtprune.schedule import as_schedule  # noqa: E402
from vtprune.strategies.registry import list_strategies  # noqa: E402
from vtprune.testing import MODEL_KINDS, RowSpec, build_inputs, build_model  # noqa: E402

#: The enrolment every generic test runs over: what vtprune itself registers (taken before any test module
#: registers a probe), so a new built-in strategy is covered without editing the tests.
STRATEGIES = tuple(list_strategies())
#: The families every generic test runs over (``MODEL_KINDS``): every architecture the registry in
#: ``vtprune.adapters`` declares, so a new family is covered without editing the tests.
FAMILIES = MODEL_KINDS

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
    arch = architecture(kind)
    square, wide = arch.test_images  # in the family's own image units (base tiles, merged-token grids, ...)
    if rows == 1:
        return [RowSpec(images=[square])]
    spec = [RowSpec(images=[square]), RowSpec(images=[wide, square], text_before=1), RowSpec(images=[], text_before=2)]
    if arch.takes_video:
        spec[2] = RowSpec(images=[], videos=1, text_before=2)
    return spec


def refusal(model, schedule, **options) -> str | None:
    """What ``prune(model, schedule)`` must refuse, from what the family declares (None: it must run it).

    Decoder stages with sliding-window layers from their layer on (the layer types of the config), and strategies
    that read an input the family's adapter cannot give (``unavailable_inputs``).
    """
    config = model.config.get_text_config()
    resolved = as_schedule(schedule, **options).resolved(config.num_hidden_layers)
    layer_types = getattr(config, "layer_types", None) or []
    for stage in resolved.decoder_stages:
        if any(kind != "full_attention" for kind in layer_types[stage.layer :]):
            return "sliding-window"
    unavailable = architecture_of(model).adapter.unavailable_inputs
    if any(stage.strategy.needs & unavailable.keys() for stage in resolved.stages):
        return "cannot give"
    return None


def refuses(model, schedule, **options) -> bool:
    """True (after checking the refusal is loud and leaves no hook) where the family cannot run ``schedule``."""
    why = refusal(model, schedule, **options)
    if why is None:
        return False
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    with pytest.raises(VTPruneError, match=why):
        vtprune.prune(model, schedule, **options)
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == hooks
    return True


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


__all__ = ["FAMILIES", "MODEL_KINDS", "STRATEGIES", "refuses"]


@pytest.fixture(autouse=True)
def isolated_registry(monkeypatch):
    """Strategies a test registers are gone after it (the registry is global; other tests list it)."""
    from vtprune.strategies import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
