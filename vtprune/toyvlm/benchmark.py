"""Accuracy versus visual tokens on the toy VLM: every registered strategy at several budgets, on CPU.

On this task the answer lives in a few object patches and most tokens are plain background, so
*which* tokens survive decides the score: the two oracle rows (object tokens only, background only)
bound what a strategy can reach at each budget. Everything is deterministic given the split seed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from transformers import PreTrainedModel, ProcessorMixin

import vtprune
from vtprune.schedule import parse_strategy
from vtprune.strategies import INPUT_PLACE
from vtprune.toyvlm.data import QUESTION_TYPES, Sample, object_patch_mask
from vtprune.toyvlm.model import accuracy, evaluate, predict

#: Visual tokens kept per image (of the toy model's 144): 100 %, 50 %, 25 %, 11 %, 5 %.
DEFAULT_BUDGETS = (144, 72, 36, 16, 7)
#: Layer for decoder-only strategies that have no default (FastV's K = 2).
DECODER_LAYER = 2


@dataclass
class Row:
    """One line of the table: a schedule (or an oracle), its accuracy and its cost."""

    name: str
    budget: int | None
    series: str
    """The schedule with its budget left out (``divprune``, ``fastv@2``): one line of :func:`format_summary`."""
    kept: float
    """Mean visual tokens per image after the last stage."""
    accuracy: dict[str, float]
    seconds_per_sample: float


def schedules_for(name: str, budgets: Sequence[int], num_layers: int) -> list[tuple[int | None, str]]:
    """(budget, schedule string) pairs that run strategy ``name`` at each budget where it acts alone.

    ``name`` may carry options, ``name(key:value;...)`` (e.g. ``trim(adaptive:true)``). A decoder stage
    that needs a layer and has no default gets :data:`DECODER_LAYER`; a strategy that decides its own
    count (``none``, ``todre_relevance``, adaptive ``trim``) runs once, without a budget; ToDRE's
    relevance stage is also shown behind its own diversity stage, as the paper runs it.
    """
    instance = parse_strategy(name)
    base, options = instance.name, name.replace(" ", "")[len(instance.name) :]
    if INPUT_PLACE in instance.places:
        place = ""
    else:
        place = "" if instance.default_layer(num_layers) is not None else f"@{DECODER_LAYER}"
    if not instance.needs_budget:
        runs: list[tuple[int | None, str]] = [(None, f"{base}{place}{options}")]
        if base == "todre_relevance":
            runs += [(k, f"todre:{k}+{base}{options}") for k in budgets]
        return runs
    return [(k, f"{base}{place}:{k}{options}") for k in budgets]


def series_name(schedule: str, budget: int | None) -> str:
    """``schedule`` with its budget left out (``fastv@2:16`` -> ``fastv@2``): the strategy's line in a summary."""
    return schedule if budget is None else schedule.replace(f":{budget}", "")


def _background_tokens(sample: Sample) -> list[bool]:
    return [not k for k in object_patch_mask(sample)]


def _batches(samples: Sequence[Sample], size: int) -> list[Sequence[Sample]]:
    return [samples[i : i + size] for i in range(0, len(samples), size)]


def _oracle(
    name: str,
    keep_fn: Callable[[Sample], list[bool]] | None,
    model,
    processor,
    samples: Sequence[Sample],
    batch_size: int,
) -> Row:
    """The model with the tokens ``keep_fn`` keeps (all of them where it is ``None``)."""
    start = time.perf_counter()
    scores = evaluate(model, processor, samples, keep_fn, batch_size)
    seconds = (time.perf_counter() - start) / len(samples)
    kept = sum(sum(keep_fn(s)) if keep_fn else len(object_patch_mask(s)) for s in samples) / len(samples)
    return Row(name, None, name, kept, scores, seconds)


def run_schedule(
    schedule: str,
    budget: int | None,
    model: PreTrainedModel,
    processor: ProcessorMixin,
    samples: Sequence[Sample],
    batch_size: int = 50,
) -> Row:
    """One row: ``schedule`` (at ``budget`` tokens per image, ``None`` where it decides its own count) on ``samples``."""
    predictions: list[str] = []
    kept = 0
    start = time.perf_counter()
    with vtprune.pruned(model, schedule, tokenizer=processor) as handle:
        for chunk in _batches(samples, batch_size):
            predictions += predict(model, processor, chunk)
            record = handle.require_record()
            kept += record.visual_tokens_left()  # the record is per forward
    seconds = (time.perf_counter() - start) / len(samples)
    return Row(
        schedule, budget, series_name(schedule, budget), kept / len(samples), accuracy(samples, predictions), seconds
    )


def run_benchmark(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    samples: Sequence[Sample],
    strategies: Sequence[str] | None = None,
    budgets: Sequence[int] = DEFAULT_BUDGETS,
    batch_size: int = 50,
    progress: Callable[[str], None] = lambda line: None,
    oracles: bool = True,
) -> list[Row]:
    """Accuracy per question type of the unpruned model, the oracles (unless ``oracles`` is false: they hide tokens
    in the mask, which llava-torch's one placeholder per image cannot), and every strategy at every budget.

    ``strategies`` defaults to every registered one. Accuracy is read from the first answer token of
    one batched forward per ``batch_size`` samples (answers are one word); pruning runs through the
    same hooks as ``generate()``. Each row's ``kept`` is the mean visual tokens per image after the
    last stage.
    """
    names = [n for n in (strategies or vtprune.list_strategies()) if n != "none"]
    num_layers = getattr(model.config, "text_config", model.config).num_hidden_layers  # llava-torch's is flat
    rows = [_oracle("unpruned", None, model, processor, samples, batch_size)]
    if oracles:
        rows += [
            _oracle("oracle: object tokens only", object_patch_mask, model, processor, samples, batch_size),
            _oracle("oracle: background tokens only", _background_tokens, model, processor, samples, batch_size),
        ]
    progress(f"unpruned: overall {rows[0].accuracy['overall']:.3f}")
    for name in names:
        for budget, schedule in schedules_for(name, budgets, num_layers):
            row = run_schedule(schedule, budget, model, processor, samples, batch_size)
            rows.append(row)
            progress(f"{schedule}: overall {row.accuracy['overall']:.3f}, {row.kept:.1f} tokens kept")
    return rows


def format_table(rows: Sequence[Row], question_types: Sequence[str] = QUESTION_TYPES) -> str:
    """Markdown table: schedule, kept tokens, accuracy per question type and overall, seconds per sample."""
    types = [t for t in question_types if t in rows[0].accuracy]
    header = ["schedule", "kept/image", *types, "overall", "s/sample"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row.name, f"{row.kept:.1f}", *(f"{100 * row.accuracy[t]:.1f}" for t in types)]
        cells += [f"**{100 * row.accuracy['overall']:.1f}**", f"{row.seconds_per_sample:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_summary(rows: Sequence[Row], budgets: Sequence[int]) -> str:
    """Markdown table: overall accuracy (%) of each series (strategy) at each budget, best series first.

    A cell shows the kept count in parentheses where the strategy rounds the budget (Matryoshka's scales). Series
    without a budget (``todre_relevance`` alone) and the oracles stay in :func:`format_table` only; series are ordered
    by mean accuracy over the budgets, ties by name.
    """
    by_series: dict[str, dict[int, Row]] = {}
    for row in rows:
        if row.budget is not None:
            by_series.setdefault(row.series, {})[row.budget] = row
    lines = ["| strategy | " + " | ".join(str(k) for k in budgets) + " |", "|" + "---|" * (len(budgets) + 1)]
    mean = {name: sum(r.accuracy["overall"] for r in cells.values()) / len(cells) for name, cells in by_series.items()}
    for name in sorted(by_series, key=lambda n: (-mean[n], n)):
        cells = []
        for k in budgets:
            measured = by_series[name].get(k)
            cell = "" if measured is None else f"{100 * measured.accuracy['overall']:.1f}"
            if measured is not None and round(measured.kept, 1) != k:
                cell += f" ({measured.kept:g})"
            cells.append(cell)
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_summary(table: str) -> dict[tuple[str, int], float]:
    """Overall accuracy (%) per (series, budget) from a :func:`format_summary` table (the README's)."""
    lines = [line for line in table.strip().splitlines() if line.startswith("|")]
    budgets = [int(cell) for cell in lines[0].strip("|").split("|")[1:]]
    result = {}
    for line in lines[2:]:
        name, *cells = (cell.strip() for cell in line.strip("|").split("|"))
        for k, cell in zip(budgets, cells, strict=True):
            if cell:
                result[name.strip("`"), k] = float(cell.split()[0])
    return result


#: What makes a task a benchmark of token selection (issue 19's targets), as percentage points.
TARGETS = {"unpruned at least": 90.0, "objects-only oracle within": 3.0, "background-only within chance +": 5.0}
RANDOM_GAP = 15.0
"""Random pruning at a quarter of the tokens must score at least this far below the best strategy there."""


def check_targets(rows: Sequence[Row], chance: float) -> list[tuple[str, bool]]:
    """(description with the figures, met?) for each target: the unpruned model reads the task, the objects-only
    oracle keeps that, the background alone is at ``chance`` (overall accuracy, 0-1), and at a quarter of the visual
    tokens the best strategy beats random by :data:`RANDOM_GAP` points (skipped when no row runs at that budget)."""
    overall = {row.name: 100 * row.accuracy["overall"] for row in rows}
    unpruned, objects = overall["unpruned"], overall["oracle: object tokens only"]
    background = overall["oracle: background tokens only"]
    results = [
        (f"unpruned {unpruned:.1f} >= {TARGETS['unpruned at least']:.0f}", unpruned >= TARGETS["unpruned at least"]),
        (
            f"objects-only oracle {objects:.1f} within {TARGETS['objects-only oracle within']:.0f} of unpruned",
            objects >= unpruned - TARGETS["objects-only oracle within"],
        ),
        (
            f"background-only {background:.1f} at chance ({100 * chance:.1f} + {TARGETS['background-only within chance +']:.0f})",
            background <= 100 * chance + TARGETS["background-only within chance +"],
        ),
    ]
    quarter = round(rows[0].kept / 4)
    at_quarter = {row.series: 100 * row.accuracy["overall"] for row in rows if row.budget == quarter}
    if "random" in at_quarter:
        best = max(at_quarter, key=lambda name: (at_quarter[name], name))
        gap = at_quarter[best] - at_quarter["random"]
        results.append(
            (
                (
                    f"random at {quarter} tokens {at_quarter['random']:.1f}, {gap:.1f} below the best there "
                    f"({best}: {at_quarter[best]:.1f}); needed {RANDOM_GAP:.0f}"
                ),
                gap >= RANDOM_GAP,
            )
        )
    return results
