"""Write the README's toy-VLM accuracy tables from a fresh benchmark run (the one source of those figures).

Examples: python eval/readme_figures.py --threads 2                  # both toy models, README.md rewritten in place
          python eval/readme_figures.py --models qwen2_vl --dry-run  # print the blocks, leave README.md alone
Each table sits in README.md between ``<!-- figures:NAME -->`` and ``<!-- /figures:NAME -->``; NAME is
``<model>-summary`` (overall accuracy per strategy and budget) or ``<model>-full`` (per question type, with the
oracles and seconds per sample). Every registered strategy is run (``vtprune.list_strategies()``), so a new strategy
appears after the next run, and the option settings the README discusses (:func:`variants`). tests/integration/test_readme_figures.py recomputes some cells and fails when they drift.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
from pathlib import Path

import torch
import transformers

import vtprune
from vtprune.toyvlm import load_toy_model, make_split
from vtprune.toyvlm.benchmark import format_summary, format_table, run_benchmark
from vtprune.toyvlm.data import TEST_SEED
from vtprune.toyvlm.model import DEFAULT_PATH, QWEN2_VL_PATH

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: The shipped toy models, by the name their README blocks use: their config's ``model_type``.
MODELS = {transformers.AutoConfig.from_pretrained(path).model_type: path for path in (DEFAULT_PATH, QWEN2_VL_PATH)}
#: Visual tokens kept per image (of 144) in the README's tables.
BUDGETS = (144, 72, 36, 16, 7, 3)
#: Test questions behind every figure.
SAMPLES = 300


def variants(model_path: Path) -> list[str]:
    """Settings beyond the registered defaults that the README discusses: CDPruner's relevance weight, TRIM's
    adaptive count, and both with the toy's own CLIP text tower (``clip_text``, eval/train_toy_text_tower.py)."""
    tower = (model_path / "clip_text").relative_to(ROOT)
    return [
        "cdpruner(theta:0.5)",
        "trim(adaptive:true)",
        f"cdpruner(text_tower:{tower})",
        f"cdpruner(theta:0.5;text_tower:{tower})",
        f"trim(text_tower:{tower})",
        f"trim(adaptive:true;text_tower:{tower})",
    ]


def _block_pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- figures:{re.escape(name)} -->\n)(.*?)(<!-- /figures:{re.escape(name)} -->)", re.DOTALL)


def read_block(text: str, name: str) -> str:
    """The body of the README block ``name``; a missing block is an error, not an empty table."""
    match = _block_pattern(name).search(text)
    if match is None:
        raise KeyError(f"README has no block <!-- figures:{name} --> ... <!-- /figures:{name} -->")
    return match.group(2)


def replace_block(text: str, name: str, body: str) -> str:
    """``text`` with the body of block ``name`` replaced by ``body`` (which must end with a newline)."""
    read_block(text, name)
    return _block_pattern(name).sub(lambda m: m.group(1) + body + m.group(3), text, count=1)


def figures(model_name: str, samples: int, threads: int) -> dict[str, str]:
    """The README blocks of one toy model: ``{"<model>-summary": table, "<model>-full": header + table}``."""
    model, processor = load_toy_model(MODELS[model_name])
    load_before = os.getloadavg()[0]
    rows = run_benchmark(
        model,
        processor,
        make_split(TEST_SEED, samples),
        strategies=[*vtprune.list_strategies(), *variants(Path(MODELS[model_name]))],
        budgets=BUDGETS,
        progress=lambda line: print(f"{model_name}: {line}", file=sys.stderr, flush=True),
    )
    header = (
        f"# toy VLM ({type(model).__name__}) accuracy vs visual tokens: {samples} test questions (seed {TEST_SEED}), "
        f"{platform.machine()} CPU, {threads} threads, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{type(processor.image_processor).__name__}; load average {load_before:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end (s/sample is wall time under that load)"
    )
    return {
        f"{model_name}-summary": format_summary(rows, BUDGETS) + "\n",
        f"{model_name}-full": f"{header}\n{format_table(rows)}\n",
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--dry-run", action="store_true", help="print the blocks instead of writing the README")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.chdir(ROOT)  # the variants name their text towers relative to the checkout, as the README prints them
    blocks: dict[str, str] = {}
    for name in args.models:
        blocks.update(figures(name, SAMPLES, args.threads))
    if args.dry_run:
        for name, body in blocks.items():
            print(f"<!-- figures:{name} -->\n{body}<!-- /figures:{name} -->")
        return
    text = args.readme.read_text()
    for name, body in blocks.items():
        text = replace_block(text, name, body)
    args.readme.write_text(text)
    print(f"wrote {', '.join(blocks)} into {args.readme}")


if __name__ == "__main__":
    main()
