"""``vtprune`` command line: ``vtprune demo``, ``vtprune viz``, ``vtprune sweep``, ``vtprune horizon``, ``vtprune strategies``."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import torch

import vtprune

from .analysis.command import add_horizon_command
from .arguments import at_least
from .harness.command import add_sweep_command
from .toyvlm.data import TEST_SEED


def demo(args: argparse.Namespace) -> None:
    """Ask the shipped toy VLM questions about generated scenes, unpruned and under each schedule; draw the first."""
    from . import viz as visualise
    from .toyvlm.data import make_split
    from .toyvlm.model import answer, load_toy_model, prompt_inputs

    model, processor = load_toy_model(args.model)
    samples = make_split(args.seed, args.count)
    images, questions = [s.image for s in samples], [s.question for s in samples]
    runs: dict[str, tuple[list[str], float, int]] = {}  # name -> answers, seconds, visual tokens per image
    for schedule in ["none", *args.schedule]:
        with vtprune.pruned(model, schedule, tokenizer=processor) as handle:
            start = time.perf_counter()
            answers = answer(model, processor, images, questions)
            seconds = time.perf_counter() - start
        record = handle.require_record()
        kept = record.visual_tokens_left() // args.count
        runs["unpruned" if schedule == "none" else schedule] = answers, seconds, kept
    name = "the shipped toy LLaVA" if args.model is None else f"the toy {model.config.model_type} in {args.model}"
    print(f"vtprune demo: {name} on {args.count} held-out questions (batched generate())\n")
    print(f"{'question':<38} {'truth':<9}" + "".join(f"{name:<14}" for name in runs))
    for index, sample in enumerate(samples):
        cells = "".join(f"{answers[index]:<14}" for answers, _, _ in runs.values())
        print(f"{sample.question:<38} {sample.answer:<9}{cells}")
    print()
    for name, (answers, seconds, kept) in runs.items():
        print(
            f"{name:<14} accuracy {_hits(answers, samples)}/{args.count}  visual tokens per image {kept:>3} of "
            f"{runs['unpruned'][2]}  generate {seconds:.2f} s"
        )
    if args.out and args.schedule:
        shown = slice(0, min(4, args.count))
        inputs = prompt_inputs(processor, images[shown], questions[shown])
        with torch.no_grad(), vtprune.pruned(model, args.schedule[0], tokenizer=processor) as handle:
            model(**inputs)  # the prefill generate() runs, for the picture
        record = handle.require_record()
        picture = visualise.show_kept(
            record,
            inputs,
            images[shown],
            model=model,
            processor=processor,
            columns=shown.stop,
            label=args.schedule[0],
            questions=questions[shown],
        )
        picture.save(args.out)
        print(f"\nkept tokens of the first {shown.stop} scenes under {args.schedule[0]} drawn in {args.out}")


def _hits(answers: Sequence[str], samples: Sequence) -> int:
    return sum(a == s.answer for a, s in zip(answers, samples))


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
        try:
            image = Image.open(args.image).convert("RGB")
        except (OSError, ValueError) as error:  # missing, unreadable or not an image (PIL's UnidentifiedImageError)
            raise SystemExit(f"vtprune viz: cannot read --image {args.image}: {error}") from None
        question = args.question or "what is in the image ?"
    inputs = processor(images=[image], text=[build_prompt(question, processor)], return_tensors="pt")
    with (
        torch.no_grad(),
        vtprune.pruned(model, args.schedule, tokenizer=processor, record_scores=args.heatmap is not None) as handle,
    ):
        model(**inputs)  # the prefill: what generate() would prune
    record = handle.require_record()
    drawing: dict[str, Any] = {"model": model, "processor": processor, "questions": [question]}
    visualise.show_kept(record, inputs, [image], stages="all", label=args.schedule, **drawing).save(args.out)
    item = record.images[0]
    kept = ", ".join(f"{stage} {count}/{item.num_tokens}" for stage, count in item.tokens_after().items())
    print(f"{question!r}, {args.schedule}: kept {kept} visual tokens -> {args.out}")
    if args.heatmap is not None:
        stage = next(iter(item.scores_by_stage))
        strategy = _strategy_of(vtprune.parse_schedule(args.schedule), stage)
        visualise.show_scores(record, inputs, [image], strategy=strategy, **drawing).save(args.heatmap)
        print(f"scores of {stage!r} ({strategy}) -> {args.heatmap}")


def _strategy_of(schedule: vtprune.Schedule, stage: str) -> str:
    """The strategy of the schedule's stage that the record names ``stage`` (``input``, ``layer K``)."""
    for step in schedule.stages:
        if (step.layer is None and stage == "input") or stage == f"layer {step.layer}":
            return step.strategy.name
    return stage


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vtprune", description="Prune the visual tokens of vision-language models.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="answer questions about images, unpruned and pruned")
    demo_parser.add_argument(
        "--schedule",
        nargs="+",
        default=["divprune:8", "random:8"],
        help="schedules to compare with the unpruned model, e.g. 'divprune:16' 'fastv@2:25%%'",
    )
    demo_parser.add_argument("--model", default=None, help="folder of a saved toy VLM (default: the shipped one)")
    demo_parser.add_argument("--count", type=at_least(1), default=8, help="questions to ask")
    demo_parser.add_argument("--seed", type=int, default=TEST_SEED, help="split seed (default: the test split)")
    demo_parser.add_argument("--out", default="vtprune_demo.png", help="PNG of the kept tokens ('' for none)")
    demo_parser.set_defaults(run=demo)
    viz_parser = commands.add_parser("viz", help="draw the visual tokens a schedule keeps on an image (PNG)")
    viz_parser.add_argument("--image", default=None, help="image file (default: a generated scene)")
    viz_parser.add_argument("--question", default=None, help="question asked about it (default: the scene's own)")
    viz_parser.add_argument("--schedule", default="divprune:25%", help="strategy and budget, e.g. 'fastv@2:25%%'")
    viz_parser.add_argument("--out", default="kept.png", help="PNG to write")
    viz_parser.add_argument("--heatmap", default=None, help="also write a heat map of the first stage's scores here")
    viz_parser.add_argument("--model", default=None, help="folder of a saved toy VLM (default: the shipped one)")
    viz_parser.add_argument("--seed", type=int, default=TEST_SEED, help="split seed of the generated scene")
    viz_parser.set_defaults(run=viz)
    add_sweep_command(commands)
    add_horizon_command(commands)
    list_parser = commands.add_parser("strategies", help="list the registered strategies")
    list_parser.set_defaults(run=lambda args: print("\n".join(vtprune.list_strategies())))
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
