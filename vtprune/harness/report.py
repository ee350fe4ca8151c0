"""A sweep's results as a markdown table and a plot (score and retained % against kept tokens)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .sweep import Run


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown_table(runs: Sequence[Run]) -> str:
    """One row per run: score, retained %, visual tokens, FLOPs, timings, memory."""
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
            f"| {1e3 * run.ttft_seconds:.1f} | {1e3 * run.prefill_seconds:.1f} | {run.decode_tokens_per_second:.1f} "
            f"| {run.kv_cache_bytes / 2**20:.2f} | {_fmt(peak, '.0f')} | {run.failed_generations} |"
        )
    return "\n".join(lines)


def write_table(runs: Sequence[Run], path: Path) -> None:
    path.write_text(markdown_table(runs) + "\n")


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
