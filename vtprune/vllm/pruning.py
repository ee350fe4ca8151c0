"""The two halves every pruning model class shares: the front-end's schedule field and the model's selection.

Front-end (:class:`ScheduleFieldProcessor`): the request's schedule (``mm_processor_kwargs``) or the engine's
(``hf_overrides``) is checked, kept out of the Hugging Face processor call, and attached to each image as a
tensor field, so it travels with the pixels to the model process. Model (:class:`PruningModel`): each image's
projected tokens go through vtprune's selection and come back as exactly the budgeted number of rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import Tensor
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import MultiModalDataItems

from ..adapters.base import reduce_tokens
from ..vocabulary.grids import Grid
from .plan import SCHEDULE_KEY, Selections, decode_schedule, encode_schedule, image_key, make_plan, schedule_for

#: The mixins' own last base, typed Any: what they call on ``super()`` and ``self`` (``info``, the processor and model
#: methods they extend, ...) comes from the vLLM class each concrete class puts after them. ``object`` at run time.
VllmClass: Any = object


class ScheduleFieldProcessor(VllmClass):
    """Mixin for a ``BaseMultiModalProcessor`` subclass (put it first in the bases)."""

    def _vtprune_schedule(self, processor_kwargs: Mapping[str, object]) -> str | None:
        schedule = schedule_for(self.info.get_hf_config(), processor_kwargs)
        if schedule is not None:
            make_plan(schedule)  # an unsupported schedule fails this request here, before any model code
        return schedule

    def _apply_hf_processor_main(self, mm_items: MultiModalDataItems, hf_kwargs: Mapping[str, object]) -> BatchFeature:
        schedule = self._vtprune_schedule(hf_kwargs)
        rest = {key: value for key, value in hf_kwargs.items() if key != SCHEDULE_KEY}
        outputs = super()._apply_hf_processor_main(mm_items, rest)
        images = mm_items.get_count("image", strict=False)
        if images:
            # Every image carries the field ("" for none), so requests with and without a schedule batch together.
            outputs[SCHEDULE_KEY] = encode_schedule(schedule or "", images)
        return outputs

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        if SCHEDULE_KEY in hf_inputs:
            fields[SCHEDULE_KEY] = MultiModalFieldConfig.batched("image")
        return fields


class PruningModel(VllmClass):
    """Mixin for a vLLM multimodal model class: selection on projected tokens, remembered per (schedule, image)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.vtprune_selections = Selections()

    def _vtprune_selection_features(self, rows: Tensor) -> Tensor:
        """The part of an image's embedding rows the selection reads (all of it, unless a model appends more)."""
        return rows

    def _vtprune_choose(self, schedule: str, features: Tensor, grid: Grid, key: int) -> tuple[Tensor, Tensor | None]:
        """(kept indices, merging weights or None) of one image's embedding rows ``features``; the first selection
        for an image is reused."""
        chosen = self.vtprune_selections.get(schedule, key)
        if chosen is None:
            chosen = make_plan(schedule).select(self._vtprune_selection_features(features), grid, key)
            self.vtprune_selections.put(schedule, key, chosen)
        return chosen

    def _vtprune_prune(
        self,
        embeddings: Sequence[Tensor],
        schedules: Tensor | Sequence[Tensor] | None,
        sources: Iterable[Tensor],
        grids: Iterable[Grid],
    ) -> tuple[Tensor, ...]:
        """Each image's projected tokens reduced to its schedule's rows; ``sources`` (pixels) seed and key them."""
        if schedules is None:
            return tuple(embeddings)
        pruned = []
        for features, row, source, grid in zip(embeddings, schedules, sources, grids, strict=True):
            schedule = decode_schedule(row)
            if not schedule:
                pruned.append(features)
                continue
            kept, weights = self._vtprune_choose(schedule, features, grid, image_key(source))
            pruned.append(reduce_tokens([features], [kept.to(features.device)], [weights])[0])
        return tuple(pruned)


def per_item(value: Tensor | Sequence[Tensor] | None, sizes: Sequence[int] | None = None) -> list[Tensor] | None:
    """A batched field as one tensor per image (split along rows by ``sizes`` when the items are concatenated)."""
    if value is None:
        return None
    if sizes is not None and isinstance(value, Tensor):
        return list(value.split(list(sizes)))
    return list(value)
