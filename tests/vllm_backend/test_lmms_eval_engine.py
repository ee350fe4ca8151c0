"""lmms-eval on vLLM, end to end: ``vtprune sweep --runtime vllm`` runs the offline toy task through
``--model vtprune_vllm`` (the baseline and a schedule on one engine, the schedule per request), and scores what
vtprune's transformers path scores on the same documents. One engine start."""

import importlib
import json
import os
import statistics
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor

# Fails instead of skipping in the nox vllm session (VTPRUNE_REQUIRE_VLLM), which installs both.
required = os.environ.get("VTPRUNE_REQUIRE_VLLM")
vllm = importlib.import_module("vllm") if required else pytest.importorskip("vllm")
lmms_eval_models = importlib.import_module("lmms_eval.models") if required else pytest.importorskip("lmms_eval.models")

import vtprune
from vtprune.harness.sweep import run_sweep
from vtprune.harness.vllm_lmm import VTPruneVLLM
from vtprune.toyvlm import build_prompt, load_toy_model
from vtprune.toyvlm.data import from_record
from vtprune.toyvlm.model import DEFAULT_PATH

TASKS = Path(__file__).resolve().parents[2] / "eval" / "tasks"
LIMIT = 8
#: Its kept sets on vLLM equal the transformers path's on the toys (test_toys.py), so the answers do too.
SCHEDULE = "uniform:25%"
ENGINE = {"max_model_len": 512, "enforce_eager": True, "dtype": "float32", "max_new_tokens": 3}


def transformers_accuracy(schedule):
    """The task's accuracy on its first LIMIT documents, from vtprune's transformers path (LLaVA: renumbered
    positions, as vLLM numbers kept tokens)."""
    model, _ = load_toy_model(DEFAULT_PATH)
    processor = AutoProcessor.from_pretrained(DEFAULT_PATH)  # the processor vLLM builds: the same pixels
    lines = (TASKS / "vtprune_shapes" / "shapes_test.jsonl").read_text().splitlines()[:LIMIT]
    hits = []
    for line in lines:
        doc = json.loads(line)
        sample = from_record(doc)
        inputs = processor(images=[sample.image], text=[build_prompt(sample.question, processor)], return_tensors="pt")
        with torch.inference_mode(), vtprune.pruned(model, schedule, renumber=True):
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        answer = processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        hits.append(float(answer.strip().lower() == doc["answer"]))
    assert len(hits) == LIMIT
    return statistics.fmean(hits)


def test_a_sweep_runs_on_vllm_through_the_lmms_eval_model(tmp_path):
    assert lmms_eval_models.get_model("vtprune_vllm") is VTPruneVLLM  # --model vtprune_vllm: the entry point
    runs = run_sweep(
        str(DEFAULT_PATH), ["vtprune_shapes"], [SCHEDULE], tmp_path, include_path=str(TASKS), limit=LIMIT,
        batch_size=LIMIT, model_args=ENGINE, runtime="vllm", progress=False,
    )  # fmt: skip
    baseline, pruned = runs
    assert (baseline.schedule, pruned.schedule) == ("none", SCHEDULE)
    # What vLLM served: every prompt's image tokens, unpruned and pruned.
    assert baseline.generate_calls == pruned.generate_calls == LIMIT
    assert baseline.visual_tokens_kept == pruned.visual_tokens_before == 144
    assert pruned.visual_tokens_kept == 36
    assert baseline.score == transformers_accuracy("none")
    assert pruned.score == transformers_accuracy(SCHEDULE)
    written = json.loads((tmp_path / "sweep.json").read_text())
    assert written["settings"]["runtime"] == "vllm"
    assert [run["score"] for run in written["runs"]] == [baseline.score, pruned.score]
