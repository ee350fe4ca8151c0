"""A toy LLaVA trained from scratch on synthetic shapes QA: the offline demo model and accuracy benchmark.

``load_toy_model()`` returns the shipped checkpoint (a real ``LlavaForConditionalGeneration`` + ``LlavaProcessor``);
``make_split`` generates held-out questions; ``answer`` and ``evaluate`` run it. See ``train`` for the recipe.
"""

from vtprune.toyvlm.data import QUESTION_TYPES, Obj, Sample, make_split, object_patch_mask
from vtprune.toyvlm.model import DEFAULT_PATH, answer, build_prompt, evaluate, load_toy_model

__all__ = [
    "DEFAULT_PATH",
    "QUESTION_TYPES",
    "Obj",
    "Sample",
    "answer",
    "build_prompt",
    "evaluate",
    "load_toy_model",
    "make_split",
    "object_patch_mask",
]
