"""What the Qwen-VL pruning classes (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) share: counts, rows and M-RoPE positions.

Counts: the front-end writes the schedule's count of image placeholders per image (from ``image_grid_thw``).
Rows: each image's vision-tower output is reduced to that count; Qwen3-VL's rows carry its deepstack features
after the projected tokens, so the selection reads the projected part and the deepstack features of the kept
tokens go with them (merges weigh them alike), as on vtprune's transformers path.
Positions: kept tokens keep their original M-RoPE positions (t, h, w of their grid cell), and the text after an
image continues from the unpruned numbering. vLLM computes M-RoPE positions per request before the encoder runs
(``get_mrope_input_positions``, when the model runner first takes the request), and the path meant to redo them
after pruning (``SupportsMultiModalPruning.recompute_mrope_positions``) is never enabled by vLLM's CPU model runner
(``CPUModelRunner.load_model`` skips what ``GPUModelRunner.load_model`` sets). So these classes select when the
positions are computed: an image whose kept set is not remembered yet is encoded there, selected and reduced; its
kept set is remembered per (schedule, image, question) and its reduced rows (kept rows only, deepstack slices
included) are held (:class:`~vtprune.vllm.plan.PrunedRows`) until ``embed_multimodal`` takes them, so a new image
passes the vision tower once and its positions and rows come from one selection. ``embed_multimodal`` encodes, in
one pass, only the images it holds no rows for: unpruned ones, and pruned ones whose positions came from a
remembered kept set (an image seen before, whose encoder output vLLM no longer holds, or a preempted request's
image encoded again) or whose rows were dropped before it ran; their rows are the remembered kept set's. The rows
held are at most as many as vLLM's encoder cache holds embeddings (``encoder_cache_size``; besides the newest
image), oldest image dropped first: a request that never reaches its embedding step (aborted first) leaves its rows
until newer images push them out. The positions themselves are the stock model's own for the unpruned prompt, with
the dropped tokens' columns removed. Videos pass unpruned (vLLM's own EVS prunes video).
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

from .plan import (
    QUESTION_KEY,
    SCHEDULE_KEY,
    ImageItem,
    PrunedRows,
    Remembered,
    SelectionKey,
    UnsupportedScheduleError,
    decode_schedule,
    make_plan,
)
from .pruning import PruningModel, ScheduleFieldProcessor, per_item, questions_of, schedules_of

_IMAGE_KEYS = ("pixel_values", "image_embeds")
_VIDEO_KEYS = ("pixel_values_videos", "video_embeds")
#: The embedding step's kwargs that describe images (the pruning class encodes these itself; the rest go to vLLM's).
_IMAGE_FIELDS = (*_IMAGE_KEYS, "image_grid_thw", SCHEDULE_KEY, QUESTION_KEY)
#: Kept tokens (summed over images) whose kept sets are remembered for their positions after a prefix-cache hit.
#: A cached pruned image holds a KV slot per kept token, so this many (64 MB of int32 when full) is more than the KV
#: cache of one engine holds: an image still in the prefix cache is never forgotten.
POSITIONED_TOKENS = 1 << 24


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
        #: Images reduced when their positions were computed, until their embedding step takes them: at most as many
        #: rows as vLLM's encoder cache holds embeddings.
        self.vtprune_pruned_rows = PrunedRows(vllm_config.scheduler_config.encoder_cache_size)
        #: The kept set each pruned image's positions followed, by vLLM's identifier of the item: what positions
        #: are computed from when the prefix cache covers the image and vLLM strips its data (``_kept_of``).
        self.vtprune_positioned: Remembered[str, np.ndarray] = Remembered(POSITIONED_TOKENS, size=len)

    @property
    def _merge(self) -> int:
        return self.config.vision_config.spatial_merge_size

    def _vtprune_projector(self) -> tuple[nn.Module | None, int]:
        visual = getattr(self, "visual", None)
        return getattr(visual, "merger", None), self._merge**2  # the merger reads each merge x merge block as one token

    def embed_multimodal(self, **kwargs: Any) -> tuple[Tensor, ...]:
        schedules = schedules_of(kwargs)
        if schedules is None:
            return tuple(super().embed_multimodal(**kwargs) or ())
        images = self._vtprune_embedded_rows(_images_of(kwargs, schedules, self._merge))
        videos = {key: value for key, value in kwargs.items() if key not in _IMAGE_FIELDS}
        others = tuple(super().embed_multimodal(**videos) or ())  # none unless the batch mixes modalities
        # The parent returns each modality's items in the order the modalities' keys came in.
        first = next(key for key in kwargs if key in _IMAGE_KEYS + _VIDEO_KEYS)
        return images + others if first in _IMAGE_KEYS else others + images

    def _vtprune_embedded_rows(self, images: Sequence[_Image]) -> tuple[Tensor, ...]:
        """Each image's rows for the embedding step: those reduced when its positions were computed, else (not held:
        an unpruned image, or one dropped or never reduced there) from one vision-tower pass for all such images."""
        rows: list[Tensor | None] = []
        taken: dict[SelectionKey, Tensor | None] = {}  # an image twice in this batch is taken once
        for image in images:
            if image.schedule and image.key not in taken:
                taken[image.key] = self.vtprune_pruned_rows.take(image.key)
            rows.append(taken[image.key] if image.schedule else None)
        missing = [index for index, held in enumerate(rows) if held is None]
        if missing:
            for index, reduced in zip(missing, self._vtprune_reduced([images[i] for i in missing]), strict=True):
                rows[index] = reduced
        return tuple(cast(list[Tensor], rows))  # none left None

    def _vtprune_reduced(self, images: Sequence[_Image]) -> tuple[Tensor, ...]:
        """Each image's projected tokens from one vision-tower pass, reduced to its schedule's count (all of them
        without a schedule); the kept sets are remembered (``vtprune_selections``)."""
        schedules = [image.schedule for image in images]
        kind = images[0].kind
        batch = {
            "type": kind,
            kind: torch.cat([image.source for image in images]).to(self.visual.device),
            "image_grid_thw": torch.stack([image.grid_thw for image in images]),
        }
        grids = [merged_grid(image.grid_thw.tolist(), self._merge) for image in images]
        with self._vtprune_encoding(schedules):
            return self._vtprune_prune(self._process_image_input(batch), images, grids)

    def get_mrope_input_positions(
        self, input_tokens: list[int], mm_features: list[MultiModalFeatureSpec]
    ) -> tuple[Tensor, int]:
        features = sorted(mm_features, key=lambda f: f.mm_position.offset)
        kept_sets = [self._kept_of(feature) for feature in features]
        if all(kept is None for kept in kept_sets):
            return super().get_mrope_input_positions(input_tokens, mm_features)
        # The unpruned prompt (each pruned image's placeholder run restored to its full length) and, per token
        # of the pruned prompt, the column of the unpruned prompt it stands for.
        tokens = list(input_tokens)
        restored: list[MultiModalFeatureSpec] = []
        columns: list[np.ndarray] = []
        shift = 0  # tokens restored so far
        previous = 0  # first unpruned column not yet taken
        for feature, kept in zip(features, kept_sets, strict=True):
            place = feature.mm_position
            offset = place.offset + shift
            if kept is None:
                restored.append(dataclasses.replace(feature, mm_position=dataclasses.replace(place, offset=offset)))
                continue
            count = self._unpruned_count(feature)
            tokens[offset : offset + place.length] = tokens[offset : offset + 1] * count
            columns += [np.arange(previous, offset), offset + kept]
            previous = offset + count
            shift += count - place.length
            restored.append(dataclasses.replace(feature, mm_position=PlaceholderRange(offset=offset, length=count)))
        columns.append(np.arange(previous, len(tokens)))
        positions, delta = super().get_mrope_input_positions(tokens, restored)
        # Decode steps are numbered len(prompt) + delta: they continue the unpruned numbering too.
        return positions[:, torch.from_numpy(np.concatenate(columns))], delta + shift

    def _unpruned_count(self, feature: MultiModalFeatureSpec) -> int:
        """An image's projected tokens unpruned (from its grid, which vLLM keeps with every image item)."""
        assert feature.data is not None  # an image item of a model with M-RoPE keeps its grid
        return int(np.prod(merged_grid(feature.data["image_grid_thw"].data.tolist(), self._merge)))

    def _kept_of(self, feature: MultiModalFeatureSpec) -> np.ndarray | None:
        """The kept token indices a pruned image's positions follow (None: not pruned, or not an image).

        An image the prefix cache covers reaches this step stripped: vLLM keeps only the fields positions are
        computed from on the CPU (the grid), not the pixels, schedule or question. Its placeholder run, shorter
        than the grid's count, says it was pruned; its kept set is the one its positions followed before, found by
        vLLM's identifier of the item (a hash of the image with the processor kwargs, which carry the schedule
        and the question: the same identifier, the same kept set). If that was forgotten, nothing can recompute
        it: an error, never positions of another layout."""
        schedule = _schedule_of(feature)
        if schedule:
            kept = self._kept_for_positions(feature, schedule).numpy()
            self.vtprune_positioned.put(feature.identifier, kept.astype(np.int32))
            return kept
        if feature.modality != "image" or feature.mm_position.length == self._unpruned_count(feature):
            return None
        remembered = self.vtprune_positioned.get(feature.identifier)
        if remembered is None:  # raised where vLLM computes positions, it stops the engine: it must not happen
            raise UnsupportedScheduleError(
                f"a pruned image of this request is in vLLM's prefix cache, but the kept set its positions follow "
                f"was forgotten (vtprune remembers {self.vtprune_positioned.capacity} kept tokens, more than one "
                "engine's KV cache holds; a KV cache shared across engines can exceed it): serve with prefix caching "
                "off (enable_prefix_caching=False, --no-enable-prefix-caching)"
            )
        return remembered.astype(np.int64)

    @torch.inference_mode()
    def _kept_for_positions(self, feature: MultiModalFeatureSpec, schedule: str) -> Tensor:
        """The kept (or merged-into) token indices of one image, for its positions: a held image's (reduced for
        its embedding step, not taken yet), else the remembered selection's, else selected now, and the image's
        reduced rows held for its embedding step, so that it passes the vision tower once."""
        data = feature.data
        kind = "pixel_values" if "pixel_values" in data else "image_embeds"
        image = _Image(
            schedule, data[kind].data, data[QUESTION_KEY].data, data["image_grid_thw"].data.to(torch.int64), kind
        )
        kept = self.vtprune_pruned_rows.kept_set(image.key)
        if kept is None:
            chosen = self.vtprune_selections.get(image.key)
            if chosen is None:
                (rows,) = self._vtprune_reduced([image])
                chosen = self.vtprune_selections.get(image.key)
                assert chosen is not None, "_vtprune_reduced remembers the selection it makes"
                self.vtprune_pruned_rows.put(image.key, (chosen[0], rows))
            kept = chosen[0]
        return kept.cpu()


@dataclasses.dataclass(frozen=True)
class _Image(ImageItem):
    """One image as the pruning class encodes it (its key digests its patch grid too)."""

    grid_thw: Tensor
    kind: str
    """What ``source`` holds: "pixel_values" (its patches) or "image_embeds" (precomputed projected tokens)."""


def _images_of(kwargs: Mapping[str, Any], schedules: Sequence[str], merge: int) -> list[_Image]:
    """The images of the embedding step's kwargs, one per schedule."""
    kind = "pixel_values" if kwargs.get("pixel_values") is not None else "image_embeds"
    grids = list(kwargs["image_grid_thw"])
    # Patches per image; precomputed embeddings have one row per projected token.
    sizes = [int(grid.prod()) // (1 if kind == "pixel_values" else merge**2) for grid in grids]
    sources = cast(list[Tensor], per_item(kwargs[kind], sizes))  # not None
    questions = questions_of(kwargs, len(grids))
    return [
        _Image(schedule, source, question, grid.to(torch.int64), kind)
        for source, grid, schedule, question in zip(sources, grids, schedules, questions, strict=True)
    ]


def _schedule_of(feature: MultiModalFeatureSpec) -> str:
    """The schedule an item carries ("" for none: videos, unpruned images)."""
    if feature.modality != "image" or feature.data is None or SCHEDULE_KEY not in feature.data:
        return ""
    return decode_schedule(feature.data[SCHEDULE_KEY].data)
