"""lmms-eval hooks for ``vtprune_digits``: the toy digits task's held-out questions (vtprune.toyvlm.digits).

The data file holds the questions of ``make_split(TEST_SEED, 300)`` with their index (see ``make_data.py``); the
images (44 KB each as PNG) are regenerated from the same seed, which the generator guarantees to reproduce. A test
checks that the file still equals a fresh generation.
"""

from __future__ import annotations

import functools

from PIL import Image

from vtprune.toyvlm.data import TEST_SEED, Sample
from vtprune.toyvlm.digits import QUESTION_TYPES, make_split

SAMPLES = 300


@functools.cache
def held_out_split() -> list[Sample]:
    return make_split(TEST_SEED, SAMPLES)


def doc_to_visual(doc: dict) -> list[Image.Image]:
    return [held_out_split()[doc["index"]].image]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    # The toy model's vocabulary is the task's own words: no instruction is added to the question.
    return doc["question"]


def process_results(doc: dict, results: list[str]) -> dict:
    hit = float(results[0].strip().lower() == doc["answer"])
    return {"accuracy": hit, **{qtype: {"qtype": doc["qtype"], "hit": hit} for qtype in QUESTION_TYPES}}


def _accuracy_of(qtype: str):
    def aggregate(items: list[dict]) -> float:
        hits = [item["hit"] for item in items if item["qtype"] == qtype]
        return sum(hits) / len(hits) if hits else float("nan")

    aggregate.__name__ = f"{qtype}_accuracy"
    return aggregate


position_accuracy = _accuracy_of("position")
largest_accuracy = _accuracy_of("largest")
count_accuracy = _accuracy_of("count")
exists_accuracy = _accuracy_of("exists")
compare_accuracy = _accuracy_of("compare")
