"""The README's toy-VLM accuracy tables agree with the code: some cells are recomputed on the full test split.

The tables are written by eval/readme_figures.py; when a change moves a figure, rerun it (see its docstring).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from conftest import STRATEGIES

from vtprune.toyvlm import load_toy_model, make_split
from vtprune.toyvlm.benchmark import parse_summary, run_schedule, schedules_for, series_name
from vtprune.toyvlm.data import TEST_SEED

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("readme_figures", ROOT / "eval" / "readme_figures.py")
figures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(figures)

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
