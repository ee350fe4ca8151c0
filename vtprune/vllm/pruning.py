"""The two halves every pruning model class shares: the front-end's schedule field and the model's selection.

Front-end (:class:`ScheduleFieldProcessor`): the request's schedule (``mm_processor_kwargs``) or the engine's
(``hf_overrides``) is checked, kept out of the Hugging Face processor call, and attached to each image as a
tensor field, so it travels with the pixels to the model process. A schedule that reads the question (``mmtok``)
also gets the prompt's question words, picked as vtprune's transformers path picks them; they enter the image's
processor kwargs before vLLM hashes them, so the encoder-output cache (and the prefix cache, whose block hashes
hold the image's hash) keys on the question too. Model (:class:`PruningModel`): each image's projected tokens go
through vtprune's selection and come back as exactly the budgeted number of rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import ProcessorInputs

from ..adapters.base import reduce_tokens, special_token_ids
from ..engine.projector_inputs import ProjectorInputs
from ..engine.question_words import QuestionTokens
from ..vocabulary.grids import Grid
from .plan import (
    QUESTION_KEY,
    SCHEDULE_KEY,
    ImageItem,
    Selections,
    UnsupportedScheduleError,
    decode_schedule,
    encode_schedule,
    image_seed,
    make_plan,
    match_cls_rows,
    placeholder_ids,
    schedule_for,
)

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

    def apply(self, inputs: ProcessorInputs, timing_ctx: Any) -> Any:
        if QUESTION_KEY in inputs.hf_processor_mm_kwargs:
            raise UnsupportedScheduleError(
                f"{QUESTION_KEY} is vtprune's own processor kwarg (the prompt's question words); leave it out of "
                "mm_processor_kwargs: the question is read from the prompt"
            )
        schedule = self._vtprune_schedule(inputs.hf_processor_mm_kwargs)
        if schedule is not None and make_plan(schedule).reads("text_embeds"):
            # Before vLLM hashes the items: the words enter each image's hash, so its cache keys on the question.
            words = self._vtprune_question_tokens.select(torch.tensor(inputs.prompt, dtype=torch.long))
            kwargs = {**inputs.hf_processor_mm_kwargs, QUESTION_KEY: words.tolist()}
            inputs = dataclasses.replace(inputs, hf_processor_mm_kwargs=kwargs)
        return super().apply(inputs, timing_ctx)

    @functools.cached_property
    def _vtprune_question_tokens(self) -> QuestionTokens:
        """The picker of question words, as the transformers path builds it with the model's tokenizer (one per
        processor: it remembers which token ids are words)."""
        config = self.info.get_hf_config()
        special = special_token_ids(placeholder_ids(config), (config, config.get_text_config()))
        return QuestionTokens(special, self.info.get_tokenizer())

    def _apply_hf_processor_main(self, mm_items: MultiModalDataItems, hf_kwargs: Mapping[str, object]) -> BatchFeature:
        schedule = self._vtprune_schedule(hf_kwargs)
        rest = {key: value for key, value in hf_kwargs.items() if key not in (SCHEDULE_KEY, QUESTION_KEY)}
        outputs = super()._apply_hf_processor_main(mm_items, rest)
        images = mm_items.get_count("image", strict=False)
        if images:
            # Every image carries both fields ("" and no words for none), so all requests batch together.
            outputs[SCHEDULE_KEY] = encode_schedule(schedule or "", images)
            words = torch.tensor(hf_kwargs.get(QUESTION_KEY, []), dtype=torch.long)
            outputs[QUESTION_KEY] = words.expand(images, -1).clone()
        return outputs

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        for key in (SCHEDULE_KEY, QUESTION_KEY):
            if key in hf_inputs:
                fields[key] = MultiModalFieldConfig.batched("image")
        return fields


class PruningModel(VllmClass):
    """Mixin for a vLLM multimodal model class: selection on projected tokens, remembered per (schedule, image,
    question). A forward hook on the projector records its inputs while images are encoded for a schedule that reads
    them (``pre_features``); its outputs are the projected tokens, so each token's inputs are found by its value."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.vtprune_selections = Selections()
        projector, rows_per_token = self._vtprune_projector()
        self.vtprune_projector_inputs = ProjectorInputs(rows_per_token)
        if projector is not None:  # None when the engine takes no images (vLLM then builds no vision modules)
            projector.register_forward_hook(self.vtprune_projector_inputs.hook, with_kwargs=True)
        #: Per image of the last encoding that recorded them, in encoding order: its [CLS] attention to its patches.
        self.vtprune_cls_rows: list[Tensor] = []
        self._vtprune_recording_cls = False
        cls_layer = self._vtprune_cls_layer()
        #: Whether the tower has a [CLS] attention to record (without one, ToDRE takes its declared fallback).
        self.vtprune_has_cls = cls_layer is not None
        if cls_layer is not None:
            cls_layer.register_forward_hook(self._vtprune_record_cls, with_kwargs=True)

    def _vtprune_projector(self) -> tuple[nn.Module | None, int]:
        """The module that maps vision-tower features to projected tokens, and how many of its input rows one
        projected token reads."""
        raise NotImplementedError

    def _vtprune_cls_layer(self) -> nn.Module | None:
        """The vision-tower attention whose [CLS] row ranks the patches (None: the tower has no [CLS] token)."""
        return None

    def _vtprune_cls_attention(self, attention: nn.Module, hidden_states: Tensor) -> Tensor:
        """(images, patches) [CLS] attention of one call of :meth:`_vtprune_cls_layer`, heads averaged."""
        raise NotImplementedError

    def _vtprune_record_cls(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        if self._vtprune_recording_cls:
            hidden_states = args[0] if args else kwargs["hidden_states"]
            self.vtprune_cls_rows.extend(self._vtprune_cls_attention(module, hidden_states))

    def _vtprune_selection_features(self, rows: Tensor) -> Tensor:
        """The part of an image's embedding rows the selection reads (all of it, unless a model appends more)."""
        return rows

    @contextlib.contextmanager
    def _vtprune_encoding(self, schedules: Iterable[str]) -> Iterator[None]:
        """Encode images inside this block: the projector's inputs and the [CLS] attention are recorded when one of
        the schedules reads them."""
        plans = [make_plan(schedule) for schedule in schedules if schedule]
        with contextlib.ExitStack() as stack:
            if any(plan.reads("pre_features") for plan in plans):
                stack.enter_context(self.vtprune_projector_inputs.recording())
            if any(plan.reads("cls_attention") for plan in plans):
                self.vtprune_cls_rows, self._vtprune_recording_cls = [], True
                stack.callback(setattr, self, "_vtprune_recording_cls", False)
            yield

    def _vtprune_choose(
        self, image: ImageItem, rows: Tensor, grid: Grid, cls_attention: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """(kept indices, merging weights or None) of one image's embedding ``rows``, encoded inside
        :meth:`_vtprune_encoding`; ``cls_attention`` its [CLS] row (None: no [CLS]). The first selection for an
        image's key (schedule, image, question) is reused; a new one draws with the seed of its source's pixels."""
        chosen = self.vtprune_selections.get(image.key)
        if chosen is None:
            plan = make_plan(image.schedule)
            features = self._vtprune_selection_features(rows)
            text_embeds = pre_features = None
            if plan.reads("text_embeds"):
                text_embeds = self.get_language_model().embed_input_ids(image.question.to(features.device))
            if plan.reads("pre_features"):
                pre_features = self.vtprune_projector_inputs.lookup(features)
                if pre_features is None:
                    raise UnsupportedScheduleError(
                        f"{image.schedule!r} reads the projector's inputs, which vtprune records while the model "
                        "encodes pixels; this image came as precomputed embeddings. Send the image itself"
                    )
            chosen = plan.select(
                features,
                grid,
                image_seed(image.source),
                text_embeds=text_embeds,
                pre_features=pre_features,
                cls_attention=cls_attention,
            )
            self.vtprune_selections.put(image.key, chosen)
        return chosen

    def _vtprune_prune(
        self, embeddings: Sequence[Tensor], images: Sequence[ImageItem] | None, grids: Iterable[Grid]
    ) -> tuple[Tensor, ...]:
        """Each image's projected tokens (encoded inside :meth:`_vtprune_encoding`) reduced to its schedule's rows
        (``images``: None when no image carries a schedule)."""
        if images is None:
            return tuple(embeddings)
        pruned = []
        # One [CLS] row per image of this encoding (a tower pass per image batch), for the schedules that read it.
        recorded = self.vtprune_cls_rows if self.vtprune_has_cls else None
        schedules = [image.schedule for image in images]
        cls_rows = match_cls_rows(recorded, schedules, [len(features) for features in embeddings])
        for features, image, grid, cls_attention in zip(embeddings, images, grids, cls_rows, strict=True):
            if not image.schedule:
                pruned.append(features)
                continue
            kept, weights = self._vtprune_choose(image, features, grid, cls_attention)
            pruned.append(reduce_tokens([features], [kept.to(features.device)], [weights])[0])
        return tuple(pruned)


def schedules_of(kwargs: Mapping[str, object]) -> list[str] | None:
    """Each image's schedule ("" for none) from the embedding step's kwargs; None when no image carries the field."""
    rows = per_item(kwargs.get(SCHEDULE_KEY))  # type: ignore[arg-type]
    return None if rows is None else [decode_schedule(row) for row in rows]


def questions_of(kwargs: Mapping[str, object], count: int) -> list[Tensor]:
    """Each image's question word ids (none when its schedule reads no question)."""
    questions = per_item(kwargs.get(QUESTION_KEY))  # type: ignore[arg-type]
    return [torch.zeros(0, dtype=torch.long)] * count if questions is None else questions


def per_item(value: Tensor | Sequence[Tensor] | None, sizes: Sequence[int] | None = None) -> list[Tensor] | None:
    """A batched field as one tensor per image (split along rows by ``sizes`` when the items are concatenated)."""
    if value is None:
        return None
    if sizes is not None and isinstance(value, Tensor):
        return list(value.split(list(sizes)))
    return list(value)
