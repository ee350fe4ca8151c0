"""What the Qwen-VL pruning classes (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) share: counts, rows and M-RoPE positions.

Counts: the front-end writes the schedule's count of image placeholders per image (from ``image_grid_thw``).
Rows: each image's vision-tower output is reduced to that count; Qwen3-VL's rows carry its deepstack features
after the projected tokens, so the selection reads the projected part and the deepstack features of the kept
tokens go with them (merges weigh them alike), as on vtprune's transformers path.
Positions: kept tokens keep their original M-RoPE positions (t, h, w of their grid cell), and the text after an
image continues from the unpruned numbering. vLLM computes M-RoPE positions per request before the encoder runs
(``get_mrope_input_positions``), and the path meant to redo them after pruning
(``SupportsMultiModalPruning.recompute_mrope_positions``) is never enabled by vLLM's CPU model runner
(``CPUModelRunner.load_model`` skips what ``GPUModelRunner.load_model`` sets). So these classes select when the
positions are computed: each image is encoded there, selected, and its kept set remembered per (schedule, image);
``embed_multimodal`` then reuses it, so positions and rows always agree. The positions themselves are the stock
model's own for the unpruned prompt, with the dropped tokens' columns removed. The cost is a second
vision-encoder pass per new image. Videos pass unpruned (vLLM's own EVS prunes video).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn
from vllm.config import VllmConfig
from vllm.multimodal.inputs import MultiModalFeatureSpec, MultiModalKwargsItems, PlaceholderRange
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate

from ..vocabulary.grids import Grid
from .plan import QUESTION_KEY, SCHEDULE_KEY, UnsupportedScheduleError, decode_schedule, make_plan
from .pruning import PruningModel, ScheduleFieldProcessor, per_item, questions_of, schedules_of

_IMAGE_KEYS = ("pixel_values", "image_embeds")
_VIDEO_KEYS = ("pixel_values_videos", "video_embeds")


def merged_grid(grid_thw: Sequence[int], merge: int) -> tuple[int, int, int]:
    """(t, h, w) of an item's projected tokens: the patch grid after the spatial merge."""
    t, h, w = (int(x) for x in grid_thw)
    return t, h // merge, w // merge


class QwenScheduleProcessor(ScheduleFieldProcessor):
    """Mixin for a Qwen-VL multimodal processor: an image's placeholder run shortened to the schedule's count."""

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

        def shortened(update: PromptUpdate) -> PromptUpdate:
            def replacement(item_idx: int) -> list[int]:
                full = update.replacement(item_idx)  # the stock run: one placeholder id per projected token
                grid = merged_grid(out_mm_kwargs["image"][item_idx]["image_grid_thw"].data.tolist(), merge)
                return full[:1] * plan.tokens(len(full), grid)

            return PromptReplacement(modality="image", target=update.target, replacement=replacement)

        return [shortened(update) if update.modality == "image" else update for update in updates]


class QwenPruningModel(PruningModel):
    """Mixin for a vLLM Qwen-VL model class (put it first in the bases)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        if getattr(self, "is_multimodal_pruning_enabled", False):
            raise UnsupportedScheduleError(
                "vtprune's Qwen-VL classes do not combine with vLLM's own multimodal pruning (video_pruning_rate, "
                "EVS): it re-positions tokens through recompute_mrope_positions, which vtprune's positions replace; "
                "leave video_pruning_rate unset"
            )

    @property
    def _merge(self) -> int:
        return self.config.vision_config.spatial_merge_size

    def _vtprune_projector(self) -> tuple[nn.Module | None, int]:
        visual = getattr(self, "visual", None)
        return getattr(visual, "merger", None), self._merge**2  # the merger reads each merge x merge block as one token

    def embed_multimodal(self, **kwargs: Any) -> tuple[Tensor, ...]:
        schedules = schedules_of(kwargs)
        with self._vtprune_encoding(schedules or ()):
            embeddings = tuple(super().embed_multimodal(**kwargs) or ())
            if schedules is None or not embeddings:
                return embeddings
            grids = [merged_grid(g, self._merge) for g in kwargs["image_grid_thw"]]  # one (t, h, w) per image
            count = len(grids)
            # The parent returns each modality's items in the order the modalities' keys came in.
            first = next(key for key in kwargs if key in _IMAGE_KEYS + _VIDEO_KEYS)
            images = slice(0, count) if first in _IMAGE_KEYS else slice(len(embeddings) - count, len(embeddings))
            pixels = kwargs.get("pixel_values")
            sizes = [int(np.prod(g)) * self._merge**2 for g in grids]
            sources = embeddings[images] if pixels is None else cast(list[Tensor], per_item(pixels, sizes))  # not None
            questions = questions_of(kwargs, count)
            pruned = self._vtprune_prune(embeddings[images], schedules, sources, questions, grids)
            return embeddings[: images.start] + pruned + embeddings[images.stop :]

    def get_mrope_input_positions(
        self, input_tokens: list[int], mm_features: list[MultiModalFeatureSpec]
    ) -> tuple[Tensor, int]:
        if not any(_schedule_of(f) for f in mm_features):
            return super().get_mrope_input_positions(input_tokens, mm_features)
        # The unpruned prompt (each pruned image's placeholder run restored to its full length) and, per token
        # of the pruned prompt, the column of the unpruned prompt it stands for.
        tokens = list(input_tokens)
        restored: list[MultiModalFeatureSpec] = []
        columns: list[np.ndarray] = []
        shift = 0  # tokens restored so far
        previous = 0  # first unpruned column not yet taken
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            place = feature.mm_position
            offset = place.offset + shift
            schedule = _schedule_of(feature)
            if not schedule:
                restored.append(dataclasses.replace(feature, mm_position=dataclasses.replace(place, offset=offset)))
                continue
            grid = merged_grid(feature.data["image_grid_thw"].data.tolist(), self._merge)
            count = int(np.prod(grid))
            kept = self._kept_for_positions(feature, schedule, grid).numpy()
            tokens[offset : offset + place.length] = tokens[offset : offset + 1] * count
            columns += [np.arange(previous, offset), offset + kept]
            previous = offset + count
            shift += count - place.length
            restored.append(dataclasses.replace(feature, mm_position=PlaceholderRange(offset=offset, length=count)))
        columns.append(np.arange(previous, len(tokens)))
        positions, delta = super().get_mrope_input_positions(tokens, restored)
        # Decode steps are numbered len(prompt) + delta: they continue the unpruned numbering too.
        return positions[:, torch.from_numpy(np.concatenate(columns))], delta + shift

    @torch.inference_mode()
    def _kept_for_positions(self, feature: MultiModalFeatureSpec, schedule: str, grid: Grid) -> Tensor:
        """The kept (or merged-into) token indices of one image, selected now and remembered for its embedding."""
        data = feature.data
        grid_thw = data["image_grid_thw"].data.to(torch.int64)[None]
        if "pixel_values" in data:
            source = data["pixel_values"].data
            image = {"type": "pixel_values", "pixel_values": source.to(self.visual.device), "image_grid_thw": grid_thw}
        else:
            source = data["image_embeds"].data
            image = {"type": "image_embeds", "image_embeds": source, "image_grid_thw": grid_thw}
        with self._vtprune_encoding([schedule]):
            (tokens,) = self._process_image_input(image)
            kept, _ = self._vtprune_choose(schedule, tokens, grid, source, data[QUESTION_KEY].data)
        return kept.cpu()


def _schedule_of(feature: MultiModalFeatureSpec) -> str:
    """The schedule an item carries ("" for none: videos, unpruned images)."""
    if feature.modality != "image" or feature.data is None or SCHEDULE_KEY not in feature.data:
        return ""
    return decode_schedule(feature.data[SCHEDULE_KEY].data)
