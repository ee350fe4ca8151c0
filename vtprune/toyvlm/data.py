"""Deterministic synthetic visual QA: a few coloured shapes on a plain background.

Why this task: the answer to every question depends on a handful of image regions (the objects), while most of
the image is background. That makes it a benchmark where *which* visual tokens a pruning strategy keeps decides the
answer: keeping the object patches should keep accuracy, keeping only background should fall to chance.

Layout: a ``IMAGE_SIZE`` px square image split into a ``GRID`` x ``GRID`` grid of ``CELL`` px cells, which are
exactly the model's patches; each object sits centred inside one cell (at most one object per cell). So one object
is one visual token and a scene of 1-5 objects covers 0.7-3.5 % of the 144 tokens: a token either shows a whole
object or plain background. (Objects straddling several 8 px patches, then objects of random size and offset inside
a patch, were tried first: a from-scratch model with a linear patch embedding stayed near chance on shapes.)

Each scene is generated *for* its question (rather than asking questions about random scenes) so that answers are
balanced and every question has exactly one correct one-word answer.
"""

from __future__ import annotations

import base64
import io
import random
from dataclasses import dataclass
from typing import Protocol

from PIL import Image, ImageDraw

IMAGE_SIZE = 192
GRID = 12
CELL = IMAGE_SIZE // GRID
"""Cell side in pixels, and the model's patch size: one cell is one visual token."""
OBJECT = 12
"""Object side in pixels."""
BACKGROUND = (255, 255, 255)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (230, 200, 20),
}
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = ("zero", "one", "two", "three")
REGIONS = ("top", "bottom", "left", "right")
QUESTION_TYPES = ("colour", "shape", "count", "exists", "position")
MAX_OBJECTS = 5
#: Seeds of the held-out splits; training draws each step's batch from seeds >= TRAIN_SEED_BASE.
TEST_SEED = 0
VALIDATION_SEED = 1
TRAIN_SEED_BASE = 1000


@dataclass(frozen=True)
class Obj:
    """One object: its shape, colour name and pixel box (x0, y0, x1, y1), x1/y1 exclusive."""

    shape: str
    colour: str
    box: tuple[int, int, int, int]


class Placed(Protocol):
    """What an oracle needs of an object in a scene (shapes' ``Obj``, ``digits.Digit``): its pixel box."""

    @property
    def box(self) -> tuple[int, int, int, int]: ...


@dataclass(frozen=True)
class Sample:
    """One visual QA example; ``objects`` (shapes' ``Obj`` or ``digits.Digit``: anything with a pixel ``box``) lets
    an oracle know which patches show something.

    ``relevant[i]`` says whether ``objects[i]`` is one the question asks about (the counted shapes, the object
    whose colour is asked, ...); training uses it for a dense auxiliary loss, a benchmark can use it as a stricter
    oracle.
    """

    image: Image.Image
    question: str
    answer: str
    qtype: str
    objects: tuple[Placed, ...]
    relevant: tuple[bool, ...]


def vocabulary() -> list[str]:
    """Every word a question or an answer can use (the tokenizer's vocabulary is built from it)."""
    words = {"what", "colour", "is", "the", "shape", "object", "how", "many", "are", "there", "a", "in", "?"}
    words |= set(COLOURS) | set(SHAPES) | {s + "s" for s in SHAPES} | set(COUNT_WORDS) | set(REGIONS)
    words |= {"yes", "no", "objects", "half"}
    return sorted(words)


def _region_cells(region: str) -> list[tuple[int, int]]:
    """Cells (row, col) of a half of the grid."""
    half = GRID // 2
    cells = [(r, c) for r in range(GRID) for c in range(GRID)]
    return {
        "top": [(r, c) for r, c in cells if r < half],
        "bottom": [(r, c) for r, c in cells if r >= half],
        "left": [(r, c) for r, c in cells if c < half],
        "right": [(r, c) for r, c in cells if c >= half],
    }[region]


def _place(kinds: list[tuple[str, str]], cells: list[tuple[int, int]]) -> list[Obj]:
    """Put each (shape, colour) into its own cell, ``OBJECT`` px wide and centred in it.

    Fixed size and place on purpose: the toy model's visual features are a linear patch embedding plus a
    small MLP, which cannot tell a circle from a square once they move and scale inside the patch (objects
    of 10-14 px at random offsets left shape questions at chance).
    """
    margin = (CELL - OBJECT) // 2
    objs = []
    for (shape, colour), (row, col) in zip(kinds, cells):
        x0, y0 = col * CELL + margin, row * CELL + margin
        objs.append(Obj(shape, colour, (x0, y0, x0 + OBJECT, y0 + OBJECT)))
    return objs


def _draw(objs: list[Obj]) -> Image.Image:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for o in objs:
        x0, y0, x1, y1 = o.box
        fill = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif o.shape == "square":
            draw.rectangle((x0 + 1, y0 + 1, x1 - 2, y1 - 2), fill=fill)
        else:
            draw.polygon([((x0 + x1 - 1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
    return image


def _random_kind(rng: random.Random, exclude_shapes=(), exclude_colours=(), exclude=()) -> tuple[str, str]:
    options = [
        (s, c)
        for s in SHAPES
        for c in COLOURS
        if s not in exclude_shapes and c not in exclude_colours and (s, c) not in exclude
    ]
    return rng.choice(options)


def make_sample(rng: random.Random, qtype: str, max_objects: int = MAX_OBJECTS) -> Sample:
    """Build a scene and a question of type ``qtype`` with one unambiguous answer.

    ``max_objects`` bounds the scene size (the training curriculum starts small); distractors are chosen so the
    question stays answerable (e.g. the asked-about shape appears once for a colour question).
    """
    n_distract = rng.randint(0, max_objects - 1)
    cells = [(r, c) for r in range(GRID) for c in range(GRID)]
    rng.shuffle(cells)
    if qtype == "colour":
        shape, colour = _random_kind(rng)
        kinds = [(shape, colour)] + [_random_kind(rng, exclude_shapes=(shape,)) for _ in range(n_distract)]
        question, answer = f"what colour is the {shape} ?", colour
        asked = lambda o: o.shape == shape
    elif qtype == "shape":
        shape, colour = _random_kind(rng)
        kinds = [(shape, colour)] + [_random_kind(rng, exclude_colours=(colour,)) for _ in range(n_distract)]
        question, answer = f"what shape is the {colour} object ?", shape
        asked = lambda o: o.colour == colour
    elif qtype == "count":
        shape = rng.choice(SHAPES)
        n = rng.randrange(len(COUNT_WORDS))
        n_distract = min(n_distract, max(0, max_objects - n))
        kinds = [(shape, rng.choice(list(COLOURS))) for _ in range(n)]
        kinds += [_random_kind(rng, exclude_shapes=(shape,)) for _ in range(n_distract)]
        question, answer = f"how many {shape}s are there ?", COUNT_WORDS[n]
        asked = lambda o: o.shape == shape
    elif qtype == "exists":
        target = _random_kind(rng)
        present = rng.random() < 0.5
        # Distractors are any other kind, so many share the target's colour or shape (near misses).
        kinds = [target] if present else []
        kinds += [_random_kind(rng, exclude=(target,)) for _ in range(n_distract + (0 if present else 1))]
        question, answer = f"is there a {target[1]} {target[0]} ?", "yes" if present else "no"
        asked = lambda o: (o.shape, o.colour) == target
    elif qtype == "position":
        region = rng.choice(REGIONS)
        inside = set(_region_cells(region))
        shape, colour = _random_kind(rng)
        cells = [c for c in cells if c in inside][:1] + [c for c in cells if c not in inside]
        kinds = [(shape, colour)] + [_random_kind(rng) for _ in range(min(n_distract, 3))]
        question, answer = f"what shape is in the {region} half ?", shape
        asked = lambda o: (o.box[1] // CELL, o.box[0] // CELL) in inside
    else:
        raise ValueError(f"unknown question type {qtype!r}; expected one of {QUESTION_TYPES}")
    objs = _place(kinds, cells)
    order = list(range(len(objs)))
    rng.shuffle(order)
    objs = [objs[i] for i in order]
    return Sample(_draw(objs), question, answer, qtype, tuple(objs), tuple(asked(o) for o in objs))


def make_split(seed: int, n: int, max_objects: int = MAX_OBJECTS) -> list[Sample]:
    """``n`` samples, question types in round-robin order, fully determined by ``seed``.

    Training uses seeds >= ``TRAIN_SEED_BASE``, one per step; the held-out splits use ``TEST_SEED`` (benchmark,
    README figures) and ``VALIDATION_SEED`` (checkpoint selection), so the splits never share a random stream.
    """
    rng = random.Random(seed)
    return [make_sample(rng, QUESTION_TYPES[i % len(QUESTION_TYPES)], max_objects) for i in range(n)]


def object_patch_mask(
    sample: Sample, patch_size: int = CELL, image_size: int = IMAGE_SIZE, relevant_only: bool = False
) -> list[bool]:
    """Row-major flags over the ``(image_size // patch_size)**2`` patch grid: True where a patch overlaps an object.

    This is the "oracle" selection: the visual tokens that can possibly carry the answer. With ``relevant_only``
    only the objects the question asks about count.
    """
    side = image_size // patch_size
    flags = [False] * (side * side)
    for o, asked in zip(sample.objects, sample.relevant):
        if relevant_only and not asked:
            continue
        for index in box_patches(o.box, patch_size, image_size):
            flags[index] = True
    return flags


def box_patches(box: tuple[int, int, int, int], patch_size: int = CELL, image_size: int = IMAGE_SIZE) -> list[int]:
    """Row-major indices of the patches a pixel box (x0, y0, x1, y1; x1/y1 exclusive) overlaps."""
    side = image_size // patch_size
    x0, y0, x1, y1 = box
    return [
        row * side + col
        for row in range(y0 // patch_size, (y1 - 1) // patch_size + 1)
        for col in range(x0 // patch_size, (x1 - 1) // patch_size + 1)
    ]


def to_record(sample: Sample) -> dict:
    """A JSON-ready form of ``sample`` (the image as base64 PNG), e.g. for an lmms-eval task's data file."""
    png = io.BytesIO()
    sample.image.save(png, format="PNG")
    shapes = [o for o in sample.objects if isinstance(o, Obj)]
    assert len(shapes) == len(sample.objects), "records hold shapes scenes (the digits task stores its questions)"
    return {
        "question": sample.question,
        "answer": sample.answer,
        "qtype": sample.qtype,
        "image": base64.b64encode(png.getvalue()).decode("ascii"),
        "objects": [{"shape": o.shape, "colour": o.colour, "box": list(o.box)} for o in shapes],
        "relevant": list(sample.relevant),
    }


def from_record(record: dict) -> Sample:
    """Inverse of :func:`to_record`."""
    image = Image.open(io.BytesIO(base64.b64decode(record["image"]))).convert("RGB")
    objects = tuple(Obj(o["shape"], o["colour"], tuple(o["box"])) for o in record["objects"])
    return Sample(image, record["question"], record["answer"], record["qtype"], objects, tuple(record["relevant"]))
