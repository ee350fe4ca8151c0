"""lmms-eval hooks for ``vtprune_shapes``: the toy VLM's held-out questions (vtprune.toyvlm.data).

The data file is ``make_split(TEST_SEED, 300)`` written with ``to_record`` (see ``make_data.py``);
a test checks that it still equals a fresh generation.
"""

from __future__ import annotations

from PIL import Image

from vtprune.toyvlm.data import QUESTION_TYPES, from_record


def doc_to_visual(doc: dict) -> list[Image.Image]:
    return [from_record(doc).image]


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


colour_accuracy = _accuracy_of("colour")
shape_accuracy = _accuracy_of("shape")
count_accuracy = _accuracy_of("count")
exists_accuracy = _accuracy_of("exists")
position_accuracy = _accuracy_of("position")
