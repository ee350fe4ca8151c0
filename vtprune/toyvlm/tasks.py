"""The toy VLMs' tasks, by name: what the trainer, the benchmark and the lmms-eval tasks need to know of each."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from vtprune.toyvlm import data, digits


@dataclass(frozen=True)
class Task:
    """One synthetic visual QA task: its question types, generator, vocabulary and dense training target."""

    name: str
    question_types: tuple[str, ...]
    max_objects: int
    make_split: Callable[..., list[data.Sample]]
    """``make_split(seed, n, max_objects=...)``: ``n`` samples fully determined by ``seed``."""
    vocabulary: Callable[[], list[str]]
    object_word: Callable[[data.Sample, object], str]
    """What the image tokens of an object the question asks about must say (the trainer's per-token target)."""
    chance: dict[str, float]
    """Accuracy per question type of a model that does not see the image (answers are balanced)."""
    reads_objects: bool = False
    """Whether ``object_word`` names an object whatever the question (the digit itself), so the trainer can also
    teach reading on its own, question-independently (``train._reading_loss``)."""

    @property
    def overall_chance(self) -> float:
        """Chance accuracy over a split (question types come in equal shares)."""
        return sum(self.chance.values()) / len(self.chance)


def _shapes_object_word(sample: data.Sample, obj: object) -> str:
    # Its share of the answer: the colour or shape asked for, "yes" for a counted or searched-for object.
    return "yes" if sample.qtype in ("count", "exists") else sample.answer


def _digits_object_word(sample: data.Sample, obj: object) -> str:
    # The digit itself: the answer is computed from the digits the question asks about.
    assert isinstance(obj, digits.Digit), "a digits scene holds digits"
    return str(obj.digit)


TASKS: dict[str, Task] = {
    "shapes": Task(
        "shapes",
        data.QUESTION_TYPES,
        data.MAX_OBJECTS,
        data.make_split,
        data.vocabulary,
        _shapes_object_word,
        {
            "colour": 1 / len(data.COLOURS),
            "shape": 1 / len(data.SHAPES),
            "count": 1 / len(data.COUNT_WORDS),
            "exists": 1 / 2,
            "position": 1 / len(data.SHAPES),
        },
    ),
    "digits": Task(
        "digits",
        digits.QUESTION_TYPES,
        digits.MAX_OBJECTS,
        digits.make_split,
        digits.vocabulary,
        _digits_object_word,
        {"position": 1 / 10, "largest": 1 / 10, "count": 1 / (digits.MAX_COUNT + 1), "exists": 1 / 2, "compare": 1 / 2},
        reads_objects=True,
    ),
}
