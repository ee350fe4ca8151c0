"""vLLM's Qwen2-VL with vtprune's input-stage pruning: ``VTPruneQwen2VLForConditionalGeneration``.

Counts: the front-end writes the schedule's count of ``<|image_pad|>`` per image (from ``image_grid_thw``).
Positions: kept tokens keep their original M-RoPE positions (t, h, w of their grid cell), and the text after
an image continues from the unpruned numbering, as on vtprune's transformers path. vLLM computes M-RoPE
positions per request before the encoder runs (``get_mrope_input_positions``), and the path meant to redo
them after pruning (``SupportsMultiModalPruning.recompute_mrope_positions``) is never enabled by vLLM's CPU
model runner (``CPUModelRunner.load_model`` skips what ``GPUModelRunner.load_model`` sets). So this class
selects when the positions are computed: it encodes each image there, selects, and remembers the kept set
per (schedule, image); ``embed_multimodal`` then reuses it, so positions and rows always agree. The cost is
a second vision-encoder pass per new image. Videos pass unpruned (vLLM's own EVS prunes video).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFeatureSpec, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate

from ..vocabulary.grids import Grid
from .plan import SCHEDULE_KEY, decode_schedule, image_key, make_plan
from .pruning import PruningModel, ScheduleFieldProcessor, per_item

_IMAGE_KEYS = ("pixel_values", "image_embeds")
_VIDEO_KEYS = ("pixel_values_videos", "video_embeds")


def merged_grid(grid_thw: Sequence[int], merge: int) -> tuple[int, int, int]:
    """(t, h, w) of an item's projected tokens: the patch grid after the spatial merge."""
    t, h, w = (int(x) for x in grid_thw)
    return t, h // merge, w // merge


class VTPruneQwen2VLMultiModalProcessor(ScheduleFieldProcessor, Qwen2VLMultiModalProcessor):
    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        schedule = self._vtprune_schedule(hf_processor_mm_kwargs)
        if schedule is None:
            return updates
        plan = make_plan(schedule)
        merge = self.info.get_hf_config().vision_config.spatial_merge_size
        image_token = self.info.get_tokenizer().get_vocab()[self.info.get_hf_processor().image_token]

        def replacement(item_idx: int) -> list[int]:
            grid = merged_grid(out_mm_kwargs["image"][item_idx]["image_grid_thw"].data.tolist(), merge)
            return [image_token] * plan.tokens(int(np.prod(grid)), grid)

        return [
            PromptReplacement(modality="image", target=[image_token], replacement=replacement)
            if update.modality == "image"
            else update
            for update in updates
        ]


@MULTIMODAL_REGISTRY.register_processor(
    VTPruneQwen2VLMultiModalProcessor, info=Qwen2VLProcessingInfo, dummy_inputs=Qwen2VLDummyInputsBuilder
)
class VTPruneQwen2VLForConditionalGeneration(PruningModel, Qwen2VLForConditionalGeneration):
    @property
    def _merge(self) -> int:
        return self.config.vision_config.spatial_merge_size

    def embed_multimodal(self, **kwargs: object) -> tuple[torch.Tensor, ...]:
        embeddings = tuple(super().embed_multimodal(**kwargs))
        schedules = per_item(kwargs.get(SCHEDULE_KEY))
        if schedules is None or not embeddings:
            return embeddings
        grids = [merged_grid(g, self._merge) for g in per_item(kwargs["image_grid_thw"])]
        count = len(grids)
        # The parent returns each modality's items in the order the modalities' keys came in.
        first = next(key for key in kwargs if key in _IMAGE_KEYS + _VIDEO_KEYS)
        images = slice(0, count) if first in _IMAGE_KEYS else slice(len(embeddings) - count, len(embeddings))
        pixels = kwargs.get("pixel_values")
        sizes = [int(np.prod(g)) * self._merge**2 for g in grids]
        sources = embeddings[images] if pixels is None else per_item(pixels, sizes)
        pruned = self._vtprune_prune(embeddings[images], schedules, sources, grids)
        return embeddings[: images.start] + pruned + embeddings[images.stop :]

    def get_mrope_input_positions(
        self, input_tokens: list[int], mm_features: list[MultiModalFeatureSpec]
    ) -> tuple[torch.Tensor, int]:
        if not any(_schedule_of(f) for f in mm_features):
            return super().get_mrope_input_positions(input_tokens, mm_features)
        pieces: list[np.ndarray] = []
        start = 0  # index in input_tokens where the current text run starts
        next_position = 0  # the unpruned numbering continues here
        features = sorted(mm_features, key=lambda f: f.mm_position.offset)
        grids = list(self.iter_mm_grid_thw(features))
        for feature, (offset, t, h, w, t_factor) in zip(features, grids, strict=True):
            text = offset - start
            pieces.append(np.broadcast_to(np.arange(text), (3, text)) + next_position)
            cells = np.indices((t, h, w))
            if t_factor != 1.0:
                cells[0] = (cells[0] * t_factor).astype(np.int64)
            cells = cells.reshape(3, -1) + text + next_position
            next_position = int(cells.max()) + 1
            schedule = _schedule_of(feature)
            if schedule:
                cells = cells[:, self._kept_for_positions(feature, schedule, (t, h, w)).numpy()]
            pieces.append(cells)
            start = offset + cells.shape[1]
        if start < len(input_tokens):
            text = len(input_tokens) - start
            pieces.append(np.broadcast_to(np.arange(text), (3, text)) + next_position)
            next_position += text
        positions = np.concatenate(pieces, axis=1)
        # Decode steps are numbered len(prompt) + delta: they continue the unpruned numbering too.
        return torch.from_numpy(positions), next_position - len(input_tokens)

    @torch.inference_mode()
    def _kept_for_positions(self, feature: MultiModalFeatureSpec, schedule: str, grid: Grid) -> torch.Tensor:
        """The kept (or merged-into) token indices of one image, selected now and remembered for its embedding."""
        data = feature.data
        if "pixel_values" in data:
            pixels = data["pixel_values"].data
            grid_thw = data["image_grid_thw"].data.to(torch.int64)
            visual = self.visual
            tokens = visual(pixels.to(visual.device, visual.dtype), grid_thw=grid_thw[None])
            source = pixels
        else:
            tokens = source = data["image_embeds"].data
        kept, _ = self._vtprune_choose(schedule, tokens, grid, image_key(source))
        return kept.cpu()


def _schedule_of(feature: MultiModalFeatureSpec) -> str:
    """The schedule an item carries ("" for none: videos, unpruned images)."""
    if feature.modality != "image" or feature.data is None or SCHEDULE_KEY not in feature.data:
        return ""
    return decode_schedule(feature.data[SCHEDULE_KEY].data)
