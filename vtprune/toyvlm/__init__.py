"""Toy VLMs trained from scratch on synthetic shapes QA: the offline demo model and accuracy benchmark.

``load_toy_model()`` returns the shipped LLaVA (a real ``LlavaForConditionalGeneration`` + ``LlavaProcessor``),
``load_toy_model(QWEN2_VL_PATH)`` the shipped Qwen2-VL (``Qwen2VLForConditionalGeneration`` + ``Qwen2VLProcessor``);
``make_split`` generates held-out questions; ``answer`` and ``evaluate`` run them. See ``train`` for the recipe.
"""

from vtprune.toyvlm.data import QUESTION_TYPES, Obj, Sample, make_split, object_patch_mask
from vtprune.toyvlm.model import DEFAULT_PATH, QWEN2_VL_PATH, answer, build_prompt, evaluate, load_toy_model

__all__ = [
    "DEFAULT_PATH",
    "QUESTION_TYPES",
    "QWEN2_VL_PATH",
    "Obj",
    "Sample",
    "answer",
    "build_prompt",
    "evaluate",
    "load_toy_model",
    "make_split",
    "object_patch_mask",
]
