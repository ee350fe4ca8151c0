"""vtprune's vLLM backend: input-stage pruning inside vLLM's model classes, loaded as an out-of-tree plugin.

vLLM calls :func:`register` in every process (entry point ``vllm.general_plugins`` in pyproject.toml); it
registers the pruning model classes under their own architecture names. An engine opts in through
``hf_overrides``, which :func:`engine_args` writes::

    from vllm import LLM
    llm = LLM(**vtprune.vllm.engine_args("path/to/llava", "divprune:64"), max_model_len=2048)

Importing this package does not import vLLM (only :func:`register` does), so the schedule checks of
:mod:`vtprune.vllm.plan` work without it.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ..errors import UnsupportedModelError
from .plan import SCHEDULE_KEY, UnsupportedScheduleError, cls_refusal, make_plan

#: The LLaVA architecture, whose [CLS]-reading schedules :func:`engine_args` checks against the folder's config.
LLAVA = "LlavaForConditionalGeneration"

#: vLLM architecture name -> the pruning class that replaces it, as "module:Class" for lazy import.
ARCHITECTURES = {
    LLAVA: "vtprune.vllm.llava:VTPruneLlavaForConditionalGeneration",
    "Qwen2VLForConditionalGeneration": "vtprune.vllm.qwen2_vl:VTPruneQwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": "vtprune.vllm.qwen2_5_vl:VTPruneQwen2_5_VLForConditionalGeneration",
    "Qwen3VLForConditionalGeneration": "vtprune.vllm.qwen3_vl:VTPruneQwen3VLForConditionalGeneration",
}

#: Architectures vLLM serves that this backend refuses, and why.
REFUSED = {
    name: "its AnyRes images are tiles plus one newline token per row, and vLLM's front-end counts them from the "
    "image size with unpadding: a pruning class would have to rewrite that count and hand back newline rows in "
    "place, which this backend does not do yet. Prune these models on vtprune's transformers path"
    for name in ("LlavaNextForConditionalGeneration", "LlavaOnevisionForConditionalGeneration")
}


def register() -> None:
    """Register the pruning classes with vLLM's model registry (vLLM calls this in every process)."""
    from vllm import ModelRegistry

    for target in ARCHITECTURES.values():
        ModelRegistry.register_model(target.split(":")[1], target)


def engine_args(model: str, schedule: str | None = None, architecture: str | None = None) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM`` / ``AsyncEngineArgs`` that serve ``model`` with vtprune's pruning class.

    ``schedule`` is the engine's default (requests may override it with
    ``mm_processor_kwargs={"vtprune_schedule": ...}``); None prunes only requests that ask. ``architecture``
    is the model's own architecture name, read from ``model``'s config.json when ``model`` is a folder. The
    schedule is checked here, before any engine starts: unsupported ones raise :class:`UnsupportedScheduleError`.
    """
    if schedule is not None:
        make_plan(schedule)
    if architecture is None:
        architecture = _architecture_of(model)
    config = Path(model) / "config.json"
    if (
        schedule is not None
        and make_plan(schedule).reads("cls_attention")
        and architecture == LLAVA
        and config.is_file()
    ):
        # Read from the folder's config.json (hf_overrides added later are the front-end's to check, per request).
        refusal = cls_refusal(_llava_config(config))
        if refusal is not None:  # else every request would fail, down to vLLM's profiling run at engine start
            raise UnsupportedModelError(f"{schedule!r} reads the vision tower's [CLS] attention: {refusal}")
    if architecture in REFUSED:
        raise UnsupportedScheduleError(f"vtprune's vLLM backend does not prune {architecture}: {REFUSED[architecture]}")
    if architecture not in ARCHITECTURES:
        raise UnsupportedScheduleError(
            f"vtprune's vLLM backend has no pruning class for {architecture!r}; supported: {', '.join(ARCHITECTURES)}"
        )
    overrides: dict[str, Any] = {"architectures": [ARCHITECTURES[architecture].split(":")[1]]}
    if schedule is not None:
        overrides[SCHEDULE_KEY] = schedule
    return {"model": model, "hf_overrides": overrides}


def _llava_config(path: Path) -> SimpleNamespace:
    """What :func:`~vtprune.vllm.plan.cls_refusal` reads of a LLaVA's config.json (transformers' defaults where it
    leaves them out or null)."""
    config = json.loads(path.read_text())
    tower = SimpleNamespace(model_type=(config.get("vision_config") or {}).get("model_type", "clip_vision_model"))
    return SimpleNamespace(vision_config=tower, vision_feature_layer=config.get("vision_feature_layer", -2))


def _architecture_of(model: str) -> str:
    config = Path(model) / "config.json"
    if not config.is_file():
        raise UnsupportedScheduleError(
            f"cannot read the architecture of {model!r} (no local config.json); pass architecture= (e.g. "
            f"{next(iter(ARCHITECTURES))!r})"
        )
    return json.loads(config.read_text())["architectures"][0]


__all__ = ["ARCHITECTURES", "REFUSED", "SCHEDULE_KEY", "UnsupportedScheduleError", "engine_args", "register"]
