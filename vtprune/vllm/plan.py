"""What a vLLM engine prunes: one input-stage schedule, checked against what vLLM's model code can give it.

vLLM fixes the number of placeholder tokens of an image in its front-end, before any model code runs, and
the model's ``embed_multimodal`` must return exactly that many rows. So a schedule is usable here only if
its count follows from the image's size alone (``keep`` or ``keep_ratio``·N, or a merging strategy's
pooled grid), and its strategy needs nothing but the projected tokens, the grid and a seed. This module
has no vLLM import: the checks run (and are tested) without vLLM installed.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor

from ..adapters.llava import TOWERS_WITHOUT_CLS, unreadable_cls_reason
from ..engine.cls_rows import cls_rows_of_images
from ..engine.selection import merge_tokens, select_tokens
from ..errors import VTPruneError
from ..schedule import Schedule, Stage, parse_schedule
from ..strategies.base import MergingStrategy, TokenContext
from ..vocabulary.grids import Grid

#: The key of the schedule string: in hf_overrides (the engine's), in mm_processor_kwargs (one request's), and
#: as the per-image tensor field that carries it to the model.
SCHEDULE_KEY = "vtprune_schedule"

#: The key of the question's word ids: added to an image's processor kwargs by the front-end (never by the user) when
#: its schedule reads the question, so vLLM's multimodal hash, and with it the encoder-output cache and the prefix
#: cache, tells two questions about one image apart; then the per-image tensor field that carries the ids.
QUESTION_KEY = "vtprune_question"

#: Config attributes naming a model's visual placeholder tokens (vLLM's configs spell LLaVA's ``image_token_index``).
PLACEHOLDER_NAMES = ("image_token_id", "image_token_index", "video_token_id")


def placeholder_ids(config: object) -> list[int]:
    """The visual placeholder token ids ``config`` names, in :data:`PLACEHOLDER_NAMES` order (the image's first)."""
    return [getattr(config, name) for name in PLACEHOLDER_NAMES if getattr(config, name, None) is not None]


#: Strategy inputs the pruning classes provide: the question's words embedded by the language model (from the
#: prompt the front-end sees), the projector's inputs (recorded by a hook on the projector while it encodes) and
#: the CLIP tower's [CLS] attention (recomputed by a hook on the attention whose output the projector reads; None
#: for towers without [CLS], as on the transformers path).
AVAILABLE_INPUTS = frozenset({"text_embeds", "pre_features", "cls_attention"})

#: Why a strategy input cannot be had inside vLLM's multimodal embedding step.
UNAVAILABLE_INPUTS = {
    "attention": "it scores with decoder attention, and vLLM's attention kernels return no weights",
    "cross_shares": "it scores with decoder attention, and vLLM's attention kernels return no weights",
    "projector": "it needs the projector as a float32 function of the projector's inputs, and vLLM's projector is "
    "made of its own parallel linear layers (sharded under tensor parallelism; on CPU their weights may be repacked "
    "for its GEMM kernels), of which this backend makes no float32 copy",
    "instruction": "it reads the question as text with a CLIP text tower, which the pruning classes do not load",
}

#: Kept sets remembered per image (least recently used dropped first); enough for every image a batch can hold.
REMEMBERED_IMAGES = 4096
#: Room for a schedule string in the per-image tensor that carries it to the model.
SCHEDULE_BYTES = 128


class UnsupportedScheduleError(VTPruneError, ValueError):
    """The schedule cannot run inside vLLM (decoder stage, content-dependent count, missing input)."""


@dataclass
class PruningPlan:
    """One schedule's input-stage pruning: the count per image (front-end) and the selection (model)."""

    schedule: Schedule
    text: str
    """The schedule as the user wrote it (for messages and keys)."""

    def __post_init__(self) -> None:
        text = self.text
        if self.schedule.decoder_stages:
            raise UnsupportedScheduleError(
                f"schedule {text!r} prunes inside the decoder, which vLLM cannot do: its paged KV cache shares "
                "one block table and one sequence length across layers, and its attention kernels return no "
                "weights. Use an input-stage schedule (e.g. 'divprune:64') or vtprune's transformers path"
            )
        strategy = self.stage.strategy
        if not strategy.needs_budget:
            raise UnsupportedScheduleError(
                f"strategy {strategy.name!r} decides its own count from the image's content, but vLLM fixes the "
                "number of image tokens from the image's size before the model runs; give a budgeted strategy"
            )
        missing = set(strategy.needs) - AVAILABLE_INPUTS
        if missing:
            reasons = sorted(
                {UNAVAILABLE_INPUTS.get(need, f"it needs {need!r}, which vLLM does not have") for need in missing}
            )
            raise UnsupportedScheduleError(f"strategy {strategy.name!r} cannot run inside vLLM: {'; '.join(reasons)}")

    @property
    def stage(self) -> Stage:
        stage = self.schedule.input_stage
        assert stage is not None, "make_plan refuses schedules without an input stage"
        return stage

    def tokens(self, num_tokens: int, grid: Grid) -> int:
        """How many rows an image of ``num_tokens`` projected tokens (raster ``grid``) becomes: content-free."""
        strategy, budget = self.stage.strategy, self.stage.budget
        assert budget is not None, "an input stage has a budget (make_plan resolves the schedule)"
        if isinstance(strategy, MergingStrategy):
            # A merge's count depends on the grid and the budget only: measure it on blank tokens.
            blank = TokenContext(features=torch.zeros(num_tokens, 1), keep=num_tokens, grid=grid)
            places, _ = merge_tokens(strategy, budget, blank)
            return places.numel()
        return budget.tokens(num_tokens)

    def reads(self, need: str) -> bool:
        """Whether the strategy reads the :class:`TokenContext` field ``need`` (``"text_embeds"``, ...)."""
        return need in self.stage.strategy.needs

    def select(
        self,
        features: Tensor,
        grid: Grid,
        seed: int,
        text_embeds: Tensor | None = None,
        pre_features: Tensor | None = None,
        cls_attention: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """(kept indices, merging weights or None) for one image's projected tokens ``features`` (N, D); the question's
        embedded words, the projector's inputs and the [CLS] attention for the strategies that read them."""
        image = TokenContext(
            features=features,
            keep=features.shape[0],
            seed=seed,
            grid=grid,
            text_embeds=text_embeds,
            pre_features=pre_features,
            cls_attention=cls_attention,
        )
        strategy, budget = self.stage.strategy, self.stage.budget
        if isinstance(strategy, MergingStrategy):
            return merge_tokens(strategy, budget, image)
        return select_tokens(strategy, budget, [image])[0], None


#: What a kept set is remembered under: (schedule, the image's :func:`image_digest`, the question's word ids; () when
#: the schedule reads no question).
SelectionKey = tuple[str, bytes, tuple[int, ...]]
Key = TypeVar("Key")
Value = TypeVar("Value")


class Remembered(Generic[Key, Value]):
    """Values by key, at most ``capacity`` of them (or of their ``size``s, summed in ``total``), the least recently
    used dropped first: a value in use outlives those of past requests."""

    def __init__(self, capacity: int = REMEMBERED_IMAGES, size: Callable[[Value], int] = lambda value: 1) -> None:
        self.capacity = capacity
        self.size = size
        self.kept: OrderedDict[Key, Value] = OrderedDict()
        self.total = 0
        """The values' sizes, summed."""

    def get(self, key: Key) -> Value | None:
        value = self.kept.get(key)
        if value is not None:
            self.kept.move_to_end(key)
        return value

    def put(self, key: Key, value: Value) -> None:
        self.pop(key)
        self.kept[key] = value
        self.total += self.size(value)
        while self.total > self.capacity and len(self.kept) > 1:
            self.pop(next(iter(self.kept)))

    def pop(self, key: Key) -> Value | None:
        """The value of ``key``, no longer remembered (None: not remembered)."""
        value = self.kept.pop(key, None)
        if value is not None:
            self.total -= self.size(value)
        return value


class Selections(Remembered[SelectionKey, tuple[Tensor, Tensor | None]]):
    """Kept sets (and merging weights) per (schedule, image, question): what the model kept, and the one place a
    selection made for positions (Qwen's M-RoPE) is found again when the same image is embedded."""


class PrunedRows(Remembered[SelectionKey, tuple[Tensor, Tensor]]):
    """Images reduced before their embedding step (Qwen's classes select when vLLM computes the M-RoPE positions),
    per :data:`SelectionKey`: (the kept set the positions were computed with, the image's reduced rows), held until
    the embedding step takes them (:meth:`take`). At most ``capacity`` rows in all (``total``), besides the newest
    image: the oldest images are dropped first (those of requests that never reach the embedding step: aborted before
    it, or spared it by a cache; looking at a held image does not refresh it), and an image dropped before its
    embedding step is encoded again there."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity, size=lambda held: len(held[1]))

    def kept_set(self, key: SelectionKey) -> Tensor | None:
        """The kept set of a held image (None: not held)."""
        held = self.kept.get(key)
        return None if held is None else held[0]

    def take(self, key: SelectionKey) -> Tensor | None:
        """The reduced rows of a held image, no longer held (None: not held)."""
        held = self.pop(key)
        return None if held is None else held[1]


@dataclass(frozen=True)
class ImageItem:
    """One image as a pruning class selects on it."""

    schedule: str
    """"" for none."""
    source: Tensor
    """Its pixels as the model receives them, or its precomputed embeddings: what keys and seeds its selection."""
    question: Tensor
    """The prompt's question word ids (none unless the schedule reads them)."""
    grid_thw: Tensor | None
    """(3,) int64: its patch grid (Qwen's ``image_grid_thw``); None where the model has none."""

    @functools.cached_property
    def key(self) -> SelectionKey:
        """What its kept set is remembered under, digested once per item (the digest reads all of ``source``)."""
        return selection_key(self.schedule, self.source, self.question, self.grid_thw)


def selection_key(schedule: str, source: Tensor, question: Tensor, grid_thw: Tensor | None = None) -> SelectionKey:
    """What an image's kept set is remembered under: the digest of ``source`` (its pixels, or its precomputed
    embeddings) and of its patch grid ``grid_thw`` (Qwen's ``image_grid_thw``; None where the model has none), and
    ``question``, the prompt's question words (none unless the schedule reads them)."""
    return (schedule, image_digest(source, grid_thw), tuple(question.tolist()))


def schedule_for(config: object, processor_kwargs: Mapping[str, object]) -> str | None:
    """The schedule of one request: its ``mm_processor_kwargs`` entry, else the engine's (hf_overrides), else None."""
    text = processor_kwargs.get(SCHEDULE_KEY, getattr(config, SCHEDULE_KEY, None))
    if text is not None and not isinstance(text, str):
        raise UnsupportedScheduleError(f"{SCHEDULE_KEY} must be a schedule string such as 'divprune:64', got {text!r}")
    return text


@functools.lru_cache(maxsize=64)
def make_plan(schedule: str) -> PruningPlan:
    """The (checked, cached) plan of a schedule string (``"divprune:64"``, ``"uniform:25%"``)."""
    return PruningPlan(parse_schedule(schedule), schedule)


def match_cls_rows(
    rows: Sequence[Tensor] | None, schedules: Sequence[str], token_counts: Sequence[int]
) -> list[Tensor | None]:
    """Each image's [CLS] attention row for its schedule (None where the schedule does not read it).

    ``rows``: what the encoding of these images recorded, one per image in encoding order; None when the tower has
    no [CLS] token, where ToDRE's declared fallback (the most isolated token as the pivot) applies. A tower with a
    [CLS] token whose rows do not belong one to one to the images' tokens raises :class:`~vtprune.errors.InputError`
    (:func:`~vtprune.engine.cls_rows.cls_rows_of_images`, as on the transformers path).
    """
    readers = [schedule if schedule and make_plan(schedule).reads("cls_attention") else None for schedule in schedules]
    return cls_rows_of_images(rows, token_counts, readers)


def cls_refusal(config: Any) -> str | None:
    """Why no [CLS] attention row ranks the image tokens of the LLaVA ``config`` describes (several feature layers,
    a tower vtprune does not know): a schedule that reads it is refused (per request in the front-end; at
    :func:`~vtprune.vllm.engine_args` for an engine's default). None where the row is read, or where ToDRE's
    declared fallback applies (a tower without [CLS] token, or no layer before the features the projector reads)."""
    tower_type = getattr(config.vision_config, "model_type", "")
    if tower_type in TOWERS_WITHOUT_CLS:
        return None
    if not isinstance(config.vision_feature_layer, int) and tower_type == "clip_vision_model":
        # vLLM projects only the deepest of several layers (the model's own code concatenates them), so this row
        # would rank what vLLM serves, but not what the transformers path, which refuses them, would.
        return (
            f"vision_feature_layer={config.vision_feature_layer}: several feature layers, of which vLLM's LLaVA "
            "projects only the deepest while the model's own code reads them side by side; vtprune ranks by [CLS] "
            "attention (todre) only where both agree. Choose a strategy that does not read it"
        )
    return unreadable_cls_reason(tower_type, config.vision_feature_layer)


def encode_schedule(schedule: str, count: int) -> Tensor:
    """(count, SCHEDULE_BYTES) uint8: the schedule as a per-image tensor field, so it reaches the model with the
    image's other processor outputs (and vLLM's caches, keyed by the processor kwargs, keep them together)."""
    data = schedule.encode()
    if len(data) > SCHEDULE_BYTES:
        raise UnsupportedScheduleError(f"schedule {schedule!r} is longer than {SCHEDULE_BYTES} bytes")
    row = torch.zeros(SCHEDULE_BYTES, dtype=torch.uint8)
    row[: len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    return row.expand(count, -1).clone()


def decode_schedule(row: Tensor) -> str:
    return bytes(row.cpu().tolist()).rstrip(b"\0").decode()


def image_seed(pixels: Tensor) -> int:
    """The seed of an image's random draws, from its own pixels, so a request gets the same draw whatever batch it is
    in. A CRC32: two images may share it (and then a draw), so it never identifies an image (:func:`image_digest`)."""
    data = pixels.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return zlib.crc32(data)


def image_digest(source: Tensor, grid_thw: Tensor | None = None) -> bytes:
    """What identifies an image among those whose kept sets are remembered: BLAKE3 (a cryptographic hash, vLLM's default
    for its multimodal cache keys) of its shape, dtype and patch grid ``grid_thw`` (None where the model has none)
    and of the bytes of ``source`` (its pixels, or its precomputed embeddings), so that two different images never
    share a kept set. A CRC32 such as :func:`image_seed` would: among 77,000 images two share one with even odds,
    and CRC32 being linear, a twin of any image takes 4 chosen bytes."""
    # Imported here: vLLM depends on it, while the checks of this module run without vLLM.
    from blake3 import blake3

    data = source.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    grid = None if grid_thw is None else grid_thw.tolist()
    digest = blake3(f"{tuple(source.shape)}|{source.dtype}|{grid}|".encode())
    digest.update(data.numpy().data)
    return digest.digest()


def square_grid(num_tokens: int) -> Grid:
    """(1, s, s) when ``num_tokens`` is a square (LLaVA-1.5), else None: the grid vtprune's LLaVA adapter gives."""
    side = math.isqrt(num_tokens)
    return (1, side, side) if side * side == num_tokens else None
