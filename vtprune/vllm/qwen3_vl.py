"""vLLM's Qwen3-VL with vtprune's input-stage pruning: ``VTPruneQwen3VLForConditionalGeneration`` (see
:mod:`vtprune.vllm.qwen` for counts, rows and positions).

vLLM's Qwen3-VL vision tower returns each token's projected features followed by its deepstack features (one
slice per deepstack level), and the language model adds those to the hidden states of the image's positions in
its first layers. The selection reads the projected slice only, as vtprune's transformers path does; the rows it
keeps carry their deepstack slices with them.
"""

from __future__ import annotations

from torch import Tensor
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from .qwen import QwenPruningModel, QwenScheduleProcessor


class VTPruneQwen3VLMultiModalProcessor(QwenScheduleProcessor, Qwen3VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    VTPruneQwen3VLMultiModalProcessor, info=Qwen3VLProcessingInfo, dummy_inputs=Qwen3VLDummyInputsBuilder
)
class VTPruneQwen3VLForConditionalGeneration(QwenPruningModel, Qwen3VLForConditionalGeneration):
    def _vtprune_selection_features(self, rows: Tensor) -> Tensor:
        return rows[:, : self.visual_dim]
