"""The README's figures agree with the code: some cells of the toy-VLM accuracy tables are recomputed on the full
test split; the demo's printout (all but its times) and the deterministic pictures are redrawn and compared.

The tables are written by eval/readme_figures.py, the Visualisation pictures by eval/viz_figures.py, the demo's by
``vtprune demo --out docs/demo_kept.png``; when a change moves a figure, rerun its command.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import STRATEGIES
from PIL import Image

from vtprune.cli import main as vtprune_cli
from vtprune.toyvlm import load_toy_model, make_split
from vtprune.toyvlm.benchmark import parse_summary, run_schedule, schedules_for, series_name
from vtprune.toyvlm.data import TEST_SEED
from vtprune.toyvlm.digits import make_split as make_digits_split
from vtprune.toyvlm.model import DIGITS_PATH

ROOT = Path(__file__).resolve().parents[2]


def _eval_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "eval" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


figures = _eval_script("readme_figures")
viz_figures = _eval_script("viz_figures")

# (model, schedule, budget): cheap cells of each table, one question-blind and one question-aware or tie-sensitive
# (zoo and divprune on the Qwen toy are the cells that once drifted, 61.0 -> 97.0 and 92.0 -> 95.3).
CELLS = [
    ("llava", "divprune:16", 16),
    ("llava", "fastv@2:3", 3),
    ("qwen2_vl", "divprune:16", 16),
    ("qwen2_vl", "zoo:16", 16),
]


def _summary(model_name: str) -> dict[tuple[str, int], float]:
    return parse_summary(figures.read_block((ROOT / "README.md").read_text(), f"{model_name}-summary"))


@pytest.fixture(scope="module")
def loaded():
    return {name: load_toy_model(path) for name, path in figures.MODELS.items()}


@pytest.mark.parametrize("model_name,schedule,budget", CELLS, ids=[f"{m}-{s}" for m, s, _ in CELLS])
def test_readme_accuracy_cell_reproduces(loaded, model_name, schedule, budget):
    model, processor = loaded[model_name]
    row = run_schedule(schedule, budget, model, processor, make_split(TEST_SEED, figures.SAMPLES))
    written = _summary(model_name)[row.series, budget]
    assert round(100 * row.accuracy["overall"], 1) == written, (
        f"README says {written} for {schedule} on the toy {model_name}, the code gives "
        f"{100 * row.accuracy['overall']:.1f}: rerun python eval/readme_figures.py"
    )


@pytest.mark.parametrize("model_name", list(figures.MODELS))
def test_readme_tables_cover_every_registered_strategy(loaded, model_name):
    model, _ = loaded[model_name]
    layers = model.config.text_config.num_hidden_layers
    expected = {
        (series_name(schedule, budget), budget)
        for name in STRATEGIES
        for budget, schedule in schedules_for(name, figures.BUDGETS, layers)
        if budget is not None
    }
    assert expected, "no budgeted strategy registered"
    missing = sorted(expected - set(_summary(model_name)))
    assert not missing, f"README table of the toy {model_name} lacks {missing}: rerun python eval/readme_figures.py"


def test_replace_block_rewrites_only_its_block():
    text = "a\n<!-- figures:x -->\nold\n<!-- /figures:x -->\nb\n<!-- figures:y -->\nkeep\n<!-- /figures:y -->\n"
    new = figures.replace_block(text, "x", "new\n")
    assert new == text.replace("old", "new")
    with pytest.raises(KeyError, match="figures:z"):
        figures.replace_block(text, "z", "t\n")


def assert_same_picture(drawn: Image.Image, committed: Path, command: str) -> None:
    """``drawn`` equals the committed PNG pixel for pixel."""
    new = np.asarray(drawn.convert("RGB"))
    with Image.open(committed) as picture:
        old = np.asarray(picture.convert("RGB"))
    assert new.shape == old.shape, f"{committed.name} is {old.shape}, the code draws {new.shape}: rerun {command}"
    differing = int((new != old).any(-1).sum())
    assert differing == 0, f"{differing} pixels of {committed.name} differ from what the code draws: rerun {command}"


@pytest.mark.parametrize("name", list(viz_figures.FIGURES))
def test_readme_viz_picture_reproduces(name):
    assert_same_picture(viz_figures.FIGURES[name](), ROOT / "docs" / name, "python eval/viz_figures.py")


def _demo_lines(text: str) -> list[str]:
    """The demo's table and summary lines, without the times (which vary) and trailing spaces."""
    lines = [re.sub(r"\s+generate [0-9.]+ s$", "", line.rstrip()) for line in text.strip().splitlines()]
    return [line for line in lines if line]


def test_readme_demo_reproduces(tmp_path, capsys):
    vtprune_cli(["demo", "--out", str(tmp_path / "demo_kept.png")])
    printed = capsys.readouterr().out
    drawing = printed.index("\nkept tokens of the first")  # the printout, then where the picture went
    written = re.search(r"```\n\s*(vtprune demo: .*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    assert written is not None, "README's demo printout (a code block starting 'vtprune demo: ') is missing"
    command = "vtprune demo --out docs/demo_kept.png and copy its printout into README"
    assert _demo_lines(printed[:drawing]) == _demo_lines(written.group(1)), (
        f"the demo prints otherwise: rerun {command}"
    )
    with Image.open(tmp_path / "demo_kept.png") as drawn:
        assert_same_picture(drawn, ROOT / "docs" / "demo_kept.png", command)


def test_readme_digits_table_cell_reproduces():
    """The README's digits table comes from the shipped checkpoint: DivPrune at 16 tokens on the 300 test questions."""
    written = parse_summary(figures.read_block((ROOT / "README.md").read_text(), "digits-summary"))["divprune", 16]
    model, processor = load_toy_model(DIGITS_PATH)
    row = run_schedule("divprune:16", 16, model, processor, make_digits_split(TEST_SEED, figures.SAMPLES))
    assert round(100 * row.accuracy["overall"], 1) == written, "rerun eval/bench_accuracy.py --task digits"
