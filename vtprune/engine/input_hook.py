"""The input stage's hook: a forward pre-hook on the ``XxxForConditionalGeneration`` that prunes before the LLM.

At prefill it selects for all images at once (images of the same size run as one group),
shortens the encoder outputs, and packs every sequence tensor with one :class:`Layout`, so kept
tokens keep their original (1-D or M-RoPE) positions and old padding is reclaimed. At each
decode step it maps generate()'s original-length mask into the pruned layout.
"""

from __future__ import annotations

import inspect
import threading
import weakref
import zlib
from collections import Counter
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache

from ..adapters.base import PIXEL_INPUTS, ModelAdapter
from ..errors import LayerError, UnsupportedCacheError, UnsupportedTrainingError, VTPruneError
from ..record import ImageRecord
from ..strategies.base import MergingStrategy, TokenContext
from ..vocabulary.compat import CACHE_KWARG, get_cache
from ..vocabulary.layout import Layout, last_valid, pack
from .capture import EncodingCapture
from .cls_rows import cls_rows_of_images
from .question_words import QuestionTokens
from .selection import merge_tokens, score_tokens, select_tokens
from .session import Session, Uncopyable
from .settings import PruneSettings
from .state import STATE_ATTR, PruneState, VisualItem, ones_mask


def bind_arguments(forward: Any, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """All call arguments by name (users may pass input_ids positionally)."""
    if not args:
        return dict(kwargs)
    bound = inspect.signature(forward).bind_partial(*args, **kwargs).arguments
    extra = bound.pop("kwargs", {})
    return {**bound, **extra}


#: What every visual slot reads as in the ids a seed hashes (no token id is negative).
VISUAL_SLOT = -1


def seed_ids(input_ids: Tensor, visual: Tensor) -> Tensor:
    """``input_ids`` with every ``visual`` slot replaced by :data:`VISUAL_SLOT`: runtimes mark those slots with
    different ids (transformers' ``image_token_id``, llava's -200), and the same sample must draw alike on each."""
    return input_ids.to(torch.int64).masked_fill(visual, VISUAL_SLOT)


def item_seed(base: int, ids: Tensor, modality: str, index: int) -> int:
    """Seed from the sample's own tokens up to and including the item (as :func:`seed_ids` gives them), so a
    sample gets the same draw whatever batch, beam or runtime it is in, and tokens generated later (a cache-less
    generate()) cannot change it."""
    data = ids.cpu().numpy().tobytes() + f"{base}|{modality}|{index}".encode()
    return zlib.crc32(data)


class InputHook:
    """The forward pre-hook: starts the session's forward, prunes at prefill, maps each decode step."""

    def __init__(
        self, adapter: ModelAdapter, settings: PruneSettings, session: Session, capture: EncodingCapture
    ) -> None:
        self.adapter = adapter
        self.settings = settings
        self.session = session
        self.capture = capture
        self.stage = settings.schedule.input_stage
        #: Picks question words out of a row's text tokens (for strategies that read ``text_embeds``).
        self.question_tokens = QuestionTokens(adapter.special_token_ids(), settings.tokenizer)
        #: Per thread: ``prompt``, what its last prefill saw (see ``_prompt_length``); for models that splice their
        #: own visual rows, ``pending_splice`` (the state generate()'s splice made, for its first forward) and
        #: ``use_cache`` (the forward's own argument, for a splice it runs itself).
        self._local = threading.local()

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        self.session.begin()
        with self.session.timing("hook_seconds"):
            return self._run(module, args, kwargs)

    def _run(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        kwargs = bind_arguments(module.forward, args, kwargs)
        cache = get_cache(kwargs)
        check_cache(cache)
        state = getattr(cache, STATE_ATTR, None)
        if state is not None:
            self.session.state = state
            return (), self.decode_step(state, kwargs)
        self.session.state = None
        if cache is not None and cache.get_seq_length() > 0:
            if self._has_visual_tokens(kwargs):
                raise UnsupportedCacheError(
                    "vtprune cannot prune images that arrive on top of an existing cache (multi-turn, prefix "
                    "caching, chunked prefill); pass the whole conversation to a fresh generate() call"
                )
            return None
        if self.adapter.splices_visual_rows:
            return self._claim_splice(kwargs)
        return (), self.prefill(kwargs)

    # --- prefill -------------------------------------------------------------------------------

    def prefill(self, kwargs: dict[str, Any], attach: bool = True) -> dict[str, Any]:
        """Locate, select and pack; with ``attach``, keep the state on the forward's cache for the decode steps."""
        input_ids = kwargs.get("input_ids")
        if input_ids is None:
            raise VTPruneError("vtprune finds visual tokens through input_ids; pass input_ids, not inputs_embeds")
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.ndim != 2:
            raise VTPruneError("vtprune needs a 2-D attention_mask (or none); got a prepared 4-D mask")
        self._check_training(kwargs)
        if any(kwargs.get(key) is not None for key in PIXEL_INPUTS):
            kwargs = self.adapter.encode(kwargs)
        encoder_outputs = kwargs.get("mm_encoder_outputs") or {}
        valid = mask.bool() if mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        prompt_length = self._prompt_length(input_ids, encoder_outputs)
        items = self._locate(input_ids, valid, encoder_outputs)
        if not items:  # text-only batch: nothing to prune, nothing to remember
            self.session.begin_record(None, valid)
            return kwargs
        state = PruneState(
            items=items,
            valid=valid,
            item_of_slot=torch.full_like(input_ids, -1),
            token_of_slot=torch.full_like(input_ids, -1),
            left_pad=not bool((~valid[:, -1]).any()),
            seen=input_ids.shape[1],
            prompt=valid & (torch.arange(input_ids.shape[1], device=valid.device) < prompt_length),
        )
        for index, item in enumerate(items):
            state.item_of_slot[item.row, item.columns] = index
            state.token_of_slot[item.row, item.columns] = torch.arange(item.columns.numel(), device=input_ids.device)
        self.session.state = state
        self.session.begin_record(state, state.valid)
        if self.stage is not None:
            kwargs = self._prune(kwargs, state, encoder_outputs)
            self.session.record_layer(0, state)
            self._check_window(state)
        if attach:
            self._attach(state, kwargs)
        return kwargs

    def _attach(self, state: PruneState, kwargs: dict[str, Any]) -> None:
        """Make ``state`` the forward's, and keep it on its cache, where the decode steps find it."""
        self.session.state = state
        cache = get_cache(kwargs)
        if cache is None and kwargs.get("use_cache", self.adapter.text_config.use_cache):
            # Own the cache so decode steps can find this state; the text model would make one anyway.
            cache = kwargs[CACHE_KWARG] = DynamicCache(config=self.adapter.text_config)
        if cache is not None:
            setattr(cache, STATE_ATTR, state)
            # An attribute on this one cache, shadowing the class's method (mypy flags every such assignment).
            cache.update = CacheGuard(cache, self.session, state)  # type: ignore[method-assign]

    # --- models that splice visual rows themselves -------------------------------------------------

    def prefill_spliced(self, splice: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The prefill of a model that splices its visual rows into ``inputs_embeds`` itself (see
        ``ModelAdapter.intercept_splice``): ``splice()`` runs the model's own encoding and splice.

        Called inside a forward (which ``_claim_splice`` opened), the state goes on that forward's cache at once.
        ``generate()`` splices before its first forward: the state waits for that forward, which has no other
        way to say which rows are visual, and ``_claim_splice`` hands it over.
        """
        inside_forward = self.session.owns_forward()
        with self.capture.encoding():
            kwargs = splice()
            self.capture.encoded((kwargs.get("mm_encoder_outputs") or {}).get("image"))
        if not inside_forward and kwargs.get("position_ids") is None:
            # The ids generate() will make from this mask (the model's forward default is arange instead).
            mask = kwargs["attention_mask"]
            kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        use_cache = getattr(self._local, "use_cache", None)  # the forward's own, which llava keeps to itself
        if inside_forward and use_cache is not None:
            kwargs["use_cache"] = use_cache
        kwargs = self.prefill(kwargs, attach=inside_forward)
        state = self.session.state
        if state is not None:
            # The model's input is now the packed sequence: generate()'s mask and positions grow from it.
            state.input_layout = None
            state.dropped_from_input = state.seen - state.valid.shape[1]
            state.seen = state.valid.shape[1]
        if not inside_forward:
            self._local.pending_splice = None if state is None else (state, kwargs["inputs_embeds"])
            self.session.state = None
        return kwargs

    def _claim_splice(self, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        """At a prefill forward of a splicing model: take over the state of the splice generate() made for it.

        That forward's ``inputs_embeds`` are the pruned splice, each row repeated per beam / returned sequence. A
        forward that splices itself (ids and images) gets its state from ``prefill_spliced`` later instead.
        """
        pending = getattr(self._local, "pending_splice", None)
        self._local.pending_splice = None
        self._local.use_cache = kwargs.get("use_cache")
        embeds = kwargs.get("inputs_embeds")
        if pending is None or embeds is None:
            return None
        state, spliced = pending
        times = embeds.shape[0] // spliced.shape[0]
        if embeds.shape[0] % spliced.shape[0] or not torch.equal(embeds, spliced.repeat_interleave(times, dim=0)):
            return None  # not the sequence that splice made: a forward of the user's own inputs_embeds
        if times > 1:
            state = state.repeat_rows(times)
            assert self.session.record is not None  # prefill_spliced began the record of this prefill
            self.session.record.images = [item.record for item in state.items]
            self.session.record.layer_lengths = self.session.record.layer_lengths.repeat_interleave(times, 0)
        self._attach(state, kwargs)
        return (), kwargs

    def _check_training(self, kwargs: dict[str, Any]) -> None:
        """Refuse up front what a decoder stage cannot honour, before anything runs."""
        if not self.settings.schedule.decoder_stages:
            return
        if kwargs.get("labels") is not None:
            raise UnsupportedTrainingError(
                "labels with a decoder stage: the logits come out in the sequence the last decoder stage left, "
                "which is decided inside the forward, after the loss's labels were passed. Compute the loss "
                "yourself from the logits (the record maps them), or use an input-stage schedule, which packs labels"
            )
        checkpointing = any(getattr(layer, "gradient_checkpointing", False) for layer in self.adapter.layers)
        if checkpointing and self.adapter.model.training and torch.is_grad_enabled():
            raise UnsupportedTrainingError(
                "gradient checkpointing with a decoder stage: backward re-runs the decoder layers after the "
                "forward's pruning state has ended, so the recomputed layers would see the unpruned sequence. "
                "Call model.gradient_checkpointing_disable(), or use an input-stage schedule"
            )

    def _prompt_length(self, input_ids: Tensor, encoder_outputs: dict[str, Any]) -> int:
        """Columns of the prompt: all of them, except in the steps of a cache-less generate() after the first.

        Those re-run the prefill on the same encoder outputs (the same objects) with the generated tokens
        appended; selection must see the prompt only, so every step picks what a cached run picks.
        """
        first = next(iter(encoder_outputs.values()), None)
        last = getattr(self._local, "prompt", None)
        if first is not None and last is not None and last[0]() is first:
            ids = last[1]
            length = ids.shape[1]
            same_rows = ids.shape[0] == input_ids.shape[0] and length < input_ids.shape[1]
            if same_rows and torch.equal(input_ids[:, :length], ids):
                return length
        self._local.prompt = None if first is None else (weakref.ref(first), input_ids)
        return input_ids.shape[1]

    def _locate(self, input_ids: Tensor, valid: Tensor, encoder_outputs: dict[str, Any]) -> list[VisualItem]:
        items = []
        newline = self.adapter.newline_embedding()
        token_ids = self.adapter.token_ids()
        visual = torch.zeros_like(input_ids, dtype=torch.bool)
        for token_id in token_ids.values():
            visual |= input_ids == token_id
        hashed = seed_ids(input_ids, visual)
        for modality, token_id in token_ids.items():
            output = encoder_outputs.get(modality)
            if output is None:
                continue
            features = list(output.pooler_output)
            sizes = [f.shape[0] for f in features]
            rows, cols = (input_ids == token_id).nonzero(as_tuple=True)
            if rows.numel() != sum(sizes):
                raise VTPruneError(
                    f"{rows.numel()} {modality} placeholder tokens in input_ids but the encoder produced "
                    f"{sum(sizes)} {modality} tokens; check that the processor and the model match"
                )
            per_row_count: dict[int, int] = {}
            start = 0
            for feature, size in zip(features, sizes):
                row = int(rows[start]) if size else 0
                columns = cols[start : start + size]
                start += size
                end = int(columns[-1]) + 1 if size else 0
                prefix = hashed[row, :end][valid[row, :end]]  # padding must not change the draw
                index = per_row_count.get(row, 0)
                per_row_count[row] = index + 1
                is_newline = None
                if newline is not None:
                    is_newline = (feature == newline.to(feature.dtype)).all(dim=-1)
                items.append(
                    VisualItem(
                        row=row,
                        modality=modality,
                        columns=columns,
                        seed=item_seed(self.settings.seed, prefix, modality, index),
                        newline=is_newline,
                        record=ImageRecord(row=row, modality=modality, index=index, num_tokens=size),
                    )
                )
        return items

    def _prune(self, kwargs: dict[str, Any], state: PruneState, encoder_outputs: dict[str, Any]) -> dict[str, Any]:
        assert self.stage is not None  # prefill prunes only for a schedule with an input stage
        input_ids = kwargs["input_ids"]
        positions = self.adapter.original_positions(kwargs, input_ids)
        grids = self.adapter.grids(state.items, positions)
        needs = self.stage.strategy.needs
        question, instruction = {}, {}
        if "text_embeds" in needs or "instruction" in needs:
            embed = cast(PreTrainedModel, self.adapter.model).get_input_embeddings()
            delimiters = self.adapter.image_delimiter_ids(input_ids)
            for row in {item.row for item in state.items}:
                words = self.question_tokens.select(input_ids[row][state.prompt[row]], delimiters)
                if "text_embeds" in needs:
                    question[row] = embed(words)
                if "instruction" in needs:
                    instruction[row] = self.question_tokens.decode(words)
        if "pre_features" in needs and not self.capture.projector_inputs.has_calls:
            raise VTPruneError(
                f"{self.stage.strategy.name} reads the projector's inputs, which vtprune records while the model "
                "encodes pixels for this call; these images came as precomputed mm_encoder_outputs. Pass the "
                "pixel inputs (pixel_values, ...) to the forward or generate() instead"
            )
        cls_rows = self._cls_rows(encoder_outputs) if "cls_attention" in needs else None
        projector = self.adapter.projector() if "projector" in needs else None
        images = []  # per item: what selection sees of it
        counts: Counter[str] = Counter()
        for item, grid in zip(state.items, grids):
            index = counts[item.modality]  # the item's place among its modality's encoder outputs
            counts[item.modality] += 1
            features = encoder_outputs[item.modality].pooler_output[index]
            pre_features = None
            if "pre_features" in needs:
                pre_features = self.capture.projector_inputs.lookup(features, item.newline)
            images.append(
                TokenContext(
                    features=features,
                    keep=features.shape[0],
                    seed=item.seed,
                    grid=grid,
                    segments=self.adapter.segments(item),
                    newline=item.newline,
                    text_embeds=question.get(item.row),
                    instruction=instruction.get(item.row),
                    pre_features=pre_features,
                    cls_attention=None if cls_rows is None or item.modality != "image" else cls_rows[index],
                    projector=projector,
                )
            )
        strategy, budget = self.stage.strategy, self.stage.budget
        newlines = self.settings.newlines
        with self.session.timing("selection_seconds"):
            if isinstance(strategy, MergingStrategy):
                chosen = [merge_tokens(strategy, budget, image) for image in images]
            else:
                chosen = [(kept, None) for kept in select_tokens(strategy, budget, images, newlines=newlines)]
        kept_by_modality: dict[str, list[Tensor]] = {modality: [] for modality in encoder_outputs}
        weights_by_modality: dict[str, list[Tensor | None]] = {modality: [] for modality in encoder_outputs}
        kept_rows, kept_columns = [], []
        for item, image, (kept, weights) in zip(state.items, images, chosen):
            if self.settings.record_scores:  # outside the timing: scores are for looking, not for pruning
                scores = score_tokens(strategy, image, newlines=newlines)
                if scores is not None:
                    item.record.scores_by_stage[self.stage.key] = scores
            kept_by_modality[item.modality].append(kept)
            weights_by_modality[item.modality].append(weights)
            kept_columns.append(item.columns[kept.to(input_ids.device)])
            kept_rows.append(torch.full_like(kept_columns[-1], item.row))
        # The real tokens that are not visual, and the kept visual ones: one scatter for the whole batch.
        keep = state.valid & (state.item_of_slot < 0)
        keep[torch.cat(kept_rows), torch.cat(kept_columns)] = True
        if bool((keep == state.valid).all()):
            self._record(state)
            return kwargs
        layout = pack(keep, state.left_pad)
        state.input_layout = layout
        state.packed = True
        state.apply(layout)
        self._record(state)
        return self._shorten(kwargs, layout, positions, state, encoder_outputs, kept_by_modality, weights_by_modality)

    def _cls_rows(self, encoder_outputs: dict[str, Any]) -> list[Tensor | None] | None:
        """Per image item, its row of the [CLS] attention its encoding recorded (None: the declared fallback of a
        tower that records none). Rows that do not belong one to one to the images raise an InputError.

        generate() repeats the same feature tensors for beams and returned sequences, so an item's image is the
        rank of its tensor among the distinct ones, in order of first appearance.
        """
        images = encoder_outputs.get("image")
        if images is None or not self.capture.records_cls_attention:
            return None
        distinct: dict[int, Tensor] = {}
        for features in images.pooler_output:
            distinct.setdefault(features.data_ptr(), features)
        recorded = self.capture.cls_rows_for(images)
        assert self.stage is not None  # called by _prune
        rows = cls_rows_of_images(
            [] if recorded is None else list(recorded),
            [len(features) for features in distinct.values()],
            [self.stage.strategy.name] * len(distinct),
        )
        row_of = dict(zip(distinct, rows, strict=True))
        return [row_of[features.data_ptr()] for features in images.pooler_output]

    def _record(self, state: PruneState) -> None:
        assert self.stage is not None  # called by _prune
        for index, item in enumerate(state.items):
            item.record.kept_by_stage[self.stage.key] = state.kept_tokens(index)

    def _shorten(
        self,
        kwargs: dict[str, Any],
        layout: Layout,
        positions: Tensor,
        state: PruneState,
        encoder_outputs: dict[str, Any],
        kept_by_modality: dict[str, list[Tensor]],
        weights_by_modality: dict[str, list[Tensor | None]],
    ) -> dict[str, Any]:
        input_ids = kwargs["input_ids"]
        visual_ids = set(self.adapter.token_ids().values())
        filler = next(i for i in range(len(visual_ids) + 1) if i not in visual_ids)
        kwargs["input_ids"] = layout.take(input_ids, fill=filler)
        mask = kwargs.get("attention_mask")
        dtype = mask.dtype if mask is not None else torch.long
        # Always pass a mask: without one, gapped position ids read as packed sequences.
        kwargs["attention_mask"] = state.valid.to(dtype)
        kwargs["position_ids"] = self._positions(layout, positions, state)
        for key, fill in (("mm_token_type_ids", 0), ("token_type_ids", 0), ("labels", -100)):
            if kwargs.get(key) is not None:
                kwargs[key] = layout.take(kwargs[key], fill=fill)
        kwargs["mm_encoder_outputs"] = {
            modality: self.adapter.shorten_outputs(output, kept_by_modality[modality], weights_by_modality[modality])
            for modality, output in encoder_outputs.items()
        }
        if kwargs.get("inputs_embeds") is not None:  # a splicing model's: put the kept rows where they go
            kwargs["inputs_embeds"] = self._spliced_embeds(layout.take(kwargs["inputs_embeds"]), kwargs)
        return kwargs

    def _spliced_embeds(self, embeds: Tensor, kwargs: dict[str, Any]) -> Tensor:
        """Packed ``inputs_embeds`` with each item's kept (or merged) rows at its packed placeholder slots."""
        for modality, output in kwargs["mm_encoder_outputs"].items():
            slots = kwargs["input_ids"] == self.adapter.token_ids()[modality]
            rows = torch.cat(list(output.pooler_output)) if len(output.pooler_output) else embeds.new_zeros(0)
            embeds = embeds.masked_scatter(slots[..., None], rows.to(embeds.dtype))
        return embeds

    def _positions(self, layout: Layout, positions: Tensor, state: PruneState) -> Tensor:
        """Kept tokens' original positions, or contiguous ones per row with ``renumber``."""
        kept = layout.take(positions, seq_dim=self.adapter.position_seq_dim, fill=0)
        rows = torch.arange(state.valid.shape[0], device=positions.device)
        last = last_valid(state.valid)
        if self.settings.renumber:
            renumbered = (state.valid.long().cumsum(dim=1) - 1).clamp(min=0)
            # generate() keeps numbering decode steps in the original layout; shift them by this much.
            state.position_shift = kept[rows, last] - renumbered[rows, last]
            kept = renumbered
        state.next_position = kept[..., rows, last] + 1
        return kept

    # --- decode ----------------------------------------------------------------------------------

    def decode_step(self, state: PruneState, kwargs: dict[str, Any]) -> dict[str, Any]:
        input_ids = kwargs.get("input_ids")
        tokens = input_ids if input_ids is not None else kwargs["inputs_embeds"]
        new_tokens = tokens.shape[1]
        mask = kwargs.get("attention_mask")
        expected = state.seen + new_tokens
        if new_tokens != 1 or (mask is not None and mask.shape[1] != expected):
            raise UnsupportedCacheError(
                "this cache holds a pruned prefill; vtprune supports decoding one token at a time from it "
                "(generate() does), not continuing a conversation or assisted decoding on top of it. "
                "Start a fresh generate() call with the whole conversation."
            )
        state.prefilling = False
        full = mask if mask is not None else ones_mask(tokens.shape[0], expected, tokens.device)
        input_mask = state.begin_decode_step(full)
        self._check_window(state)
        if state.input_layout is not None:
            assert state.next_position is not None  # _shorten sets it with the packed input layout
            kwargs["attention_mask"] = input_mask
            position_ids = kwargs.get("position_ids")
            if position_ids is None:
                # The model would number from the (pruned) cache length; continue the prompt's numbering.
                kwargs["position_ids"] = state.next_position[..., None]
            elif state.position_shift is not None:
                kwargs["position_ids"] = position_ids - state.position_shift[..., None]
            state.next_position = state.next_position + 1
        return kwargs

    def _check_window(self, state: PruneState) -> None:
        """Refuse a packed sequence that sliding-window layers would read differently from the unpruned one.

        A sliding window counts slots of the sequence it is given: once the original sequence is longer than the
        window, the local layers of the packed one reach back over more original tokens than the unpruned model's,
        a silent difference. Up to the window's width the two are equal.
        """
        window = self.adapter.sliding_window
        if window is not None and state.packed and state.original_length > window:
            raise LayerError(
                f"the sequence reached {state.original_length} tokens, more than the {window}-token sliding window of "
                f"{type(self.adapter.model).__name__}'s local attention layers, which count the tokens of the pruned "
                "sequence and would then reach back further than the unpruned model; keep prompt plus "
                f"max_new_tokens within {window} tokens to prune this model"
            )

    def _has_visual_tokens(self, kwargs: dict[str, Any]) -> bool:
        input_ids = kwargs.get("input_ids")
        return input_ids is not None and any(
            bool((input_ids == token_id).any()) for token_id in self.adapter.token_ids().values()
        )


class CacheGuard(Uncopyable):
    """``update`` of a cache that holds a pruned prefill: only a forward of the handle that pruned it may extend it.

    A later call that does not know the cache's layout (after ``handle.remove()``, under another handle, an
    inner module called directly) would write and read the wrong slots; it gets an error instead. A callable
    object, not a closure, that refuses to be copied or pickled, as the handle's session does. It holds its cache
    weakly: the cache holds it, and a cycle would keep the whole KV cache alive after its caller dropped it, until
    the next run of the garbage collector.
    """

    def __init__(self, cache: Cache, session: Session, state: PruneState) -> None:
        self.cache, self.session, self.state = weakref.ref(cache), session, state

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.session.state is not self.state:
            raise UnsupportedCacheError(
                "this cache holds a prefill that vtprune pruned, and only a forward of the same wrapped model "
                "under the same handle can continue it (the handle maps each step into the pruned layout). It "
                "was reached after handle.remove(), under another handle, or through an inner module; start a "
                "fresh generate() call instead"
            )
        cache = self.cache()
        assert cache is not None  # called as that cache's own method, so the cache is alive
        return type(cache).update(cache, *args, **kwargs)


def check_cache(cache: Cache | None) -> None:
    """Refuse caches that cannot hold layers of different lengths (StaticCache, compiled decoding)."""
    if cache is None or isinstance(cache, DynamicCache) and not cache.is_compileable:
        return
    raise UnsupportedCacheError(
        f"vtprune shortens sequences, which {type(cache).__name__} (fixed-size, compile-friendly) cannot hold; "
        "use the default DynamicCache (no cache_implementation='static', no compiled decoding)"
    )
