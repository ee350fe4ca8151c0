"""vLLM's Qwen2.5-VL with vtprune's input-stage pruning: ``VTPruneQwen2_5_VLForConditionalGeneration`` (see
:mod:`vtprune.vllm.qwen` for counts, rows and positions)."""

from __future__ import annotations

from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from .qwen import QwenPruningModel, QwenScheduleProcessor


class VTPruneQwen2_5_VLMultiModalProcessor(QwenScheduleProcessor, Qwen2_5_VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    VTPruneQwen2_5_VLMultiModalProcessor, info=Qwen2_5_VLProcessingInfo, dummy_inputs=Qwen2_5_VLDummyInputsBuilder
)
class VTPruneQwen2_5_VLForConditionalGeneration(QwenPruningModel, Qwen2_5_VLForConditionalGeneration):
    pass
