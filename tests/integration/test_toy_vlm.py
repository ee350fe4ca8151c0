"""The toy VLM: deterministic data, the shipped checkpoint, and a smoke run of the training script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    LlavaForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
)

import vtprune
from vtprune.cli import main
from vtprune.toyvlm import DEFAULT_PATH, QUESTION_TYPES, answer, build_prompt, evaluate, make_split, object_patch_mask
from vtprune.toyvlm.benchmark import format_table, run_benchmark, schedules_for
from vtprune.toyvlm.data import CELL, GRID, TEST_SEED, from_record
from vtprune.toyvlm.model import QWEN2_VL_PATH, image_placeholder
from vtprune.toyvlm.train import train

ROOT = Path(__file__).resolve().parents[2]


def test_generator_is_deterministic_and_balanced():
    a, b = make_split(7, 25), make_split(7, 25)
    assert [(s.question, s.answer, s.objects) for s in a] == [(s.question, s.answer, s.objects) for s in b]
    assert all(x.image.tobytes() == y.image.tobytes() for x, y in zip(a, b, strict=True))
    assert [s.qtype for s in a[:5]] == list(QUESTION_TYPES)
    assert [s.question for s in make_split(8, 25)] != [s.question for s in a]


def test_object_patch_mask_covers_objects_only():
    for s in make_split(3, 50):
        mask = object_patch_mask(s)
        assert len(mask) == GRID * GRID == 144
        assert sum(mask) == len(s.objects)  # each object lies inside one cell, which is one patch
        pixels = s.image.load()
        for index, kept in enumerate(mask):
            row, col = divmod(index, GRID)
            block = {
                pixels[x, y] for x in range(col * CELL, (col + 1) * CELL) for y in range(row * CELL, (row + 1) * CELL)
            }
            assert (block == {(255, 255, 255)}) != kept


def test_the_lmms_eval_task_data_is_the_test_split():
    lines = (ROOT / "eval" / "tasks" / "vtprune_shapes" / "shapes_test.jsonl").read_text().splitlines()
    fresh = make_split(TEST_SEED, len(lines))
    for line, sample in zip(lines, fresh, strict=True):
        stored = from_record(json.loads(line))
        assert (stored.question, stored.answer, stored.qtype, stored.objects) == (
            sample.question,
            sample.answer,
            sample.qtype,
            sample.objects,
        )
        assert stored.image.tobytes() == sample.image.tobytes()


SHIPPED = {
    "llava": (LlavaForConditionalGeneration, DEFAULT_PATH),
    "qwen2_vl": (Qwen2VLForConditionalGeneration, QWEN2_VL_PATH),
}


@pytest.fixture(scope="module", params=list(SHIPPED))
def shipped(request):
    """A checkpoint in the package (each family), loaded the way a hub checkpoint is."""
    model_class, path = SHIPPED[request.param]
    return model_class.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)


def test_shipped_checkpoint_answers_held_out_questions(shipped):
    model, processor = shipped
    samples = make_split(TEST_SEED, 50)
    inputs = processor(
        images=[samples[0].image], text=[build_prompt(samples[0].question, processor)], return_tensors="pt"
    )
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 144
    predicted = answer(model, processor, [s.image for s in samples], [s.question for s in samples])
    accuracy = sum(p == s.answer for p, s in zip(predicted, samples, strict=True)) / len(samples)
    assert accuracy >= 0.9, list(zip(predicted, [s.answer for s in samples], strict=True))
    # evaluate() (one forward, first token) agrees with generate()
    assert evaluate(model, processor, samples)["overall"] == pytest.approx(accuracy)


def test_the_chat_template_puts_the_question_before_the_image_however_it_comes(shipped):
    _, processor = shipped
    question = "what colour is the circle ?"
    # lmms-eval's llava_hf prepends the image to a string
    as_string = [{"role": "user", "content": f"{image_placeholder(processor)}\n{question}"}]
    as_parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    # lmms-eval's Qwen wrappers open with a system prompt, which the toy models never saw
    with_system = [{"role": "system", "content": "You are a helpful assistant."}, *as_parts]
    for messages in (as_string, as_parts, with_system):
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert processor.tokenizer.tokenize(text) == processor.tokenizer.tokenize(build_prompt(question, processor))


def test_token_selection_decides_the_answer(shipped):
    # The oracle check: the object tokens carry the answers, the background does not.
    model, processor = shipped
    samples = make_split(TEST_SEED, 100)
    objects_only = evaluate(model, processor, samples, keep_fn=object_patch_mask)["overall"]
    background_only = evaluate(model, processor, samples, keep_fn=lambda s: [not k for k in object_patch_mask(s)])
    assert objects_only >= 0.9
    assert background_only["overall"] < 0.5


def test_pruned_generate_on_the_shipped_checkpoint_keeps_what_matters(shipped):
    model, processor = shipped
    samples = make_split(TEST_SEED, 50)
    images, questions = [s.image for s in samples], [s.question for s in samples]
    hits = {}
    for schedule in ("fastv@2:8", "random:8"):
        with vtprune.pruned(model, schedule) as handle:
            predicted = answer(model, processor, images, questions)
        assert handle.last_record.images  # the probe below ran (on the last batch's images)
        assert all(image.kept.numel() == 8 for image in handle.last_record.images)
        hits[schedule] = sum(p == s.answer for p, s in zip(predicted, samples, strict=True)) / len(samples)
    assert hits["fastv@2:8"] >= 0.9 > 0.6 > hits["random:8"]


def test_the_benchmark_table_has_the_oracles_and_every_strategy(shipped):
    model, processor = shipped
    samples = make_split(TEST_SEED, 20)
    rows = run_benchmark(model, processor, samples, strategies=["divprune", "fastv", "todre_relevance"], budgets=[7])
    names = [row.name for row in rows]
    assert names == [
        "unpruned",
        "oracle: object tokens only",
        "oracle: background tokens only",
        "divprune:7",
        "fastv@2:7",
        "todre_relevance",
        "todre:7+todre_relevance",
    ]
    assert rows[3].kept == 7 and rows[0].kept == 144
    table = format_table(rows)
    assert table.count("\n") == len(rows) + 1 and "| fastv@2:7 | 7.0 |" in table
    assert set(schedules_for("none", [7], 4)) == {(None, "none")}


def test_demo_command_prints_answers_and_draws_the_kept_tokens(tmp_path, capsys):
    picture = tmp_path / "demo.png"
    main(["demo", "--count", "4", "--schedule", "divprune:8", "random:8", "--out", str(picture)])
    out = capsys.readouterr().out
    assert "divprune:8" in out and "random:8" in out and "accuracy" in out and "of 144" in out
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("count", ["0", "-2", "two"])
def test_demo_refuses_a_count_below_one(count, capsys):
    with pytest.raises(SystemExit) as refused:
        main(["demo", "--count", count, "--out", ""])
    assert refused.value.code == 2
    assert "argument --count: must be" in capsys.readouterr().err


NO_TORCHVISION = """
import importlib.util, sys

class _Missing:  # the base install: no torchvision
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torchvision":
            raise ModuleNotFoundError(name)

sys.meta_path.insert(0, _Missing())
_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, package=None: (
    None if name.split(".")[0] == "torchvision" else _find_spec(name, package)
)
"""


def test_commands_without_qwen_say_nothing_about_qwen_on_the_base_install(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(NO_TORCHVISION)
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    code = "import vtprune.cli, vtprune.toyvlm; vtprune.cli.main(['strategies'])"
    env = {**os.environ, "PYTHONPATH": path}
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "divprune" in done.stdout
    assert "Qwen" not in done.stderr and "torchvision" not in done.stderr, done.stderr
    blocked = subprocess.run([sys.executable, "-c", "import torchvision"], check=False, capture_output=True, env=env)
    assert blocked.returncode != 0  # the probe really hid torchvision


@pytest.mark.parametrize("family", list(SHIPPED))
def test_short_training_run_saves_a_loadable_folder(tmp_path, family):
    tiny = {"vision_hidden": 16, "text_hidden": 32, "text_layers": 1, "heads": 2}
    scores = train(
        tmp_path, steps=2, batch_size=4, warmup=1, sizes=tiny, family=family, eval_every=2, eval_samples=5, log=str
    )
    assert set(scores) == {*QUESTION_TYPES, "overall"}
    model = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert isinstance(model, SHIPPED[family][0])
    processor = AutoProcessor.from_pretrained(tmp_path)
    sample = make_split(0, 1)[0]
    assert len(answer(model, processor, [sample.image], [sample.question])) == 1
