"""The handwritten-digits task of the toy VLMs: generator invariants and a two-step training run."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from vtprune.errors import VTPruneError
from vtprune.toyvlm import answer
from vtprune.toyvlm import train as train_module
from vtprune.toyvlm.benchmark import Row, check_targets, format_table
from vtprune.toyvlm.data import CELL, IMAGE_SIZE, TEST_SEED, TRAIN_SEED_BASE, VALIDATION_SEED, box_patches
from vtprune.toyvlm.digits import DIGIT_SIZE, MAX_OBJECTS, QUADRANTS, QUESTION_TYPES, make_split, pool_indices
from vtprune.toyvlm.tasks import TASKS
from vtprune.toyvlm.train import train

ROOT = Path(__file__).resolve().parents[2]
TASK_DIR = ROOT / "eval" / "tasks" / "vtprune_digits"
TINY = {"vision_hidden": 16, "text_hidden": 32, "text_layers": 1, "heads": 2}


def _quadrant(box: tuple[int, int, int, int]) -> str:
    half = IMAGE_SIZE // 2
    assert (box[0] < half) == (box[2] <= half) and (box[1] < half) == (box[3] <= half)  # inside one quadrant
    return QUADRANTS[2 * (box[1] >= half) + (box[0] >= half)]


def _solve(sample) -> str:
    """The answer worked out from the scene's digits alone, independently of the generator."""
    at = {_quadrant(d.box): d.digit for d in sample.objects}
    values = [d.digit for d in sample.objects]
    named = re.findall(r"(?:top|bottom) (?:left|right)", sample.question)
    asked = [int(w) for w in sample.question.split() if w.isdigit()]
    if sample.qtype == "position":
        return str(at[named[0]])
    if sample.qtype == "largest":
        return str(max(values))
    if sample.qtype == "count":
        return str(values.count(asked[0]))
    if sample.qtype == "exists":
        return "yes" if asked[0] in values else "no"
    assert sample.qtype == "compare" and at[named[0]] != at[named[1]]  # never a tie
    return "yes" if at[named[0]] > at[named[1]] else "no"


def test_every_answer_follows_from_the_scene_and_answers_are_balanced():
    samples = make_split(TRAIN_SEED_BASE, 500)
    assert [s.qtype for s in samples[:5]] == list(QUESTION_TYPES)
    answers = {qtype: Counter() for qtype in QUESTION_TYPES}
    for s in samples:
        assert s.answer == _solve(s), s.question
        assert 1 <= len(s.objects) <= len(QUADRANTS) and len(s.relevant) == len(s.objects)
        answers[s.qtype][s.answer] += 1
    expected = {"position": 10, "largest": 10, "count": 4, "exists": 2, "compare": 2}
    for qtype, counts in answers.items():  # 100 questions of each type
        assert len(counts) == expected[qtype] and max(counts.values()) - min(counts.values()) <= 1, (qtype, counts)


def test_digits_span_several_patches_off_the_patch_grid():
    for s in make_split(3, 100):
        for d in s.objects:
            x0, y0, x1, y1 = d.box
            assert x1 - x0 == y1 - y0 == DIGIT_SIZE > CELL
            assert x0 % CELL and y0 % CELL
            patches = box_patches(d.box)
            rows = {p // (IMAGE_SIZE // CELL) for p in patches}
            assert len(rows) == 2 and len(patches) == 4


def test_test_scenes_use_digit_images_never_seen_in_training():
    pools = {name: {i for cls in pool_indices(name) for i in cls} for name in ("train", "validation", "test")}
    assert not pools["train"] & pools["test"] and not pools["train"] & pools["validation"]
    assert not pools["validation"] & pools["test"] and sum(map(len, pools.values())) == 1797
    for seed, pool in ((TEST_SEED, "test"), (VALIDATION_SEED, "validation"), (TRAIN_SEED_BASE + 5, "train")):
        sources = {d.source for s in make_split(seed, 100) for d in s.objects}
        assert sources and sources <= pools[pool], pool


def test_generator_is_deterministic():
    a, b = make_split(7, 20), make_split(7, 20)
    assert [(s.question, s.answer, s.objects, s.relevant) for s in a] == [
        (s.question, s.answer, s.objects, s.relevant) for s in b
    ]
    assert all(x.image.tobytes() == y.image.tobytes() for x, y in zip(a, b, strict=True))
    assert [s.objects for s in make_split(8, 20)] != [s.objects for s in a]


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A toy LLaVA after two training steps on digits (its answers are noise; the plumbing is what is tested)."""
    folder = tmp_path_factory.mktemp("digits_model")
    scores = train(folder, steps=2, batch_size=4, warmup=1, sizes=TINY, task="digits", eval_every=2, eval_samples=5)
    return folder, scores


def test_two_training_steps_on_digits_save_a_loadable_model(two_steps):
    tmp_path, scores = two_steps
    assert set(scores) == {*QUESTION_TYPES, "overall"}
    model = AutoModelForImageTextToText.from_pretrained(tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path)
    sample = make_split(0, 1)[0]
    assert processor.tokenizer.unk_token_id not in processor.tokenizer(sample.question)["input_ids"]
    assert len(answer(model, processor, [sample.image], [sample.question])) == 1


def test_a_continued_run_starts_from_the_checkpoint_with_the_curricula_done(two_steps, tmp_path, monkeypatch):
    folder, _ = two_steps
    seen = []

    def loss(task, model, processor, samples, background_visible, generator):
        seen.append(
            (
                {k: v.clone() for k, v in model.state_dict().items()},
                max(len(s.objects) for s in samples),
                background_visible,
            )
        )
        return model.lm_head.weight.sum() * 0

    monkeypatch.setattr(train_module, "_loss", loss)
    train(tmp_path, steps=1, batch_size=8, warmup=1, task="digits", eval_every=1, eval_samples=5, init=folder)
    ((weights, most, visible),) = seen
    assert (most, visible) == (MAX_OBJECTS, 1.0)  # full scenes, all background visible from the first step
    saved = AutoModelForImageTextToText.from_pretrained(folder).state_dict()
    assert set(weights) == set(saved) and all(torch.equal(weights[k], saved[k]) for k in saved)


def test_a_continued_run_refuses_a_checkpoint_of_another_task(two_steps, tmp_path):
    folder, _ = two_steps
    with pytest.raises(VTPruneError, match="init=.*not trained on task 'shapes'"):
        train(tmp_path, steps=1, batch_size=2, task="shapes", init=folder)


def test_background_dropout_shows_a_random_share_of_the_background(two_steps, tmp_path, monkeypatch):
    folder, _ = two_steps
    shares = []

    def loss(task, model, processor, samples, background_visible, generator):
        shares.append(background_visible)
        return model.lm_head.weight.sum() * 0

    monkeypatch.setattr(train_module, "_loss", loss)
    train(
        tmp_path,
        steps=6,
        batch_size=2,
        warmup=1,
        task="digits",
        eval_every=6,
        eval_samples=2,
        init=folder,
        background_dropout=True,
    )
    assert len(shares) == 6 and all(0.0 <= share < 1.0 for share in shares) and len(set(shares)) == 6


def _task_utils():
    spec = importlib.util.spec_from_file_location("vtprune_digits_utils", TASK_DIR / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_lmms_eval_task_data_is_the_test_split():
    lines = (TASK_DIR / "digits_test.jsonl").read_text().splitlines()
    fresh = make_split(TEST_SEED, len(lines))
    utils = _task_utils()
    assert len(lines) == utils.SAMPLES
    for index, (line, sample) in enumerate(zip(lines, fresh, strict=True)):
        doc = json.loads(line)
        assert doc == {"index": index, "question": sample.question, "answer": sample.answer, "qtype": sample.qtype}
    (image,) = utils.doc_to_visual(json.loads(lines[7]))
    assert image.tobytes() == fresh[7].image.tobytes()


def test_a_sweep_runs_on_the_lmms_eval_digits_task(two_steps, tmp_path):
    from vtprune.harness.sweep import run_sweep

    folder, _ = two_steps
    runs = run_sweep(
        str(folder),
        ["vtprune_digits"],
        ["divprune:16"],
        tmp_path,
        include_path=str(ROOT / "eval" / "tasks"),
        limit=5,
        progress=False,
        timing_rounds=0,
    )
    assert [run.schedule for run in runs] == ["none", "divprune:16"]
    payload = json.loads((tmp_path / "sweep.json").read_text())
    pruned = payload["runs"][1]
    assert pruned["visual_tokens_kept"] == 16 and len(pruned["samples"]) == 5
    assert set(pruned["scores"]["vtprune_digits"]) >= {"accuracy", *QUESTION_TYPES}


def _row(name: str, overall: float, kept: float = 144, budget: int | None = None) -> Row:
    series = name if budget is None else name.replace(f":{budget}", "")
    return Row(name, budget, series, kept, {"overall": overall}, 0.0)


def test_the_targets_name_what_a_task_misses():
    rows = [
        _row("unpruned", 0.95),
        _row("oracle: object tokens only", 0.93, 20),
        _row("oracle: background tokens only", 0.40, 124),
        _row("fastv@2:36", 0.90, 36, 36),
        _row("random:36", 0.80, 36, 36),
    ]
    results = check_targets(rows, chance=0.29)
    assert [met for _, met in results] == [True, True, False, False]
    assert results[2][0] == "background-only 40.0 at chance (29.0 + 5)"
    assert results[3][0] == "random at 36 tokens 80.0, 10.0 below the best there (fastv@2: 90.0); needed 15"


def test_the_table_has_a_column_per_digits_question_type():
    row = Row("unpruned", None, "unpruned", 144, {"compare": 0.5, "position": 1.0, "overall": 0.75}, 0.0)
    header, _, line = format_table([row], QUESTION_TYPES).splitlines()
    assert header == "| schedule | kept/image | position | compare | overall | s/sample |"
    assert line == "| unpruned | 144.0 | 100.0 | 50.0 | **75.0** | 0.0000 |"


def test_the_horizon_command_measures_on_digits_questions(two_steps, tmp_path, capsys, monkeypatch):
    from vtprune.cli import main

    asked = []
    spy = dataclasses.replace(TASKS["digits"], make_split=lambda *a, **k: asked.append(a) or make_split(*a, **k))
    monkeypatch.setitem(TASKS, "digits", spy)
    folder, _ = two_steps
    args = ["horizon", "--task", "digits", "--model", str(folder), "--samples", "1", "--layers", "0"]
    main([*args, "--tokens", "8", "--group", "8", "--strategies", "divprune", "--out", "", "--plot", ""])
    assert asked == [(TEST_SEED, 1)]
    assert "| layer | mean information | relative | uniformity | AUC divprune | random |" in capsys.readouterr().out
