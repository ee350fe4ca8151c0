"""``--model vtprune`` for lmms-eval: the backbone's own lmms-eval wrapper, with its model pruned.

The backbone wrapper (lmms-eval's own wrapper of the family, ``Architecture.backbone``) is
chosen from the checkpoint's ``config.model_type`` and does all prompting, batching and decoding
exactly as it does without vtprune; this class only prunes the model it loaded, measures every
``generate()`` and makes failures loud. Arguments vtprune reads are taken out of ``--model_args``;
everything else goes to the backbone (``device_map``, ``max_pixels``, ``attn_implementation``...).
"""

from __future__ import annotations

import importlib
import json
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.model import lmms
from loguru import logger
from transformers import PretrainedConfig

from ..adapters import ARCHITECTURES
from ..adapters.base import Backbone
from ..api import prune
from ..engine.handle import PruneHandle
from ..schedule import Schedule, as_schedule, make_stage, parse_strategy
from .meter import GenerationMeter, RunFailed, RunMeasurements, gather_calls, library_versions
from .presets import preset_schedule

#: config.model_type -> lmms-eval simple wrapper that loads and prompts that family, as each family declares it
#: (``Architecture.backbone``, with what the wrapper needs: one sample at a time, a CPU device map).
BACKBONES: dict[str, Backbone] = {arch.model_type: arch.backbone for arch in ARCHITECTURES if arch.backbone}
ON_ERROR = ("raise", "count")
#: Where measurements go when lmms-eval was started without ``--output_path``.
DEFAULT_MEASUREMENTS_DIR = "vtprune_measurements"


def lmms_eval_output_path(argv: list[str]) -> str | None:
    """The ``--output_path`` of an lmms-eval command line (``--output_path X`` or ``--output_path=X``), if any."""
    for index, arg in enumerate(argv):
        if arg == "--output_path" and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith("--output_path="):
            return arg.split("=", 1)[1]
    return None


def schedule_from_args(
    strategy: str = "none",
    keep: int | None = None,
    keep_ratio: float | None = None,
    layer: int | None = None,
    preset: str | None = None,
) -> Schedule:
    """The schedule ``--model_args`` describe: a preset, a schedule string, or one strategy with a budget.

    ``strategy`` may carry options, ``mmtok(alpha:0.3)``, or be a whole schedule string
    (``divprune:64+random_deep:50%``, no ``keep``/``layer`` then).
    """
    if preset is not None:
        if strategy != "none" or keep is not None or keep_ratio is not None or layer is not None:
            raise ValueError("give either preset= or strategy=/keep=/keep_ratio=/layer=, not both")
        return preset_schedule(preset)
    if keep is None and keep_ratio is None and layer is None:
        return as_schedule(strategy)
    return Schedule([make_stage(parse_strategy(strategy), layer=layer, keep=keep, keep_ratio=keep_ratio)])


def backbone_of(pretrained: str, batch_size: int | str = 1) -> Backbone:
    """The lmms-eval wrapper the checkpoint's model family declares.

    Refuses a batch size the wrapper cannot run, before any weights load: lmms-eval's ``llava_hf`` would fail on
    its first batch, and lmms-eval turns that into an error message and exit code 0.
    """
    # Read from config.json: AutoConfig knows llava-torch's model types only once llava has been imported.
    model_type = PretrainedConfig.get_config_dict(pretrained)[0].get("model_type")
    if model_type not in BACKBONES:
        raise ValueError(
            f"{pretrained} is a {model_type!r} checkpoint; vtprune's lmms-eval model supports "
            f"{', '.join(sorted(BACKBONES))}"
        )
    backbone = BACKBONES[model_type]
    if backbone.one_sample_at_a_time and str(batch_size) != "1":
        raise ValueError(
            f"--batch_size {batch_size}: lmms-eval's {backbone.module.rsplit('.', 1)[-1]} wrapper, which runs "
            f"{model_type!r} checkpoints, generates one sample at a time; pass --batch_size 1"
        )
    return backbone


def backbone_class(backbone: Backbone) -> type[lmms]:
    """The lmms-eval wrapper class itself (imported only when needed)."""
    return getattr(importlib.import_module(backbone.module), backbone.name)


class VTPruneLMM(lmms):
    """lmms-eval model ``vtprune``: ``pretrained=DIR,strategy=divprune,keep=64`` (see the module docstring).

    vtprune's own arguments: ``strategy`` (a name, ``name(options)`` or a schedule string), ``keep``,
    ``keep_ratio``, ``layer``, ``preset`` (a named setting from ``configs/``), ``seed``, ``newlines``,
    ``on_error``: ``raise`` (default) stops the run at the first failed ``generate()``; ``count``
    lets the backbone record an empty answer, counts it in :attr:`meter` and reports it; and ``measurements``:
    where the run's :class:`RunMeasurements` go when lmms-eval ends the evaluation (``auto``: a JSON file in
    lmms-eval's ``--output_path``, else in ``./vtprune_measurements``; a folder; or ``off``), with a one-line summary.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        strategy: str = "none",
        keep: int | None = None,
        keep_ratio: float | None = None,
        layer: int | None = None,
        preset: str | None = None,
        seed: int = 0,
        newlines: str = "candidate",
        on_error: str = "raise",
        measurements: str = "auto",
        device: str | None = None,
        **backbone_args: Any,
    ) -> None:
        try:
            if on_error not in ON_ERROR:
                raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
            schedule = schedule_from_args(strategy, keep, keep_ratio, layer, preset)  # fail before loading weights
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            backbone = backbone_of(pretrained, backbone_args.get("batch_size", 1))
            # llava_hf's default device_map="" fails with transformers 5.x; Qwen's defaults to "cuda".
            cpu_map = backbone.cpu_device_map if device == "cpu" else None
            backbone_args.setdefault("device_map", cpu_map or device)
            self.backbone = backbone_class(backbone)(pretrained=pretrained, device=device, **backbone_args)
            super().__init__()
            self.pretrained = pretrained
            self.seed, self.newlines, self.on_error = seed, newlines, on_error
            self.measurements = measurements
            self.handle = self._prune(schedule)
            self.meter = GenerationMeter(
                self.model, self.handle, tokenizer=self.tokenizer, fail_loudly=self.on_error == "raise"
            )
        except Exception as exc:  # lmms-eval would print it and exit 0: see RunFailed
            raise RunFailed(f"vtprune could not set up {pretrained}: {type(exc).__name__}: {exc}") from exc

    # --- pruning -------------------------------------------------------------------------------

    @property
    def model(self) -> torch.nn.Module:
        return self.backbone.model

    @property
    def schedule(self) -> Schedule:
        return self.handle.schedule

    def set_schedule(self, schedule: str | Schedule) -> None:
        """Prune the loaded model with ``schedule`` from now on (what a sweep does between runs)."""
        self.handle.remove()
        self.handle = self._prune(schedule)
        self.meter.handle = self.handle
        self.meter.reset()

    def _prune(self, schedule: str | Schedule) -> PruneHandle:
        return prune(self.model, schedule, seed=self.seed, newlines=self.newlines, tokenizer=self.tokenizer)

    def clean(self) -> None:
        """lmms-eval's end of an evaluation: write and summarise what the pruning did, then lmms-eval's own clean-up."""
        if self.measurements != "off":
            self.write_measurements()
        super().clean()

    def write_measurements(self) -> Path | None:
        """Write this run's measurements (every rank's, gathered) as JSON and print a one-line summary (rank 0)."""
        calls, failures = gather_calls(list(self.meter.calls), len(self.meter.failures))
        if self.rank != 0:
            return None
        run = RunMeasurements()
        run.measure(calls, failures)
        folder = self.measurements
        if folder == "auto":
            folder = lmms_eval_output_path(sys.argv) or DEFAULT_MEASUREMENTS_DIR
        stamp = time.strftime("%Y%m%dT%H%M%S")
        path = Path(folder) / f"vtprune_{re.sub(r'[^A-Za-z0-9.@%+-]+', '_', str(self.schedule))}_{stamp}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "pretrained": self.pretrained,
            "schedule": str(self.schedule),
            "versions": library_versions(),
            "measurements": asdict(run),
        }
        path.write_text(json.dumps(payload, indent=1))
        print(f"vtprune: {self.schedule}: {run.summary()}; measurements in {path}", flush=True)
        return path

    def close(self) -> None:
        """Unwrap the model: remove the meter and the pruning hooks."""
        self.meter.close()
        self.handle.remove()

    # --- lmms-eval interface: the backbone does the work --------------------------------------

    @property
    def task_dict(self) -> dict:
        return self.backbone.task_dict

    @task_dict.setter
    def task_dict(self, value: dict) -> None:
        self.backbone.task_dict = value

    @property
    def cache_hook(self) -> Any:
        return self.backbone.cache_hook

    @cache_hook.setter
    def cache_hook(self, value: Any) -> None:
        self.backbone.cache_hook = value

    @property
    def tokenizer(self) -> Any:
        return self.backbone.tokenizer

    @property
    def batch_size(self) -> int:
        return self.backbone.batch_size

    @property
    def device(self) -> Any:
        return self.backbone.device

    def _delegate(self, method: str, requests: list) -> list:
        if self.world_size > 1:  # lmms-eval sets our rank; the backbone's tqdm and logging read its own
            self.backbone._rank, self.backbone._world_size = self.rank, self.world_size
        failed_before = len(self.meter.failures)
        try:
            results = getattr(self.backbone, method)(requests)
        except Exception as exc:  # lmms-eval would log it and exit 0 without scores: see RunFailed
            raise RunFailed(
                f"{type(self.backbone).__name__}.{method} failed under {self.schedule}: {type(exc).__name__}: {exc}"
            ) from exc
        failed = len(self.meter.failures) - failed_before
        if failed:
            # Only reachable with on_error="count": "raise" has already stopped the run.
            logger.error(f"vtprune: {failed} generate() calls failed under {self.schedule}; counted as empty answers")
        return results

    def generate_until(self, requests: list) -> list:
        return self._delegate("generate_until", requests)

    def loglikelihood(self, requests: list) -> list:
        return self._delegate("loglikelihood", requests)

    def generate_until_multi_round(self, requests: list) -> list:
        return self._delegate("generate_until_multi_round", requests)
