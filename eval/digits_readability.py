"""How readable a digit of the digits task is from the pixels of the patches around it (a logistic regression).

Why: the toy VLM's visual tokens are linear patch embeddings, so how well a *linear* classifier reads a digit from the
pixels of the 3 x 3 patches that start at its top-left patch says whether a digit's placement is learnable by the toy
at all. It decided the generator's geometry (``vtprune.toyvlm.digits._place``; figures in vtprune/toyvlm/train.py).

Examples: python eval/digits_readability.py                      # the generator as shipped (24 px, half-cell offsets)
          python eval/digits_readability.py --sizes 20 28         # 20-28 px at any offset (the first version)
          python eval/digits_readability.py --sizes 24 24 --phase 8 --jitter 2
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
import warnings
from unittest import mock

import numpy as np

from vtprune.toyvlm import digits
from vtprune.toyvlm.data import CELL, IMAGE_SIZE, TRAIN_SEED_BASE, VALIDATION_SEED
from vtprune.toyvlm.model import DEFAULT_FAMILY, build_processor

WINDOW = 3 * CELL


def _placement(sizes: tuple[int, int], phase: int | None, jitter: int):
    """A replacement for ``digits._place``: sizes in ``sizes``, the offset in a quadrant any pixel (``phase`` None)
    or ``phase`` px past a patch boundary, moved by up to ``jitter`` px."""

    def place(rng: random.Random, digit: int, quadrant: int, pool: str) -> digits.Digit:
        size, half = rng.randint(*sizes), IMAGE_SIZE // 2

        def offset() -> int:
            if phase is None:
                return rng.randint(1, half - size - 1)
            return min(
                max(1, CELL * rng.randrange((half - size) // CELL) + phase + rng.randint(-jitter, jitter)),
                half - size - 1,
            )

        x0, y0 = (quadrant % 2) * half + offset(), (quadrant // 2) * half + offset()
        return digits.Digit(digit, rng.choice(digits.pool_indices(pool)[digit]), (x0, y0, x0 + size, y0 + size))

    return place


def _windows(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixels (normalised as the toy's processor does, every second one) of the window around the one digit of ``n``
    position questions, and the digits."""
    processor = build_processor(DEFAULT_FAMILY, digits.vocabulary())
    rng, pool = random.Random(seed), digits.pool_for_seed(seed)
    features, labels = [], []
    for _ in range(n):
        sample = digits.make_sample(rng, "position", str(rng.randrange(10)), 1, pool)
        pixels = processor.image_processor(sample.image, return_tensors="np")["pixel_values"][0]
        (obj,) = sample.objects
        top, left = obj.box[1] // CELL * CELL, obj.box[0] // CELL * CELL
        window = np.zeros((3, WINDOW, WINDOW), np.float32)
        crop = pixels[:, top : top + WINDOW, left : left + WINDOW]
        window[:, : crop.shape[1], : crop.shape[2]] = crop
        features.append(window[:, ::2, ::2].ravel())
        labels.append(obj.digit)
    return np.array(features), np.array(labels)


def main(argv: list[str] | None = None) -> None:
    from sklearn.linear_model import LogisticRegression

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=None, help="digit sides in px (default: as shipped)")
    parser.add_argument("--phase", type=int, default=None, help="offset past a patch boundary (default: any)")
    parser.add_argument("--jitter", type=int, default=0)
    parser.add_argument("--train", type=int, default=1500, help="training digits")
    parser.add_argument("--test", type=int, default=300, help="held-out (validation pool) digits")
    args = parser.parse_args(argv)
    patch = (
        mock.patch.object(digits, "_place", _placement(tuple(args.sizes), args.phase, args.jitter))
        if args.sizes
        else contextlib.nullcontext()
    )
    with patch:
        train = _windows(TRAIN_SEED_BASE, args.train)
        held_out = _windows(VALIDATION_SEED, args.test)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lbfgs stops at max_iter on the unreadable variants
        score = LogisticRegression(max_iter=500, C=0.1).fit(*train).score(*held_out)
    print(f"linear read-out of held-out digits: {100 * score:.1f} %")


if __name__ == "__main__":
    sys.exit(main())
