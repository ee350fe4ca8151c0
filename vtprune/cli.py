"""``vtprune`` command line: ``vtprune demo``, ``vtprune strategies``."""

from __future__ import annotations

import argparse
import time
from typing import Sequence

import torch

import vtprune


def _demo_toy(model, processor, schedule: str, count: int, seed: int) -> None:
    """Ask the shipped toy VLM questions about generated images, unpruned and pruned."""
    from .toyvlm.data import make_split
    from .toyvlm.model import answer

    samples = make_split(seed, count)
    images, questions = [s.image for s in samples], [s.question for s in samples]
    start = time.perf_counter()
    unpruned = answer(model, processor, images, questions)
    unpruned_seconds = time.perf_counter() - start
    with vtprune.pruned(model, schedule) as handle:
        start = time.perf_counter()
        pruned = answer(model, processor, images, questions)
        pruned_seconds = time.perf_counter() - start
    record = handle.last_record
    for sample, plain, cut, image in zip(samples, unpruned, pruned, record.images):
        print(
            f"{sample.question:<40} truth={sample.answer:<8} unpruned={plain:<8} {schedule}={cut:<8} "
            f"kept {image.kept.numel()}/{image.num_tokens} tokens"
        )
    hits = lambda answers: sum(a == s.answer for a, s in zip(answers, samples))  # noqa: E731
    totals = record.visual_tokens()
    print(f"\naccuracy: unpruned {hits(unpruned)}/{count}, {schedule} {hits(pruned)}/{count}")
    print(f"visual tokens per image: {totals['before'] // count} -> {list(totals.values())[-1] // count}")
    print(f"wall time (generate, batch {count}): unpruned {unpruned_seconds:.2f} s, pruned {pruned_seconds:.2f} s")


def _demo_random(schedule: str) -> None:
    """Fallback when no trained checkpoint is installed: a random-weight LLaVA built from a config."""
    from .synthetic import RowSpec, build_inputs, build_model

    model = build_model("llava")
    inputs = build_inputs(model, [RowSpec(images=[(1, 1)]), RowSpec(images=[(1, 1), (1, 1)], text_before=1)])
    with torch.no_grad(), vtprune.pruned(model, schedule) as handle:
        tokens = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    print("no trained demo model found: random-weight LLaVA built from a config (answers are token ids)")
    for row, ids in enumerate(tokens[:, inputs["input_ids"].shape[1] :].tolist()):
        kept = [f"{image.kept.numel()}/{image.num_tokens}" for image in handle.last_record.for_row(row)]
        print(f"row {row}: answer token ids {ids}, visual tokens kept per image {kept}")


def demo(args: argparse.Namespace) -> None:
    schedule = args.schedule
    print(f"vtprune demo: schedule {schedule!r}\n")
    try:
        from .toyvlm.model import load_toy_model

        model, processor = load_toy_model(args.model)
    except (ImportError, FileNotFoundError):
        if args.model is not None:
            raise
        _demo_random(schedule)
        return
    _demo_toy(model, processor, schedule, args.count, args.seed)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vtprune", description="Prune the visual tokens of vision-language models.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="answer questions about images, unpruned and pruned")
    demo_parser.add_argument(
        "--schedule", default="divprune:25%", help="strategy and budget, e.g. 'divprune:16', 'fastv@2:25%%'"
    )
    demo_parser.add_argument("--model", default=None, help="folder of a saved toy VLM (default: the shipped one)")
    demo_parser.add_argument("--count", type=int, default=8, help="questions to ask")
    demo_parser.add_argument("--seed", type=int, default=1234)
    demo_parser.set_defaults(run=demo)
    list_parser = commands.add_parser("strategies", help="list the registered strategies")
    list_parser.set_defaults(run=lambda args: print("\n".join(vtprune.list_strategies())))
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
