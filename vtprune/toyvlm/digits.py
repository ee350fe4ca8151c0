"""Deterministic visual QA on real handwriting: 1-4 digits from scikit-learn's ``load_digits`` on a textured picture.

Why this task next to the shapes one (``data.py``): there every object is one token on a plain background, so one
token carries one object and all background tokens are the same vector; the benchmark saturates. Here a digit is
scaled to 24 px and placed half a patch off the 16 px grid, so it spans 2 x 2 tokens, a quarter of it in each, and
has to be *read* from four of them; the background is a low-contrast crop of one of the two photos
scikit-learn ships, so background tokens all differ (the situation of OCR / TextVQA images).

Layout: the same 192 px image and 12 x 12 grid of 16 px patches as the shapes task (one patch, one visual token);
the image's four quadrants (top left, ...) hold at most one digit each. Digit images come from disjoint pools of
``load_digits`` (:data:`POOLS`): the test split only shows images never seen in training. Each scene is generated
*for* its question, so every question has exactly one one-word answer and answers are balanced per question type.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

from vtprune.toyvlm.data import CELL, IMAGE_SIZE, TEST_SEED, VALIDATION_SEED, Sample

QUESTION_TYPES = ("position", "largest", "count", "exists", "compare")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
DIGITS = tuple(str(d) for d in range(10))
MAX_COUNT = 3
MAX_OBJECTS = len(QUADRANTS)
#: Digit side in pixels, 1.5 patches: placed half a patch off the grid, a digit covers exactly 2 x 2 tokens, a
#: quarter of it in each (see :func:`_place` for why the size and the phase are fixed).
DIGIT_SIZE = CELL + CELL // 2
INK = np.array([25.0, 20.0, 60.0])
#: Background: the photo's deviation from its mean, scaled down, around a light grey (a low-contrast texture).
BACKGROUND_LEVEL, BACKGROUND_CONTRAST = 185.0, 0.35
#: Shares of each digit class's ``load_digits`` images (in dataset order) that go to each pool.
POOLS = {"train": (0.0, 0.7), "validation": (0.7, 0.8), "test": (0.8, 1.0)}


@dataclass(frozen=True)
class Digit:
    """One handwritten digit: its value, the ``load_digits`` image index, and its pixel box (x0, y0, x1, y1)."""

    digit: int
    source: int
    box: tuple[int, int, int, int]


def vocabulary() -> list[str]:
    """Every word a question or an answer can use (the tokenizer's vocabulary is built from it)."""
    words = {"what", "digit", "digits", "is", "in", "the", "largest", "how", "many", "are", "a", "larger", "than", "?"}
    words |= {"top", "bottom", "left", "right", "yes", "no"} | set(DIGITS)
    return sorted(words)


def pool_for_seed(seed: int) -> str:
    """The digit images a split draws from: ``test`` for ``TEST_SEED``, ``validation`` for ``VALIDATION_SEED``,
    ``train`` for every other seed (training draws one seed per step)."""
    return {TEST_SEED: "test", VALIDATION_SEED: "validation"}.get(seed, "train")


def _sklearn_datasets():
    try:
        from sklearn import datasets
    except ImportError as missing:
        raise ImportError("the digits task draws on scikit-learn's data: pip install 'vtprune[eval]'") from missing
    return datasets


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    data = _sklearn_datasets().load_digits()
    return data.images.astype(np.float32) / 16.0, data.target


@functools.cache
def pool_indices(pool: str) -> tuple[tuple[int, ...], ...]:
    """Per digit class, the ``load_digits`` indices of ``pool`` (the pools are disjoint by construction)."""
    low, high = POOLS[pool]
    _, targets = _digits()
    result = []
    for d in range(10):
        members = np.flatnonzero(targets == d)
        result.append(tuple(int(i) for i in members[round(low * len(members)) : round(high * len(members))]))
    return tuple(result)


@functools.cache
def _photos() -> tuple[np.ndarray, ...]:
    return tuple(image.astype(np.float32) for image in _sklearn_datasets().load_sample_images().images)


def _background(rng: random.Random) -> np.ndarray:
    """A ``IMAGE_SIZE`` square crop of a shipped photo, maybe mirrored, as a low-contrast texture."""
    photo = rng.choice(_photos())
    top, left = rng.randrange(photo.shape[0] - IMAGE_SIZE), rng.randrange(photo.shape[1] - IMAGE_SIZE)
    crop = photo[top : top + IMAGE_SIZE, left : left + IMAGE_SIZE]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return BACKGROUND_LEVEL + BACKGROUND_CONTRAST * (crop - crop.mean())


def _place(rng: random.Random, digit: int, quadrant: int, pool: str) -> Digit:
    """A digit at one of the quadrant's 4 x 4 half-cell offsets (8, 24, 40, 56 px from its corner).

    Size and phase are fixed because the toy's visual tokens are linear patch embeddings: with sizes of 20-28 px at
    any offset (the first version), a linear classifier on the pixels of the 3 x 3 patches around a digit read 20 %
    of held-out digits, and a toy LLaVA stayed at chance even on reading alone; at 24 px and half-cell offsets the
    same classifier reads 90 % (train.py's docstring has the probes).
    """
    half = IMAGE_SIZE // 2
    offsets = range(CELL // 2, half - DIGIT_SIZE, CELL)
    x0 = (quadrant % 2) * half + rng.choice(offsets)
    y0 = (quadrant // 2) * half + rng.choice(offsets)
    source = rng.choice(pool_indices(pool)[digit])
    return Digit(digit, source, (x0, y0, x0 + DIGIT_SIZE, y0 + DIGIT_SIZE))


def _draw(rng: random.Random, digits: list[Digit]) -> Image.Image:
    canvas = _background(rng)
    images, _ = _digits()
    for d in digits:
        x0, y0, x1, y1 = d.box
        ink = Image.fromarray(images[d.source], mode="F").resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR)
        alpha = np.clip(np.asarray(ink), 0.0, 1.0)[..., None]
        canvas[y0:y1, x0:x1] = (1 - alpha) * canvas[y0:y1, x0:x1] + alpha * INK
    return Image.fromarray(np.clip(canvas, 0, 255).round().astype(np.uint8), mode="RGB")


def answers(qtype: str, max_objects: int = MAX_OBJECTS) -> tuple[str, ...]:
    """Every answer a question of type ``qtype`` can have in scenes of at most ``max_objects`` digits."""
    if qtype in ("position", "largest"):
        return DIGITS
    if qtype == "count":
        return tuple(str(c) for c in range(min(MAX_COUNT, max_objects) + 1))
    if qtype in ("exists", "compare"):
        return ("yes", "no")
    raise ValueError(f"unknown question type {qtype!r}; expected one of {QUESTION_TYPES}")


def make_sample(
    rng: random.Random, qtype: str, answer: str, max_objects: int = MAX_OBJECTS, pool: str = "train"
) -> Sample:
    """Build a scene of 1-``max_objects`` digits (2-4 for ``compare``) for a question of type ``qtype`` whose answer
    is ``answer`` (one of :func:`answers`).

    ``relevant`` marks the digits the answer is computed from: the asked quadrant's, every digit for ``largest``,
    those equal to the asked digit for ``count`` and ``exists``, the two compared ones for ``compare``.
    """
    fewest = 2 if qtype == "compare" else 1
    n = rng.randint(fewest, max(max_objects, fewest))
    if answer not in answers(qtype, max_objects):
        raise ValueError(f"{answer!r} cannot answer a {qtype} question; expected one of {answers(qtype, max_objects)}")
    if qtype == "position":
        values = [int(answer)] + [rng.randrange(10) for _ in range(n - 1)]
        question = "what digit is in the {0} ?"
        relevant = [True] + [False] * (n - 1)
    elif qtype == "largest":
        values = [int(answer)] + [rng.randint(0, int(answer)) for _ in range(n - 1)]
        question = "what is the largest digit ?"
        relevant = [True] * n
    elif qtype in ("count", "exists"):
        asked = rng.randrange(10)
        if qtype == "count":
            count = int(answer)
            n = rng.randint(max(count, 1), max_objects)
            question = f"how many digits are {asked} ?"
        else:
            count = int(answer == "yes")
            question = f"is there a {asked} ?"
        others = [d for d in range(10) if d != asked]
        values = [asked] * count + [rng.choice(others) for _ in range(n - count)]
        relevant = [v == asked for v in values]
    elif qtype == "compare":
        low, high = sorted(rng.sample(range(10), 2))
        values = [high, low] if answer == "yes" else [low, high]
        values += [rng.randrange(10) for _ in range(n - 2)]
        question = "is the {0} digit larger than the {1} digit ?"
        relevant = [True, True] + [False] * (n - 2)
    quadrants = rng.sample(range(len(QUADRANTS)), len(values))
    digits = [_place(rng, v, q, pool) for v, q in zip(values, quadrants, strict=True)]
    question = question.format(*(QUADRANTS[q] for q in quadrants))
    return Sample(_draw(rng, digits), question, answer, qtype, tuple(digits), tuple(relevant))


def make_split(seed: int, n: int, max_objects: int = MAX_OBJECTS) -> list[Sample]:
    """``n`` samples, question types in round-robin order, fully determined by ``seed``; the digit images come from
    the pool :func:`pool_for_seed` names.

    Answers are dealt from a shuffled deck per question type (every answer once, then a fresh shuffle), so each
    answer of a type occurs equally often up to one.
    """
    rng = random.Random(seed)
    pool = pool_for_seed(seed)
    decks: dict[str, list[str]] = {}
    samples = []
    for i in range(n):
        qtype = QUESTION_TYPES[i % len(QUESTION_TYPES)]
        if not decks.get(qtype):
            decks[qtype] = list(answers(qtype, max_objects))
            rng.shuffle(decks[qtype])
        samples.append(make_sample(rng, qtype, decks[qtype].pop(), max_objects, pool))
    return samples
