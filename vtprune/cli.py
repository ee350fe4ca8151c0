"""``vtprune`` command line: ``vtprune demo``, ``vtprune viz``, ``vtprune strategies``."""

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


def viz(args: argparse.Namespace) -> None:
    """Draw which visual tokens a schedule keeps of one image, on the image itself (one column per stage)."""
    from PIL import Image

    from . import viz as visualise
    from .toyvlm.data import make_split
    from .toyvlm.model import build_prompt, load_toy_model

    try:
        model, processor = load_toy_model(args.model)
    except FileNotFoundError as error:
        raise SystemExit(f"vtprune viz: {error}; pass --model DIR (a saved toy VLM)") from None
    if args.image is None:  # a generated scene and its own question
        sample = make_split(args.seed, 1)[0]
        image, question = sample.image, args.question or sample.question
    else:
        image, question = Image.open(args.image).convert("RGB"), args.question or "what is in the image ?"
    inputs = processor(images=[image], text=[build_prompt(question)], return_tensors="pt")
    with torch.no_grad(), vtprune.pruned(model, args.schedule, record_scores=args.heatmap is not None) as handle:
        model(**inputs)  # the prefill: what generate() would prune
    record = handle.last_record
    visualise.show_kept(record, inputs, [image], model=model, processor=processor, stages="all").save(args.out)
    item = record.images[0]
    kept = ", ".join(f"{stage} {count}/{item.num_tokens}" for stage, count in item.tokens_after().items())
    print(f"{question!r}, {args.schedule}: kept {kept} visual tokens -> {args.out}")
    if args.heatmap is not None:
        visualise.show_scores(record, inputs, [image], model=model, processor=processor).save(args.heatmap)
        print(f"scores of {next(iter(item.scores_by_stage))!r} -> {args.heatmap}")


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
    viz_parser = commands.add_parser("viz", help="draw the visual tokens a schedule keeps on an image (PNG)")
    viz_parser.add_argument("--image", default=None, help="image file (default: a generated scene)")
    viz_parser.add_argument("--question", default=None, help="question asked about it (default: the scene's own)")
    viz_parser.add_argument("--schedule", default="divprune:25%", help="strategy and budget, e.g. 'fastv@2:25%%'")
    viz_parser.add_argument("--out", default="kept.png", help="PNG to write")
    viz_parser.add_argument("--heatmap", default=None, help="also write a heat map of the first stage's scores here")
    viz_parser.add_argument("--model", default=None, help="folder of a saved toy VLM (default: the shipped one)")
    viz_parser.add_argument("--seed", type=int, default=1234, help="seed of the generated scene")
    viz_parser.set_defaults(run=viz)
    list_parser = commands.add_parser("strategies", help="list the registered strategies")
    list_parser.set_defaults(run=lambda args: print("\n".join(vtprune.list_strategies())))
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
