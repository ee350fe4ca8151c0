"""The lmms-eval model ``vtprune``, the sweep and its measurements, offline on the shipped toy VLM."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from lmms_eval.evaluator import simple_evaluate
from lmms_eval.models import get_model
from lmms_eval.tasks import TaskManager

import vtprune
from vtprune.adapters import architecture
from vtprune.harness import DecoderShape, RunFailed, load_preset, preset_names
from vtprune.harness.command import sweep_schedules
from vtprune.harness.lmm import VTPruneLMM, backbone_class, backbone_of, schedule_from_args
from vtprune.harness.meter import GenerationMeter
from vtprune.harness.sweep import run_sweep
from vtprune.testing import MODEL_KINDS, TINY
from vtprune.toyvlm.model import DEFAULT_PATH, QWEN2_VL_PATH

ROOT = Path(__file__).resolve().parents[2]
TASKS = str(ROOT / "eval" / "tasks")
LIMIT = 8


@pytest.fixture(scope="module")
def task_manager():
    return TaskManager(include_path=TASKS, model_name="vtprune")


@vtprune.register_strategy("broken_for_tests", overwrite=True)
class Broken(vtprune.Strategy):
    """Selects out-of-range indices: the engine must refuse them, and the harness must not hide that."""

    def select(self, ctx):
        return torch.arange(ctx.keep) + ctx.num_tokens


def toy_sweep(schedules: list[str], output: Path, limit: int = LIMIT, **timing: int):
    """A sweep of the shipped toy VLM on the offline task (``timing``: ``timing_rounds``, ``timing_calls``)."""
    return run_sweep(
        str(DEFAULT_PATH),
        ["vtprune_shapes"],
        schedules,
        output,
        include_path=TASKS,
        limit=limit,
        progress=False,
        **timing,
    )


SWEEP = ["divprune:16", "divprune:4", "random:16", "random:4"]


def plain_wrapper_score(backbone: str, pretrained: Path, task_manager, batch_size: int | None = None) -> float:
    """The task's accuracy through lmms-eval's own ``backbone`` wrapper, without vtprune: what a baseline must match."""
    results = simple_evaluate(
        model=backbone,
        model_args=f"pretrained={pretrained},device_map=cpu",
        tasks=["vtprune_shapes"],
        task_manager=task_manager,
        limit=LIMIT,
        batch_size=batch_size,
        bootstrap_iters=0,
        device="cpu",
    )
    return results["results"]["vtprune_shapes"]["accuracy,none"]


def test_entry_point_resolves_to_the_vtprune_model():
    assert get_model("vtprune") is VTPruneLMM


def test_model_args_build_schedules():
    assert str(schedule_from_args("divprune", keep=16)) == str(vtprune.parse_schedule("divprune:16"))
    assert str(schedule_from_args("fastv", keep_ratio=0.5, layer=2)) == str(vtprune.parse_schedule("fastv@2:50%"))
    assert str(schedule_from_args("mmtok(alpha:0.3)", keep=8)) == str(vtprune.parse_schedule("mmtok:8(alpha:0.3)"))
    assert str(schedule_from_args("divprune:64+random_deep:50%")) == "divprune:64+random_deep:0.5"
    assert str(schedule_from_args(preset="fastv_k2_r50")) == str(vtprune.parse_schedule("fastv@2:50%"))
    with pytest.raises(ValueError, match="sweep of"):
        schedule_from_args(preset="llava15")
    with pytest.raises(ValueError, match="not both"):
        schedule_from_args("divprune", keep=4, preset="fastv_k2_r50")


def test_every_preset_parses_and_expands_its_budgets():
    names = preset_names()
    assert {"llava15", "llava_next", "qwen2_5_vl", "fastv_k2_r50", "todre", "horizon_llava15"} <= set(names)
    for name in names:
        preset = load_preset(name)
        assert preset.schedules and all("{budget}" not in s for s in preset.schedules)
    assert "divprune:192" in load_preset("llava15").schedules
    with pytest.raises(ValueError, match="known presets"):
        load_preset("no_such_preset")


def test_command_line_schedules():
    assert sweep_schedules(["divprune", "fastv@2", "mmtok(alpha:0.3)"], ["16", "25%"], ["random:4"], None) == [
        "divprune:16",
        "divprune:25%",
        "fastv@2:16",
        "fastv@2:25%",
        "mmtok:16(alpha:0.3)",
        "mmtok:25%(alpha:0.3)",
        "random:4",
    ]


def test_strategies_without_budgets_are_refused_with_a_literal_example():
    with pytest.raises(SystemExit, match="--budgets") as refused:
        sweep_schedules(["divprune"], [], [], None)
    assert "25% 10%" in str(refused.value) and "%%" not in str(refused.value)


def test_a_backbone_failure_outside_generate_stops_the_run(monkeypatch):
    # lmms-eval catches Exception around the whole evaluation and exits 0: any failure of the backbone's own code
    # (not only of generate(), which the meter watches) must stop the run as RunFailed.
    lm = VTPruneLMM(str(DEFAULT_PATH), strategy="divprune", keep=4)
    try:

        def fails(requests):
            raise AssertionError("Do not support batch_size_per_gpu > 1 for now")

        monkeypatch.setattr(lm.backbone, "generate_until", fails)
        with pytest.raises(RunFailed, match="generate_until failed under divprune:4: AssertionError: Do not support"):
            lm.generate_until([])
    finally:
        lm.close()


def test_llava_backbone_refuses_batches_before_loading(monkeypatch):
    with pytest.raises(RunFailed, match="--batch_size 2: lmms-eval's llava_hf wrapper.*pass --batch_size 1"):
        VTPruneLMM(str(DEFAULT_PATH), strategy="divprune", keep=4, batch_size=2)


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_every_family_finds_the_lmms_eval_backbone_it_declares(tmp_path, kind):
    """The checkpoint's model_type picks the wrapper its family declares, and lmms-eval really has it."""
    arch = architecture(kind)
    arch.random_config(TINY).save_pretrained(tmp_path)
    if arch.backbone is None:
        with pytest.raises(ValueError, match=f"is a {kind!r} checkpoint; vtprune's lmms-eval model supports"):
            backbone_of(str(tmp_path))
        return
    assert backbone_of(str(tmp_path)) == arch.backbone
    backbone = backbone_class(arch.backbone)
    assert backbone is getattr(importlib.import_module(arch.backbone.module), arch.backbone.name)
    assert backbone.is_simple


def test_flops_formula_is_twice_fastv_for_multi_head_two_matrix_layers():
    n, d, m = 100, 64, 256
    shape = DecoderShape(hidden=d, heads=4, kv_heads=4, head_dim=16, mlp_width=m, mlp_matrices=2, layers=2)
    fastv = 4 * n * d * d + 2 * n * n * d + 2 * n * d * m
    assert shape.layer_flops(n) == 2 * fastv
    assert shape.prefill_flops([n, n // 2]) == 2 * fastv + shape.layer_flops(n // 2)
    gqa = DecoderShape(hidden=d, heads=4, kv_heads=1, head_dim=16, mlp_width=m, mlp_matrices=3, layers=1)
    assert gqa.layer_flops(n) == 2 * n * d * (2 * 64 + 2 * 16) + 4 * n * n * 64 + 6 * n * d * m


def test_a_sweep_writes_json_table_and_plot_and_its_baseline_is_the_plain_model(tmp_path, task_manager):
    output = tmp_path / "sweep"
    runs = toy_sweep(SWEEP, output)
    assert [run.schedule for run in runs] == ["none", "divprune:16", "divprune:4", "random:16", "random:4"]
    payload = json.loads((output / "sweep.json").read_text())
    assert {"torch", "transformers", "lmms-eval", "vtprune"} <= set(payload["versions"])
    assert payload["settings"]["seed"] == 0
    baseline, *pruned = payload["runs"]
    assert baseline["visual_tokens_kept"] == baseline["visual_tokens_before"] == 144
    assert baseline["retained"] == 100.0
    for run in pruned:
        budget = int(run["budget"])
        assert run["visual_tokens_kept"] == budget
        assert len(run["samples"]) == LIMIT and all(len(s["kept"][0]) == budget for s in run["samples"])
        # Pruning before the LLM shortens every layer by the same count, and the cost follows.
        assert run["tokens_per_layer"] == [t - (144 - budget) for t in baseline["tokens_per_layer"]]
        assert run["prefill_flops"] < baseline["prefill_flops"]
        assert run["kv_cache_bytes"] < baseline["kv_cache_bytes"]
        assert run["retained"] == pytest.approx(100 * run["score"] / baseline["score"])
    assert len(payload["runs"]) == len(runs)
    for run in payload["runs"]:
        assert run["ttft_seconds"] > 0 and run["decode_tokens_per_second"] > 0 and run["failed_generations"] == 0
        assert set(run["scores"]["vtprune_shapes"]) >= {"accuracy", "colour", "shape", "count", "exists", "position"}
    table, note = (output / "sweep.md").read_text().split("\n\n")
    assert table.count("\n") == 1 + len(runs) and "| divprune:4 |" in table
    assert "interleaved rounds" in note
    assert (output / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The same prompts through lmms-eval's own wrapper, without vtprune, score the same.
    assert plain_wrapper_score("llava_hf", DEFAULT_PATH, task_manager) == baseline["score"]

    # Resuming finds every run done and evaluates nothing again; with the timing off, nothing is timed either.
    again = toy_sweep(SWEEP, output, timing_rounds=0)
    assert [run.seconds for run in again] == [run["seconds"] for run in payload["runs"]]
    assert all(run.timing is None for run in again)
    assert json.loads((output / "sweep.json").read_text())["timing"] is None
    assert "| – | – |" in (output / "sweep.md").read_text() and "not timed" in (output / "sweep.md").read_text()


class HookedEngine(VTPruneLMM):
    """Stands in for the vLLM engine of ``runtime="vllm"`` (no vLLM here): the toy VLM through the hooks, with
    ``VTPruneVLLM``'s interface (None: prune nothing; ``image_tokens`` of every prompt since ``set_schedule``)."""

    engines: ClassVar[list[HookedEngine]] = []

    def __init__(self, model: str, **kwargs) -> None:
        super().__init__(model, measurements="off", **kwargs)
        self.schedules: list[str | None] = []
        self.closed = False
        self.engines.append(self)

    def set_schedule(self, schedule) -> None:
        super().set_schedule("none" if schedule is None else schedule)
        self.schedules.append(schedule)

    @property
    def image_tokens(self) -> list[int]:
        return [list(sample.visual_tokens.values())[-1] for call in self.meter.calls for sample in call.samples]

    def close(self) -> None:
        super().close()
        self.closed = True


def test_a_vllm_sweep_runs_the_baseline_unpruned_and_counts_the_served_image_tokens(tmp_path, monkeypatch):
    monkeypatch.setattr("vtprune.harness.vllm_lmm.VTPruneVLLM", HookedEngine)
    monkeypatch.setattr(HookedEngine, "engines", [])
    runs = run_sweep(
        str(DEFAULT_PATH), ["vtprune_shapes"], ["divprune:16"], tmp_path, include_path=TASKS, limit=2, progress=False,
        runtime="vllm",
    )  # fmt: skip
    (engine,) = HookedEngine.engines
    assert engine.schedules == [None, "divprune:16"] and engine.closed
    baseline, pruned = runs
    assert baseline.generate_calls == pruned.generate_calls == 2
    assert baseline.visual_tokens_kept == baseline.visual_tokens_before == pruned.visual_tokens_before == 144
    assert pruned.visual_tokens_kept == 16
    written = json.loads((tmp_path / "sweep.json").read_text())
    assert [run["schedule"] for run in written["runs"]] == ["none", "divprune:16"]
    assert written["timing"] is None  # vLLM batches requests: no timing pass


def test_a_sweep_times_every_schedule_in_interleaved_rotated_rounds_and_reports_median_range_and_load(
    tmp_path, monkeypatch
):
    # Every generate() the meter sees, in order: (schedule, max_new_tokens).
    calls: list[tuple[str, int]] = []
    measure = GenerationMeter._generate

    def recording(self, original, args, kwargs):
        calls.append((str(self.handle.schedule), kwargs["max_new_tokens"]))
        return measure(self, original, args, kwargs)

    monkeypatch.setattr(GenerationMeter, "_generate", recording)
    schedules, limit, rounds, per_round = ["divprune:4", "random:4"], 2, 3, 2
    ordered = ["none", *schedules]
    expected = [  # round r starts at the r-th schedule; each schedule's calls run back to back
        (schedule, 1) for r in range(rounds) for schedule in ordered[r:] + ordered[:r] for _ in range(per_round)
    ]
    toy_sweep(schedules, tmp_path, limit=limit, timing_rounds=rounds, timing_calls=per_round)
    accuracy_calls = len(ordered) * limit
    assert [schedule for schedule, _ in calls[:accuracy_calls]] == [s for s in ordered for _ in range(limit)]
    assert calls[accuracy_calls:] == expected

    payload = json.loads((tmp_path / "sweep.json").read_text())
    timing = payload["timing"]
    assert timing["orders"] == [ordered[r:] + ordered[:r] for r in range(rounds)]
    assert (timing["rounds"], timing["calls_per_round"]) == (rounds, per_round)
    assert len(timing["load_average_start"]) == len(timing["load_average_end"]) == 3
    for run in payload["runs"]:
        timed = run["timing"]
        assert timed["calls"] == rounds * per_round
        for name in ("ttft", "prefill"):
            assert timed[f"{name}_min_seconds"] <= timed[f"{name}_median_seconds"] <= timed[f"{name}_max_seconds"]
    table, note = (tmp_path / "sweep.md").read_text().split("\n\n")
    for run in payload["runs"]:
        ttft = [1e3 * run["timing"][f"ttft_{stat}_seconds"] for stat in ("median", "min", "max")]
        assert f"| {run['schedule']} |" in table and "{:.1f} [{:.1f}–{:.1f}]".format(*ttft) in table
    load = " / ".join(f"{value:.1f}" for value in timing["load_average_start"])
    assert f"over {rounds} interleaved rounds × {per_round} generate() calls" in note and load in note

    # A resumed sweep evaluates nothing again but re-times every schedule together (after a short evaluation that
    # supplies the inputs to time), again interleaved.
    calls.clear()
    again = toy_sweep(schedules, tmp_path, limit=limit, timing_rounds=rounds, timing_calls=per_round)
    assert [run.seconds for run in again] == [run["seconds"] for run in payload["runs"]]
    assert calls == [("none", 3)] * per_round + expected


def test_a_broken_strategy_fails_the_sweep_loudly(tmp_path):
    with pytest.raises(RunFailed, match="outside"):
        toy_sweep(["broken_for_tests:4"], tmp_path, limit=2)


def test_counting_mode_reports_failures_instead_of_stopping(task_manager, tmp_path):
    lm = VTPruneLMM(
        str(DEFAULT_PATH), strategy="broken_for_tests", keep=4, on_error="count", measurements=str(tmp_path)
    )
    try:
        results = simple_evaluate(
            model=lm, tasks=["vtprune_shapes"], task_manager=task_manager, limit=3, bootstrap_iters=0
        )
        assert len(lm.meter.failures) == 3 and "outside" in lm.meter.failures[0]
        assert results["results"]["vtprune_shapes"]["accuracy,none"] == 0.0
        (written,) = tmp_path.glob("vtprune_broken_for_tests*.json")  # the measurements count the failures
        assert json.loads(written.read_text())["measurements"]["failed_generations"] == 3
    finally:
        lm.close()
    assert not hasattr(lm.model, "_vtprune_handle") and "generate" not in lm.model.__dict__


BROKEN_PLUGIN = """
import vtprune, torch

@vtprune.register_strategy("broken_for_tests", overwrite=True)
class Broken(vtprune.Strategy):
    def select(self, ctx):
        return torch.arange(ctx.keep) + ctx.num_tokens
"""


def _lmms_eval(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    # sitecustomize registers the broken strategy in the child process, as a user's plugin would.
    (tmp_path / "sitecustomize.py").write_text(BROKEN_PLUGIN)
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])  # keep a checkout given on the path
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": path}
    command = [sys.executable, "-m", "lmms_eval", "--tasks", "vtprune_shapes", "--include_path", TASKS, *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)


def test_lmms_eval_command_line_runs_vtprune_and_exits_non_zero_when_pruning_fails(tmp_path):
    model = f"pretrained={DEFAULT_PATH}"
    out = tmp_path / "results"
    ok = _lmms_eval(
        tmp_path,
        *("--model", "vtprune", "--model_args", f"{model},strategy=divprune,keep=16", "--limit", "4"),
        *("--output_path", str(out)),
    )
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "vtprune_shapes" in ok.stdout and "accuracy" in ok.stdout
    # The pruning shows in the output: a one-line summary naming a measurements file next to lmms-eval's results.
    summary = next(line for line in ok.stdout.splitlines() if line.startswith("vtprune: divprune:16"))
    assert "visual tokens kept 16.0 of 144.0 per sample" in summary and "GFLOPs" in summary and "0 failed" in summary
    files = list(out.glob("vtprune_divprune*.json"))
    assert len(files) == 1 and str(files[0]) in summary
    measured = json.loads(files[0].read_text())["measurements"]
    assert measured["visual_tokens_before"] == 144 and measured["visual_tokens_kept"] == 16
    assert measured["generate_calls"] == 4 and measured["failed_generations"] == 0 and len(measured["samples"]) == 4
    assert measured["prefill_flops"] > 0 and measured["kv_cache_bytes"] > 0 and measured["ttft_seconds"] > 0
    assert len(measured["tokens_per_layer"]) == 4
    failing = {
        "broken_for_tests": (f"{model},strategy=broken_for_tests,keep=4", "--batch_size", "1"),
        "no_such_strategy": (f"{model},strategy=no_such_strategy,keep=4", "--batch_size", "1"),
        "--batch_size 2": (f"{model},strategy=divprune,keep=4", "--batch_size", "2"),  # llava_hf: one at a time
    }
    for cause, (args, *batch) in failing.items():
        failed = _lmms_eval(tmp_path, "--model", "vtprune", "--model_args", args, "--limit", "2", *batch)
        assert failed.returncode != 0, failed.stdout[-2000:]
        assert "RunFailed" in failed.stderr and cause in failed.stderr, failed.stderr[-2000:]


def test_a_data_parallel_sweep_gathers_every_rank(tmp_path):
    # Two CPU ranks under torchrun (gloo): lmms-eval splits the documents, the sweep gathers every rank's
    # measurements, and rank 0 writes what one process would have written.
    schedules = ["divprune:4"]
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "vtprune.cli", "sweep"),
        *("--include-path", TASKS, "--schedules", *schedules, "--limit", str(LIMIT), "--output", str(tmp_path / "dp")),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    parallel = json.loads((tmp_path / "dp" / "sweep.json").read_text())["runs"]
    single = toy_sweep(schedules, tmp_path / "one")
    for one, both in zip(single, parallel, strict=True):
        assert both["schedule"] == one.schedule
        assert both["scores"] == one.scores
        assert len(both["samples"]) == len(one.samples) == LIMIT
        assert both["visual_tokens_kept"] == pytest.approx(one.visual_tokens_kept)
        assert both["prefill_flops"] == pytest.approx(one.prefill_flops)


def test_a_qwen_sweep_runs_batched_through_lmms_eval_qwen2_vl_wrapper(tmp_path, task_manager):
    # The toy Qwen2-VL through lmms-eval's own qwen2_vl wrapper (chosen from its config), two samples per
    # generate(): the baseline scores what the wrapper scores alone, and pruning keeps the budget per image.
    runs = run_sweep(
        str(QWEN2_VL_PATH),
        ["vtprune_shapes"],
        ["mmtok:16"],
        tmp_path,
        include_path=TASKS,
        limit=LIMIT,
        batch_size=2,
        progress=False,
    )
    baseline, pruned = runs
    assert baseline.visual_tokens_before == baseline.visual_tokens_kept == 144
    assert pruned.visual_tokens_kept == 16 and all(len(s["kept"][0]) == 16 for s in pruned.samples)
    assert pruned.generate_calls == LIMIT // 2 and len(pruned.samples) == LIMIT
    assert plain_wrapper_score("qwen2_vl", QWEN2_VL_PATH, task_manager, batch_size=2) == baseline.score >= 0.75


@pytest.mark.parametrize(
    ("option", "value"), [("--timing-calls", "0"), ("--timing-rounds", "-1"), ("--timing-calls", "x")]
)
def test_sweep_refuses_timing_counts_out_of_range_by_name(option, value, capsys):
    from vtprune.cli import main

    with pytest.raises(SystemExit) as refused:
        main(["sweep", "--output", "unused", option, value])
    assert refused.value.code == 2
    assert f"argument {option}: must be" in capsys.readouterr().err
