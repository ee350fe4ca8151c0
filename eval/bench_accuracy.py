"""Accuracy versus visual tokens of a shipped toy VLM, for every registered strategy (CPU, minutes).

Examples: python eval/bench_accuracy.py --samples 300 --threads 2
          python eval/bench_accuracy.py --model vtprune/assets/toy_qwen2_vl --samples 300 --threads 2
          python eval/bench_accuracy.py --task digits --samples 150 --threads 1
          python eval/bench_accuracy.py --backend llava-torch --samples 100 --threads 1
Prints markdown tables: accuracy per question type and overall at each budget, with the unpruned row, the oracle
rows (object tokens only / background tokens only) and seconds per sample; overall accuracy per strategy and budget;
then whether the task's figures meet the targets that make it a benchmark of token selection. ``--backend
llava-torch`` runs the toy LLaVA converted to the original LLaVA codebase (fp32; no oracle rows, no targets).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile

import torch

from vtprune.adapters.llava_torch_format import load_llava_torch, save_as_llava_torch
from vtprune.toyvlm import load_toy_model
from vtprune.toyvlm.benchmark import DEFAULT_BUDGETS, check_targets, format_summary, format_table, run_benchmark
from vtprune.toyvlm.data import TEST_SEED
from vtprune.toyvlm.model import DEFAULT_PATH, DIGITS_PATH
from vtprune.toyvlm.tasks import TASKS

#: The shipped checkpoint of each task (``--model`` picks another).
MODELS = {"shapes": DEFAULT_PATH, "digits": DIGITS_PATH}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=list(TASKS), default="shapes", help="which toy task's test split")
    parser.add_argument("--model", default=None, help="folder of a saved toy VLM (default: the task's shipped one)")
    parser.add_argument("--samples", type=int, default=300, help="held-out questions (test split)")
    parser.add_argument("--budgets", type=int, nargs="+", default=list(DEFAULT_BUDGETS), help="tokens kept per image")
    parser.add_argument("--strategies", nargs="+", default=None, help="default: every registered strategy")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--backend",
        choices=["transformers", "llava-torch"],
        default="transformers",
        help="llava-torch: the (LLaVA) toy converted to the original LLaVA codebase, in a temporary folder",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    task = TASKS[args.task]
    model, processor = load_toy_model(args.model or MODELS[args.task])
    samples = task.make_split(TEST_SEED, args.samples)
    llava_torch = args.backend == "llava-torch"
    with tempfile.TemporaryDirectory() as folder:
        if llava_torch:
            model = load_llava_torch(save_as_llava_torch(model.float(), folder))
        rows = run_benchmark(
            model,
            processor,
            samples,
            strategies=args.strategies,
            budgets=args.budgets,
            batch_size=args.batch_size,
            progress=lambda line: print(line, file=sys.stderr, flush=True),
            oracles=not llava_torch,
        )
    print(
        f"# toy VLM ({type(model).__name__}) accuracy vs visual tokens, {args.task} task: {args.samples} test "
        f"questions (seed {TEST_SEED}), {platform.machine()} CPU, {args.threads} threads, torch {torch.__version__}"
    )
    print(format_table(rows, task.question_types))
    print()
    print(format_summary(rows, args.budgets))
    if llava_torch:
        return
    print()
    for description, met in check_targets(rows, task.overall_chance):
        print(f"- target {'met' if met else 'MISSED'}: {description}")


if __name__ == "__main__":
    main()
