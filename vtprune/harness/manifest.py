"""The lmms-eval entry point (group ``lmms_eval.models``): registers ``--model vtprune`` and
``--model vtprune_vllm``.

Kept free of heavy imports: lmms-eval loads every entry point inside one try/except, and a failure
here would silently hide this model and every plugin after it.
"""

from __future__ import annotations

from lmms_eval.models.registry_v2 import ModelManifest


def manifest() -> ModelManifest:
    return ModelManifest(model_id="vtprune", simple_class_path="vtprune.harness.lmm.VTPruneLMM")


def vllm_manifest() -> ModelManifest:
    return ModelManifest(model_id="vtprune_vllm", simple_class_path="vtprune.harness.vllm_lmm.VTPruneVLLM")
