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

from typing import Any

from .plan import SCHEDULE_KEY, UnsupportedScheduleError, make_plan

#: vLLM architecture name -> the pruning class that replaces it, as "module:Class" for lazy import.
ARCHITECTURES = {
    "LlavaForConditionalGeneration": "vtprune.vllm.llava:VTPruneLlavaForConditionalGeneration",
}


def register() -> None:
    """Register the pruning classes with vLLM's model registry (vLLM calls this in every process)."""
    from vllm import ModelRegistry

    for target in ARCHITECTURES.values():
        ModelRegistry.register_model(target.split(":")[1], target)


def engine_args(model: str, schedule: str, architecture: str = "LlavaForConditionalGeneration") -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM`` / ``AsyncEngineArgs`` that serve ``model`` pruned by ``schedule``.

    ``architecture`` is the model's own (stock vLLM) architecture name, from its config.json. The schedule is
    checked here, before any engine starts; unsupported ones raise :class:`UnsupportedScheduleError`.
    """
    make_plan(schedule)
    if architecture not in ARCHITECTURES:
        raise UnsupportedScheduleError(
            f"vtprune's vLLM backend has no pruning class for {architecture!r}; supported: {', '.join(ARCHITECTURES)}"
        )
    pruning_class = ARCHITECTURES[architecture].split(":")[1]
    return {"model": model, "hf_overrides": {"architectures": [pruning_class], SCHEDULE_KEY: schedule}}


__all__ = ["ARCHITECTURES", "SCHEDULE_KEY", "UnsupportedScheduleError", "engine_args", "register"]
