"""vtprune's Qwen2.5-VL and Qwen3-VL pruning classes in vLLM, on random-weight checkpoints with the toys' geometry.

Per family one stock engine and one pruning engine: the pruning class builds, keeps all equals stock vLLM, a
pruned request is served with the schedule's count of image tokens, and the rows an image becomes are its
unpruned rows at the kept indices (for Qwen3-VL: deepstack slices included), selected on the projected slice.
Answers and first-token log-probs equal vtprune's transformers path (original M-RoPE positions) for the
schedules whose kept sets do not depend on the features' last bits.
"""

import gc
import importlib
import os

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

vllm = importlib.import_module("vllm") if os.environ.get("VTPRUNE_REQUIRE_VLLM") else pytest.importorskip("vllm")

from qwen_checkpoints import random_qwen_checkpoint

import vtprune
from vtprune.toyvlm import make_split
from vtprune.toyvlm.model import toy_of
from vtprune.vllm import SCHEDULE_KEY, engine_args
from vtprune.vllm.plan import encode_schedule, image_digest

SAMPLES = make_split(0, 4)
KEEP = 16
SCHEDULES = (None, "divprune:144", f"divprune:{KEEP}", "matryoshka:16", "uniform:25%")
#: Compared with the transformers path: no schedule and the content-free selections (DivPrune meets exact ties on
#: the toy images' identical cells; see test_toys.py).
COMPARED = (None, "matryoshka:16", "uniform:25%")


def prompt(sample):
    return f"{sample.question} {toy_of('qwen2_vl').image_placeholder} answer :"


def run(llm, schedule=None):
    """(prompt lengths, first-token log-probs, answers' token ids) for SAMPLES in one batch."""
    requests = [
        {
            "prompt": prompt(s),
            "multi_modal_data": {"image": s.image},
            **({} if schedule is None else {"mm_processor_kwargs": {SCHEDULE_KEY: schedule}}),
        }
        for s in SAMPLES
    ]
    outputs = llm.generate(requests, vllm.SamplingParams(max_tokens=3, temperature=0, logprobs=1))
    first = [o.outputs[0].token_ids[0] for o in outputs]
    return (
        [len(o.prompt_token_ids) for o in outputs],
        [o.outputs[0].logprobs[0][t].logprob for o, t in zip(outputs, first)],
        [list(o.outputs[0].token_ids) for o in outputs],
    )


@torch.inference_mode()
def transformers_path(model, processor, schedule):
    """(first-token log-probs of the tokens vLLM chose, answers' token ids) from vtprune's hooks, per sample."""
    logprobs, answers = [], []
    for s in SAMPLES:
        inputs = processor(images=[s.image], text=[prompt(s)], return_tensors="pt")
        kwargs = {"max_new_tokens": 3, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
        with vtprune.pruned(model, schedule) if schedule else torch.inference_mode():
            out = model.generate(**inputs, **kwargs)
        new = out.sequences[0, inputs["input_ids"].shape[1] :]
        logprobs.append(float(torch.log_softmax(out.scores[0][0].float(), -1)[new[0]]))
        answers.append(new.tolist())
    return logprobs, answers


def engine(**kwargs):
    from vllm import LLM

    return LLM(
        **kwargs, max_model_len=512, enforce_eager=True, dtype="float32", seed=0, limit_mm_per_prompt={"image": 1}
    )


def close(llm):
    llm.llm_engine.engine_core.shutdown()  # now, not in the middle of the next engine's life (see test_toys.py)
    del llm
    gc.collect()


@torch.inference_mode()
def embedded_rows(model, image, schedule):
    """(unpruned rows, pruned rows, kept indices, width the selection reads) of one image in the pruning class."""
    kwargs = {"pixel_values": image["pixel_values"], "image_grid_thw": image["image_grid_thw"]}
    (full,) = model.embed_multimodal(**kwargs)
    (pruned,) = model.embed_multimodal(**kwargs, **{SCHEDULE_KEY: encode_schedule(schedule, 1)})
    kept, _ = model.vtprune_selections.get(
        (schedule, image_digest(image["pixel_values"], image["image_grid_thw"][0]), ())
    )
    return full.cpu(), pruned.cpu(), kept.cpu(), getattr(model, "visual_dim", full.shape[1])


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def family(request, tmp_path_factory):
    kind = request.param
    path = random_qwen_checkpoint(kind, tmp_path_factory.mktemp(kind) / "model")
    processor = AutoProcessor.from_pretrained(path)
    llm = engine(model=str(path))
    try:
        stock = run(llm)
    finally:
        close(llm)
    llm = engine(**engine_args(str(path)))
    try:
        results = {schedule: run(llm, schedule) for schedule in SCHEDULES}
        # The pixels as the model receives them (normalised on the device in vLLM), for a new image.
        image = processor.image_processor(images=[SAMPLES[0].image.rotate(90)], return_tensors="pt", **RAW)
        rows = llm.apply_model(lambda m: embedded_rows(m, image, f"divprune:{KEEP}"))[0]
    finally:
        close(llm)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    reference = {schedule: transformers_path(model, processor, schedule) for schedule in COMPARED}
    return {"kind": kind, "stock": stock, "results": results, "rows": rows, "reference": reference}


RAW = {"do_rescale": False, "do_normalize": False}


def test_keep_all_equals_stock_vllm(family):
    lengths, logprobs, answers = family["stock"]
    for schedule in (None, "divprune:144"):
        got_lengths, got_logprobs, got_answers = family["results"][schedule]
        assert got_lengths == lengths and got_answers == answers
        assert got_logprobs == pytest.approx(logprobs, abs=1e-6)


@pytest.mark.parametrize("schedule", [f"divprune:{KEEP}", "matryoshka:16"])
def test_a_pruned_request_is_served_with_the_schedules_count(family, schedule):
    lengths, logprobs, _ = family["results"][schedule]
    assert lengths == [n - 144 + 16 for n in family["stock"][0]]
    assert logprobs != pytest.approx(family["stock"][1], abs=1e-4)  # the model saw fewer tokens


@pytest.mark.parametrize("schedule", COMPARED)
def test_answers_and_logprobs_equal_the_transformers_path(family, schedule):
    _, logprobs, answers = family["results"][schedule]
    reference_logprobs, reference_answers = family["reference"][schedule]
    assert len(reference_answers) == len(SAMPLES)
    assert answers == reference_answers
    assert logprobs == pytest.approx(reference_logprobs, abs=1e-4)


def test_kept_rows_are_the_unpruned_rows_with_their_deepstack_features(family):
    full, pruned, kept, width = family["rows"]
    assert full.shape[0] == 144 and kept.numel() == KEEP
    if family["kind"] == "qwen3_vl":
        assert full.shape[1] == 3 * width  # projected tokens + two deepstack levels
    assert torch.equal(pruned, full[kept])
    assert kept.tolist() == vtprune.select("divprune", full[:, :width], keep=KEEP).tolist()
