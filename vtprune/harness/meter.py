"""Per-``generate()`` measurements of one model instance: timings, memory, tokens and what was kept.

Benchmark wrappers call ``model.generate`` in their own code, so the meter observes it from the
outside: forward hooks time the prefill (the first forward of a call, the one whose cache is
empty) and the decode steps, and a wrapper on the instance's ``generate`` times the whole call,
reads the peak GPU memory and takes the prune record of the prefill. Everything is removable;
no class is patched.

A generation that raises is counted and, by default, re-raised as :class:`RunFailed`, a
``BaseException``: benchmark wrappers (lmms-eval's among them) catch ``Exception`` around
``generate()`` and turn it into an empty answer, which would make a pruning bug look like a bad
score. With ``fail_loudly=False`` the original exception goes on to the caller (the wrapper then
records its empty answer) and :attr:`GenerationMeter.failures` says how many there were.
"""

from __future__ import annotations

import functools
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import torch
from torch import nn

from ..engine.handle import PruneHandle
from ..engine.input_hook import bind_arguments
from ..errors import RunFailed
from ..vocabulary.compat import get_cache
from .flops import DecoderShape


@dataclass
class SampleMeasurement:
    """One batch row of one ``generate()`` call."""

    visual_tokens: dict[str, int]
    """Visual tokens of the row before pruning ("before") and after each stage."""
    kept: list[list[int]]
    """Kept token indices of each image / video of the row, after the last stage."""
    layer_lengths: list[int]
    """Tokens that entered each decoder layer (padding excluded)."""
    prefill_flops: int
    kv_cache_bytes: int
    prompt: str = ""


@dataclass
class GenerateMeasurement:
    """One ``generate()`` call."""

    rows: int
    ttft_seconds: float
    """Call start to the end of the prefill forward: image encoding, vtprune's hooks and the prefill."""
    prefill_seconds: float
    """The prefill forward alone (the LLM over the pruned sequence, vtprune's hooks included)."""
    decode_seconds: float
    decode_tokens: int
    """Tokens decoded after the prefill, summed over rows (rows x decode steps)."""
    peak_memory_bytes: int | None
    """Peak CUDA memory allocated during the call (None on CPU)."""
    samples: list[SampleMeasurement] = field(default_factory=list)


@dataclass(kw_only=True)
class RunMeasurements:
    """What the pruning did over a run of ``generate()`` calls: means per sample (visual tokens, layers, FLOPs, KV
    cache) and per call (timings), the failures, and every sample's keep record. Written by a sweep per run and by
    ``--model vtprune`` next to lmms-eval's results.
    """

    visual_tokens_before: float = 0.0
    visual_tokens_kept: float = 0.0
    """Mean visual tokens per sample before pruning, and after the last stage."""
    tokens_per_layer: list[float] = field(default_factory=list)
    """Mean tokens per sample entering each decoder layer (padding excluded)."""
    prefill_flops: float = 0.0
    """Mean analytic LLM prefill FLOPs per sample (vtprune/harness/flops.py)."""
    kv_cache_bytes: float = 0.0
    ttft_seconds: float = 0.0
    prefill_seconds: float = 0.0
    decode_tokens_per_second: float = 0.0
    peak_memory_bytes: int | None = None
    failed_generations: int = 0
    generate_calls: int = 0
    samples: list[dict] = field(default_factory=list)
    """Per batch row of every generate(): visual tokens per stage, kept indices per image, layer lengths."""

    def measure(self, calls: Sequence[GenerateMeasurement], failures: int) -> None:
        """Fill the fields from a run's ``generate()`` measurements and its count of failed calls."""
        samples = [sample for call in calls for sample in call.samples]
        self.generate_calls, self.failed_generations = len(calls), failures
        if samples:
            self.visual_tokens_before = statistics.fmean(s.visual_tokens["before"] for s in samples)
            self.visual_tokens_kept = statistics.fmean(list(s.visual_tokens.values())[-1] for s in samples)
            layers = len(samples[0].layer_lengths)
            self.tokens_per_layer = [statistics.fmean(s.layer_lengths[i] for s in samples) for i in range(layers)]
            self.prefill_flops = statistics.fmean(s.prefill_flops for s in samples)
            self.kv_cache_bytes = statistics.fmean(s.kv_cache_bytes for s in samples)
            self.samples = [asdict(s) for s in samples]
        if calls:
            self.ttft_seconds = statistics.fmean(c.ttft_seconds for c in calls)
            self.prefill_seconds = statistics.fmean(c.prefill_seconds for c in calls)
            decode_seconds = sum(c.decode_seconds for c in calls)
            self.decode_tokens_per_second = (
                sum(c.decode_tokens for c in calls) / decode_seconds if decode_seconds else 0.0
            )
            peaks = [c.peak_memory_bytes for c in calls if c.peak_memory_bytes is not None]
            self.peak_memory_bytes = max(peaks) if peaks else None

    def summary(self) -> str:
        """One line: visual tokens kept, prefill FLOPs, KV cache, TTFT, failed generations."""
        share = 100 * self.visual_tokens_kept / self.visual_tokens_before if self.visual_tokens_before else 0.0
        return (
            f"visual tokens kept {self.visual_tokens_kept:.1f} of {self.visual_tokens_before:.1f} per sample "
            f"({share:.1f} %), prefill {self.prefill_flops / 1e9:.4g} GFLOPs, KV cache "
            f"{self.kv_cache_bytes / 2**20:.3g} MiB per sample, TTFT {1e3 * self.ttft_seconds:.1f} ms, "
            f"{self.generate_calls} generate() calls, {self.failed_generations} failed"
        )


class GenerationMeter:
    """Measures every ``generate()`` of ``model`` until :meth:`close`; ``handle`` supplies the records."""

    def __init__(
        self, model: nn.Module, handle: PruneHandle, tokenizer: Any | None = None, fail_loudly: bool = True
    ) -> None:
        self.model = model
        self.fail_loudly = fail_loudly
        self.handle = handle
        self.tokenizer = tokenizer
        self.shape = DecoderShape.of(handle.adapter.text_model)
        self.calls: list[GenerateMeasurement] = []
        self.failures: list[str] = []
        self.inputs_to_keep = 0
        """How many ``generate()`` calls' arguments to keep in :attr:`inputs` (a sweep re-times them)."""
        self.inputs: list[tuple[tuple, dict[str, Any]]] = []
        """``(args, kwargs)`` of the first ``inputs_to_keep`` calls; kept across :meth:`reset`."""
        self._call: dict[str, Any] | None = None
        self._hooks = [
            model.register_forward_pre_hook(self._before_forward, with_kwargs=True, prepend=True),
            model.register_forward_hook(self._after_forward, with_kwargs=True, always_call=True),
        ]
        # The bound method of the class (torch types module attributes as Tensor | Module); the wrapper below is
        # an instance attribute, restored by deleting it.
        original = cast(Callable[..., Any], model.generate)

        @functools.wraps(original)
        def generate(*args: Any, **kwargs: Any) -> Any:
            return self._generate(original, args, kwargs)

        model.__dict__["generate"] = generate

    def close(self) -> None:
        """Remove the hooks and the ``generate`` wrapper."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self.model.__dict__.pop("generate", None)

    def reset(self) -> None:
        self.calls.clear()
        self.failures.clear()

    # --- timing --------------------------------------------------------------------------------

    def _sync(self) -> None:
        device = next(self.model.parameters()).device
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def _generate(self, original: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
        device = next(self.model.parameters()).device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if len(self.inputs) < self.inputs_to_keep:
            self.inputs.append((args, dict(kwargs)))
        self._sync()
        self._call = {"start": time.perf_counter(), "prefill_end": None, "decode_steps": 0, "rows": 0}
        try:
            output = original(*args, **kwargs)
        except Exception as exc:
            self.failures.append(f"{type(exc).__name__}: {exc}")
            if not self.fail_loudly:
                raise
            raise RunFailed(f"generate() failed under vtprune schedule {self.handle.schedule}: {exc}") from exc
        finally:
            call, self._call = self._call, None
        self._sync()
        end = time.perf_counter()
        prefill_end = call["prefill_end"] or end
        self.calls.append(
            GenerateMeasurement(
                rows=call["rows"],
                ttft_seconds=prefill_end - call["start"],
                prefill_seconds=call.get("prefill_seconds", 0.0),
                decode_seconds=end - prefill_end,
                decode_tokens=call["decode_steps"] * call["rows"],
                peak_memory_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
                samples=self._samples(call.get("input_ids")),
            )
        )
        return output

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if self._call is None:
            return
        arguments = bind_arguments(module.forward, args, kwargs)
        cache = get_cache(arguments)
        self._call["prefilling"] = cache is None or cache.get_seq_length() == 0
        if self._call["prefilling"]:
            ids = arguments.get("input_ids")
            self._call["input_ids"] = ids
            self._call["rows"] = 0 if ids is None else ids.shape[0]
            self._sync()
            self._call["forward_start"] = time.perf_counter()

    def _after_forward(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        call = self._call
        if call is None:
            return
        if call.get("prefilling"):
            self._sync()
            call["prefill_end"] = time.perf_counter()
            call["prefill_seconds"] = call["prefill_end"] - call["forward_start"]
            call["prefilling"] = False
        else:
            call["decode_steps"] += 1

    # --- records -------------------------------------------------------------------------------

    def _samples(self, input_ids: torch.Tensor | None) -> list[SampleMeasurement]:
        record = self.handle.last_record
        if record is None:
            return []
        dtype = next(self.model.parameters()).dtype
        samples = []
        for row in range(record.layer_lengths.shape[0]):
            images = record.for_row(row)
            counts = {"before": sum(image.num_tokens for image in images)}
            for image in images:
                for stage, count in image.tokens_after().items():
                    counts[stage] = counts.get(stage, 0) + count
            lengths = record.layer_lengths[row].tolist()
            prompt = ""
            if self.tokenizer is not None and input_ids is not None:
                prompt = self.tokenizer.decode(input_ids[row], skip_special_tokens=True)
            samples.append(
                SampleMeasurement(
                    visual_tokens=counts,
                    kept=[[] if image.kept is None else image.kept.tolist() for image in images],
                    layer_lengths=lengths,
                    prefill_flops=self.shape.prefill_flops(lengths),
                    kv_cache_bytes=self.shape.kv_cache_bytes(lengths, dtype.itemsize),
                    prompt=prompt,
                )
            )
        return samples


def gather_calls(calls: list[GenerateMeasurement], failures: int) -> tuple[list[GenerateMeasurement], int]:
    """Every rank's measurements, on every rank (identity in a single process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return calls, failures
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, (calls, failures))
    return [call for part, _ in gathered for call in part], sum(count for _, count in gathered)


def library_versions() -> dict[str, str]:
    from importlib.metadata import version

    return {
        **{name: version(name) for name in ("vtprune", "torch", "transformers", "lmms-eval")},
        "python": platform.python_version(),
        "machine": platform.machine(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
