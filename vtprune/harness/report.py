"""A sweep's results (one :class:`Run` per schedule) as a markdown table and a plot (score and retained % against
kept tokens)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .meter import RunMeasurements


@dataclass(kw_only=True)
class Run(RunMeasurements):
    """What one schedule did over the tasks (its measurements are :class:`RunMeasurements`' fields)."""

    schedule: str
    strategy: str
    """The schedule without its budgets: one line per strategy in the plot."""
    budget: str | None
    scores: dict[str, dict[str, float]]
    """task -> metric -> value, as lmms-eval reports them."""
    score: float
    """The headline metric (``metric`` of the first task)."""
    retained: float | None = None
    """``score`` as a percentage of the baseline's."""
    seconds: float = 0.0
    timing: dict[str, float] | None = None
    """The interleaved timing of this schedule (:func:`~vtprune.harness.sweep.time_interleaved`): TTFT and prefill seconds, median,
    min and max over every timed call, and the number of calls; None before the timing pass or with it off."""


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _timed_ms(timing: dict[str, float] | None, name: str) -> str:
    """``median [min–max]`` of the interleaved timing of ``name`` (ttft, prefill) in ms."""
    if timing is None:
        return "–"
    median, low, high = (1e3 * timing[f"{name}_{stat}_seconds"] for stat in ("median", "min", "max"))
    return f"{median:.1f} [{low:.1f}–{high:.1f}]"


def timing_note(timing: dict[str, Any] | None) -> str:
    """What the table's timed columns are, with the load average during the timing (one paragraph)."""
    if timing is None:
        return (
            "TTFT and prefill: not timed (timing off, no generate() calls in the tasks, or the sweep stopped "
            "before its timing pass). Decode tok/s and sweep.json's per-run ttft_seconds were measured one run "
            "after another, so they do not compare across runs under a changing load."
        )
    start = " / ".join(f"{load:.1f}" for load in timing["load_average_start"])
    end = " / ".join(f"{load:.1f}" for load in timing["load_average_end"])
    return (
        f"TTFT and prefill ms: median [min–max] over {timing['rounds']} interleaved rounds × "
        f"{timing['calls_per_round']} generate() calls to the first token (the task's first calls; round r runs "
        f"every schedule once, in an order rotated by r). Load average (1 / 5 / 15 min): {start} at the start, "
        f"{end} at the end. Decode tok/s is from each run's own evaluation, one run after another, so it does not "
        "compare across runs under a changing load."
    )


def markdown_table(runs: Sequence[Run]) -> str:
    """One row per run: score, retained %, visual tokens, FLOPs, interleaved timings, memory."""
    header = (
        "| schedule | score | retained % | visual tokens kept | prefill GFLOPs | TTFT ms | prefill ms "
        "| decode tok/s | KV cache MiB | peak GPU MiB | failed |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for run in runs:
        peak = None if run.peak_memory_bytes is None else run.peak_memory_bytes / 2**20
        lines.append(
            f"| {run.schedule} | {run.score:.4f} | {_fmt(run.retained, '.1f')} "
            f"| {run.visual_tokens_kept:.1f} / {run.visual_tokens_before:.1f} | {run.prefill_flops / 1e9:.4g} "
            f"| {_timed_ms(run.timing, 'ttft')} | {_timed_ms(run.timing, 'prefill')} "
            f"| {run.decode_tokens_per_second:.1f} "
            f"| {run.kv_cache_bytes / 2**20:.2f} | {_fmt(peak, '.0f')} | {run.failed_generations} |"
        )
    return "\n".join(lines)


def write_table(runs: Sequence[Run], path: Path, timing: dict[str, Any] | None = None) -> None:
    """The table and, under it, what its timed columns are (:func:`timing_note`)."""
    path.write_text(markdown_table(runs) + "\n\n" + timing_note(timing) + "\n")


#: Markers and line styles cycled over strategies, so lines that coincide (e.g. several at the baseline's score)
#: stay visible: each later line is drawn thinner with smaller markers on top of the earlier ones.
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
_LINES = ("-", "--", "-.", ":")


def write_plot(runs: Sequence[Run], path: Path, score_label: str = "score") -> None:
    """Score and retained % against visual tokens kept, one line per strategy, the baseline as a line.

    ``score_label`` names the headline metric and task on the y axis (e.g. ``accuracy on vtprune_shapes``).
    """
    from matplotlib.figure import Figure  # no pyplot: the caller's backend (a notebook's) stays as it is

    figure = Figure(figsize=(11, 4))
    score_axis, retained_axis = figure.subplots(1, 2)
    baseline = next((run for run in runs if run.strategy == "none"), None)
    by_strategy: dict[str, list[Run]] = {}
    for run in runs:
        if run is not baseline:
            by_strategy.setdefault(run.strategy, []).append(run)
    for index, (strategy, group) in enumerate(sorted(by_strategy.items())):
        group = sorted(group, key=lambda run: run.visual_tokens_kept)
        kept = [run.visual_tokens_kept for run in group]
        style = {
            "marker": _MARKERS[index % len(_MARKERS)],
            "linestyle": _LINES[index % len(_LINES)],
            "markersize": max(3.0, 10.0 - 1.5 * index),
            "linewidth": max(1.0, 3.0 - 0.4 * index),
            "label": strategy,
            "zorder": 3 + index,
        }
        score_axis.plot(kept, [run.score for run in group], **style)
        retained_axis.plot(kept, [run.retained or 0.0 for run in group], **style)
    if baseline is not None:
        score_axis.axhline(baseline.score, color="black", linestyle="--", label="unpruned")
        retained_axis.axhline(100.0, color="black", linestyle="--", label="unpruned")
    figure.suptitle(f"{score_label} against visual tokens kept", fontsize=10)
    for axis, label in ((score_axis, score_label), (retained_axis, "retained % of unpruned")):
        axis.set_xlabel("visual tokens kept per sample")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    score_axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
