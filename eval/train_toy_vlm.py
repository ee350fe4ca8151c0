"""Train a toy VLM (see vtprune.toyvlm.train for the recipe and the measured figures).

Examples: python eval/train_toy_vlm.py --out vtprune/assets/toy_llava --steps 5000 --threads 2
          python eval/train_toy_vlm.py --family qwen2_vl --out vtprune/assets/toy_qwen2_vl --threads 2
          python eval/train_toy_vlm.py --task digits --text-layers 8 --out vtprune/assets/toy_llava_digits
"""

from __future__ import annotations

import argparse
import sys

import torch

from vtprune.toyvlm.model import DEFAULT_FAMILY, DEFAULT_SIZES, FAMILIES
from vtprune.toyvlm.tasks import TASKS
from vtprune.toyvlm.train import train


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=FAMILIES, default=DEFAULT_FAMILY, help="architecture of the toy VLM")
    parser.add_argument("--task", choices=list(TASKS), default="shapes", help="what the toy VLM learns to answer")
    parser.add_argument("--out", required=True, help="folder to save_pretrained the best checkpoint into")
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--background-dropout", action="store_true", help="show a random share of the background tokens each step"
    )
    parser.add_argument("--init", help="continue from this saved checkpoint (curricula done; sizes are its own)")
    for size, default in DEFAULT_SIZES.items():
        # No default here: a family may declare its own sizes (the toy Qwen2-VL's depth-0 vision transformer).
        parser.add_argument(
            f"--{size.replace('_', '-')}", type=int, help=f"model size (default {default}, or the family's)"
        )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    best = train(
        args.out,
        steps=args.steps,
        seed=args.seed,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=args.warmup,
        family=args.family,
        task=args.task,
        sizes={size: getattr(args, size) for size in DEFAULT_SIZES if getattr(args, size) is not None},
        eval_every=args.eval_every,
        init=args.init,
        background_dropout=args.background_dropout,
        log=lambda line: print(line, flush=True),
    )
    print("best held-out (validation) accuracy:", best, flush=True)


if __name__ == "__main__":
    sys.exit(main())
