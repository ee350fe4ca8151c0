"""vLLM's LLaVA-1.5 with vtprune's input-stage pruning: ``VTPruneLlavaForConditionalGeneration``.

The front-end writes the schedule's count of placeholders per image instead of N; ``embed_multimodal``
projects the image as stock vLLM does, then keeps (or merges into) exactly that many rows with vtprune's
selection. Kept tokens sit in consecutive placeholder slots, so vLLM numbers them contiguously, as vtprune's
transformers path does with ``renumber=True``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

import torch
from vllm.model_executor.models.clip import CLIPVisionModel
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalKwargsItems
from vllm.multimodal.parse import ImageProcessorItems, MultiModalDataItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate

from ..engine.attention import cls_attention_of
from ..errors import UnsupportedModelError
from .plan import ImageItem, UnsupportedScheduleError, cls_refusal, make_plan, square_grid
from .pruning import PruningModel, ScheduleFieldProcessor, questions_of, schedules_of


class VTPruneLlavaMultiModalProcessor(ScheduleFieldProcessor, LlavaMultiModalProcessor):
    def _vtprune_schedule(self, processor_kwargs: Mapping[str, object]) -> str | None:
        schedule = super()._vtprune_schedule(processor_kwargs)
        refusal = cls_refusal(self.info.get_hf_config())
        if schedule and refusal is not None and make_plan(schedule).reads("cls_attention"):
            # Here, per request, as the other refused schedules: the engine goes on serving the rest.
            raise UnsupportedModelError(f"{schedule!r} reads the vision tower's [CLS] attention: {refusal}")
        return schedule

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        schedule = self._vtprune_schedule(hf_processor_mm_kwargs)
        if schedule is None:
            return super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        image_token_id = self.info.get_hf_config().image_token_index
        plan = make_plan(schedule)

        def replacement(item_idx: int) -> list[int]:
            size = mm_items.get_items("image", ImageProcessorItems).get_image_size(item_idx)
            num_tokens = self.info.get_num_image_tokens(image_width=size.width, image_height=size.height)
            return [image_token_id] * plan.tokens(num_tokens, square_grid(num_tokens))

        return [PromptReplacement(modality="image", target=[image_token_id], replacement=replacement)]


@MULTIMODAL_REGISTRY.register_processor(
    VTPruneLlavaMultiModalProcessor, info=LlavaProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class VTPruneLlavaForConditionalGeneration(PruningModel, LlavaForConditionalGeneration):
    def _vtprune_projector(self) -> tuple[torch.nn.Module | None, int]:
        return getattr(self, "multi_modal_projector", None), 1

    def _vtprune_cls_layer(self) -> torch.nn.Module | None:
        # As vtprune's LLaVA adapter: the CLIP layer whose output the projector reads. vLLM builds the tower only up
        # to that layer (num_hidden_layers_override), counted from either end, so it is the last one built; none is
        # built when the projector reads the patch embeddings. No tower: the engine takes no images. SigLIP and
        # Pixtral towers have no [CLS]; the LLaVAs of cls_refusal never get here with a schedule that reads it.
        tower = getattr(self, "vision_tower", None)
        if not isinstance(tower, CLIPVisionModel) or cls_refusal(self.config) is not None:
            return None
        layers = tower.vision_model.encoder.layers
        return layers[-1].self_attn if len(layers) else None

    def _vtprune_cls_attention(self, attention: Any, hidden_states: torch.Tensor) -> torch.Tensor:
        # vLLM's CLIP attention fuses q, k and v into one projection, and its kernel returns no weights.
        if attention.num_heads_per_partition != attention.num_heads:
            raise UnsupportedScheduleError(
                "todre reads the CLIP tower's [CLS] attention, averaged over its heads, and tensor parallelism splits "
                "the heads across processes; run it with tensor_parallel_size=1"
            )
        qkv, _ = attention.qkv_proj(hidden_states)
        query, keys, _ = qkv.chunk(3, dim=-1)
        return cls_attention_of(query[:, :1], keys, attention.num_heads, attention.scale)

    def embed_multimodal(self, **kwargs: object) -> tuple[torch.Tensor, ...]:
        schedules = schedules_of(kwargs)
        pixels = cast("torch.Tensor | None", kwargs.get("pixel_values"))
        with self._vtprune_encoding(schedules or ()):
            embeddings = super().embed_multimodal(**kwargs)
            if len(embeddings) == 0:
                return embeddings
            # Seeds and keys come from the pixels (precomputed embeddings: from the embeddings themselves).
            sources: Sequence[torch.Tensor] = embeddings if pixels is None else list(pixels)
            grids = [square_grid(features.shape[0]) for features in embeddings]
            questions = questions_of(kwargs, len(embeddings))
            images = None
            if schedules is not None:
                images = [
                    ImageItem(schedule, source, question, None)
                    for schedule, source, question in zip(schedules, sources, questions, strict=True)
                ]
            return self._vtprune_prune(embeddings, images, grids)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # transformers 5 saves a LLaVA's CLIP tower without its ``vision_model.`` level (the shipped toy
        # does); vLLM's CLIP module has it. Real llava-hf checkpoints already have it and pass unchanged.
        return super().load_weights((_with_vision_model_level(name), tensor) for name, tensor in weights)


def _with_vision_model_level(name: str) -> str:
    for prefix in ("vision_tower.", "model.vision_tower."):
        if name.startswith(prefix) and not name.startswith(prefix + "vision_model."):
            return prefix + "vision_model." + name[len(prefix) :]
    return name
