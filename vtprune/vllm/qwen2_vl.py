"""vLLM's Qwen2-VL with vtprune's input-stage pruning: ``VTPruneQwen2VLForConditionalGeneration`` (see
:mod:`vtprune.vllm.qwen` for counts, rows and positions)."""

from __future__ import annotations

from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from .qwen import QwenPruningModel, QwenScheduleProcessor


class VTPruneQwen2VLMultiModalProcessor(QwenScheduleProcessor, Qwen2VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    VTPruneQwen2VLMultiModalProcessor, info=Qwen2VLProcessingInfo, dummy_inputs=Qwen2VLDummyInputsBuilder
)
class VTPruneQwen2VLForConditionalGeneration(QwenPruningModel, Qwen2VLForConditionalGeneration):
    pass
