"""``vtprune sweep``: the unpruned baseline and every (strategy, budget) of one model, in one job.

All runs go through the same :class:`~vtprune.harness.lmm.VTPruneLMM` (the baseline is the
``none`` schedule through the same hooks), so prompts, batching and decoding are identical and
only the pruning differs. After every run the JSON is rewritten (with the markdown table and the
plot next to it), so an interrupted sweep resumes where it stopped: runs already in the JSON with
the same model, tasks and settings are skipped.

Data parallel: start it under ``torchrun --nproc_per_node N -m vtprune.cli sweep ...``; lmms-eval
splits the documents across ranks and gathers the scores, and the sweep gathers every rank's
measurements before rank 0 writes.

vLLM (``runtime="vllm"``): one engine (:class:`~vtprune.harness.vllm_lmm.VTPruneVLLM`, lmms-eval's ``vllm`` model
with vtprune's pruning class) serves every run; the baseline is the engine unpruned and each schedule goes with each
request (``mm_processor_kwargs``). A run's record is then what vLLM served: the image tokens of every prompt (mean
kept, and the baseline's mean as the count before pruning). vLLM batches requests, so there is no per-call timing
pass (eval/bench_vllm.py measures vLLM's throughput and TTFT).

Timings: a run's own measurements are taken while it is evaluated, one run after another, so a change of load
between runs shows up as a difference between them. After the accuracy runs the sweep therefore times the
prefill of the same few ``generate()`` calls (the task's first ones, to the first token) for every schedule in
interleaved rounds (round ``r`` runs every schedule once, in an order rotated by ``r``), on rank 0, and reports
the median and range per schedule with the load average at the start and end (:func:`time_interleaved`).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from tqdm import tqdm

from ..schedule import parse_schedule
from .meter import GenerateMeasurement, gather_calls, library_versions
from .report import Run, write_plot, write_table

if TYPE_CHECKING:
    from .lmm import VTPruneLMM
    from .vllm_lmm import VTPruneVLLM

#: Where a sweep's runs are evaluated: vtprune's transformers hooks (``--model vtprune``) or vLLM's pruning classes
#: (``--model vtprune_vllm``).
RUNTIMES = ("transformers", "vllm")

BASELINE = "none"
RESULTS_FILE = "sweep.json"


def _strategy_and_budget(schedule: str) -> tuple[str, str | None]:
    stages = parse_schedule(schedule).stages
    budgets = [str(stage.budget) for stage in stages if stage.budget is not None]
    names = "+".join(
        f"{stage.strategy.name}{'@' + str(stage.layer) if stage.layer is not None else ''}" for stage in stages
    )
    return names, (budgets[0] if budgets else None)


def _headline(results: dict[str, Any], tasks: Sequence[str], metric: str | None) -> tuple[dict, float]:
    scores: dict[str, dict[str, float]] = {}
    for task in tasks:
        values = results["results"][task]
        scores[task] = {
            key.split(",")[0]: float(value)
            for key, value in values.items()
            if isinstance(value, (int, float)) and "_stderr" not in key and key != "alias"
        }
    first = scores[tasks[0]]
    if metric is None:
        metric = next(iter(first))
    if metric not in first:
        raise ValueError(f"metric {metric!r} not reported by task {tasks[0]!r}; it reports {sorted(first)}")
    return scores, first[metric]


def run_sweep(
    pretrained: str,
    tasks: Sequence[str],
    schedules: Sequence[str],
    output_dir: str | Path,
    *,
    include_path: str | None = None,
    limit: float | None = None,
    batch_size: int = 1,
    model_args: dict[str, Any] | None = None,
    metric: str | None = None,
    seed: int = 0,
    resume: bool = True,
    progress: bool = True,
    timing_rounds: int = 3,
    timing_calls: int = 2,
    runtime: str = "transformers",
) -> list[Run]:
    """Evaluate the baseline and each schedule on ``tasks``; write ``sweep.json``, ``sweep.md`` and ``sweep.png``.

    ``model_args`` go to :class:`VTPruneLMM` (and through it to the backbone wrapper), ``metric``
    names the headline metric (default: the first one the first task reports). After the accuracy runs,
    ``timing_rounds`` interleaved rounds time the prefill of the task's first ``timing_calls`` ``generate()`` calls
    for every schedule (0 turns it off; a resumed sweep re-times every schedule). ``runtime="vllm"`` evaluates on one
    vLLM engine instead (``model_args`` go to :class:`~vtprune.harness.vllm_lmm.VTPruneVLLM`; no timing pass).
    Returns the runs, baseline first.
    """
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from .lmm import VTPruneLMM

    if timing_rounds < 0 or timing_calls < 1:
        raise ValueError(f"timing_rounds must be >= 0 and timing_calls >= 1, got {timing_rounds}, {timing_calls}")
    is_writer = int(os.environ.get("RANK", "0")) == 0  # torchrun / accelerate set RANK and WORLD_SIZE
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    if runtime == "vllm" and world_size > 1:
        raise ValueError(
            "runtime='vllm' runs in one process: start it without torchrun and give vLLM tensor_parallel_size in "
            "model_args"
        )
    output_dir = Path(output_dir)
    ordered = [BASELINE] + [s for s in dict.fromkeys(schedules) if s != BASELINE]
    for schedule in ordered:
        parse_schedule(schedule)  # a typo fails before the model loads
    settings = {
        "pretrained": str(pretrained),
        "tasks": list(tasks),
        "limit": limit,
        "batch_size": batch_size,
        "model_args": model_args or {},
        "metric": metric,
        "seed": seed,
        "runtime": runtime,
    }
    done = _load_done(output_dir / RESULTS_FILE, settings) if resume else {}
    task_manager = TaskManager(include_path=include_path, model_name="vtprune")  # index the tasks once

    def evaluate(model: VTPruneLMM | VTPruneVLLM) -> dict[str, Any]:
        return simple_evaluate(
            model=model,
            tasks=list(tasks),
            task_manager=task_manager,
            limit=limit,
            batch_size=batch_size,
            bootstrap_iters=0,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
            # Under torchrun: lmms-eval's torch.distributed path (gloo on CPU, where accelerate sees one process).
            distributed_executor_backend="torchrun" if world_size > 1 else "accelerate",
        )

    if runtime == "vllm":
        from .vllm_lmm import VTPruneVLLM

        engine = VTPruneVLLM(model=pretrained, batch_size=batch_size, **(model_args or {}))
        try:
            return _evaluate_each(
                ordered,
                done,
                _served_by(engine, evaluate),
                output_dir,
                settings,
                progress=progress,
                is_writer=is_writer,
            )
        finally:
            engine.close()
    # The sweep writes every run's measurements itself, so the model writes no file per run.
    lm = VTPruneLMM(pretrained, seed=seed, batch_size=batch_size, **{**(model_args or {}), "measurements": "off"})
    lm.meter.inputs_to_keep = timing_calls if timing_rounds else 0

    def evaluate_hooked(schedule: str) -> Evaluated:
        lm.set_schedule(schedule)
        results = evaluate(lm)
        calls, failures = gather_calls(list(lm.meter.calls), len(lm.meter.failures))  # every rank: a collective
        return results, lambda run, _: run.measure(calls, failures)

    timing: dict[str, Any] | None = None
    try:
        runs = _evaluate_each(
            ordered, done, evaluate_hooked, output_dir, settings, progress=progress, is_writer=is_writer
        )
        if timing_rounds:
            if not lm.meter.inputs:  # every run was resumed: evaluate a few samples once for their inputs
                lm.set_schedule(BASELINE)
                simple_evaluate(
                    model=lm,
                    tasks=list(tasks),
                    task_manager=task_manager,
                    limit=timing_calls * batch_size,
                    batch_size=batch_size,
                    bootstrap_iters=0,
                    distributed_executor_backend="torchrun" if world_size > 1 else "accelerate",
                )
            if is_writer and lm.meter.inputs:  # tasks scored by loglikelihood alone call no generate()
                timing = time_interleaved(lm, runs, timing_rounds)
    finally:
        lm.close()
    if is_writer:
        _write(output_dir, settings, runs, timing)
    return runs


#: What evaluating one schedule gave: lmms-eval's results, and what writes the model's measurements of that evaluation
#: into the schedule's run, given the runs before it (the baseline first).
Evaluated = tuple[dict[str, Any], Callable[[Run, list[Run]], None]]


def _evaluate_each(
    ordered: list[str],
    done: dict[str, Run],
    evaluate: Callable[[str], Evaluated],
    output_dir: Path,
    settings: dict[str, Any],
    *,
    progress: bool,
    is_writer: bool,
) -> list[Run]:
    """The runs of ``ordered``, in order: those in ``done`` (an interrupted sweep's) as they were, the others
    evaluated, with the results rewritten after each. Only the writer (rank 0) makes runs of what it evaluates; the
    other ranks evaluate their share of the documents (and take part in ``evaluate``'s collectives)."""
    runs: list[Run] = []
    for schedule in tqdm(ordered, desc="vtprune sweep", disable=not (progress and is_writer)):
        if schedule in done:
            runs.append(done[schedule])
            continue
        start = time.perf_counter()
        results, measure = evaluate(schedule)
        if not is_writer:
            continue
        strategy, budget = _strategy_and_budget(schedule)
        scores, score = _headline(results, settings["tasks"], settings["metric"])
        run = Run(schedule=schedule, strategy=strategy, budget=budget, scores=scores, score=score)
        measure(run, runs)
        run.seconds = time.perf_counter() - start
        runs.append(run)
        _write(output_dir, settings, runs)
    return runs


def _served_by(engine: VTPruneVLLM, evaluate: Callable[[VTPruneVLLM], dict[str, Any]]) -> Callable[[str], Evaluated]:
    """A schedule's evaluation on the one vLLM engine: unpruned for the baseline, the schedule with each request; its
    measurements are the image tokens vLLM served (mean kept, and the baseline's mean as the count before)."""

    def evaluate_served(schedule: str) -> Evaluated:
        engine.set_schedule(None if schedule == BASELINE else schedule)
        results = evaluate(engine)
        served = list(engine.image_tokens)

        def measure(run: Run, before: list[Run]) -> None:
            run.generate_calls = len(served)
            run.visual_tokens_kept = statistics.fmean(served) if served else 0.0
            run.visual_tokens_before = before[0].visual_tokens_kept if before else run.visual_tokens_kept

        return results, measure

    return evaluate_served


def time_interleaved(lm: VTPruneLMM, runs: list[Run], rounds: int) -> dict[str, Any]:
    """Time the prefill of the meter's kept ``generate()`` inputs for every run's schedule, in interleaved rounds.

    Round ``r`` runs every schedule once, starting at the ``r``-th (a rotation), so that a change of load or a
    warm-up hits every schedule alike. Each call generates one token through the same model, hooks and meter as
    the accuracy runs; the meter's TTFT and prefill times of the calls fill each run's :attr:`Run.timing`.
    Returns the rounds' orders and the load average (1, 5, 15 minutes) at the start and end.
    """
    inputs = list(lm.meter.inputs)
    measured: dict[str, list[GenerateMeasurement]] = {run.schedule: [] for run in runs}
    orders = []
    load_start = os.getloadavg()
    for round_index in range(rounds):
        shift = round_index % len(runs)
        order = [run.schedule for run in runs[shift:] + runs[:shift]]
        orders.append(order)
        for schedule in order:
            lm.set_schedule(schedule)
            generate = cast(Callable[..., Any], lm.model.generate)  # torch types module attributes as Tensor | Module
            for args, kwargs in inputs:
                generate(*args, **{**kwargs, "max_new_tokens": 1})
            measured[schedule].extend(lm.meter.calls)
    load_end = os.getloadavg()
    for run in runs:
        calls = measured[run.schedule]
        ttft = [call.ttft_seconds for call in calls]
        prefill = [call.prefill_seconds for call in calls]
        run.timing = {
            "ttft_median_seconds": statistics.median(ttft),
            "ttft_min_seconds": min(ttft),
            "ttft_max_seconds": max(ttft),
            "prefill_median_seconds": statistics.median(prefill),
            "prefill_min_seconds": min(prefill),
            "prefill_max_seconds": max(prefill),
            "calls": len(calls),
        }
    return {
        "rounds": rounds,
        "calls_per_round": len(inputs),
        "orders": orders,
        "load_average_start": list(load_start),
        "load_average_end": list(load_end),
    }


def _retained(runs: list[Run]) -> None:
    baseline = next((run for run in runs if run.schedule == BASELINE), None)
    for run in runs:
        run.retained = 100 * run.score / baseline.score if baseline is not None and baseline.score else None


def _write(output_dir: Path, settings: dict[str, Any], runs: list[Run], timing: dict[str, Any] | None = None) -> None:
    _retained(runs)
    output_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "settings": settings,
        "versions": library_versions(),
        "timing": timing,
        "runs": [asdict(run) for run in runs],
    }
    (output_dir / RESULTS_FILE).write_text(json.dumps(payload, indent=1))
    write_table(runs, output_dir / "sweep.md", timing)
    write_plot(runs, output_dir / "sweep.png", score_label=_score_label(settings, runs))


def _score_label(settings: dict[str, Any], runs: list[Run]) -> str:
    """``<metric> on <task>``: what the headline score is (the plot's y axis)."""
    task = settings["tasks"][0]
    metric = settings["metric"] or (next(iter(runs[0].scores[task]), "score") if runs else "score")
    return f"{metric} on {task}"


def _load_done(path: Path, settings: dict[str, Any]) -> dict[str, Run]:
    """Runs of an earlier, interrupted sweep with the same settings (nothing if the settings changed)."""
    if not path.exists():
        return {}
    payload = json.loads(path.read_text())
    if payload.get("settings") != settings:
        return {}
    return {run["schedule"]: Run(**{**run, "timing": None}) for run in payload["runs"]}  # re-timed together
