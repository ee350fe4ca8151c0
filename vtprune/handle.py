"""The handle ``vtprune.prune`` returns: owns every hook on one model instance and undoes them."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .adapters import ModelAdapter
from .attention import cls_attention
from .decoder_stage import DecoderStages
from .errors import AlreadyPrunedError, ConcurrentCallError, VTPruneError, WrappedCopyError
from .input_stage import InputStage
from .projector_inputs import ProjectorInputs
from .record import PruneRecord
from .schedule import Schedule
from .selection import NEWLINE_POLICIES
from .state import PruneState
from .text import QuestionTokens

#: Attribute marking a model instance as wrapped.
HANDLE_ATTR = "_vtprune_handle"


class PruneHandle:
    """Hooks of one schedule on one model. ``remove()`` (or leaving the ``with`` block) undoes all of them."""

    def __init__(
        self,
        model: nn.Module,
        adapter: ModelAdapter,
        schedule: Schedule,
        *,
        seed: int = 0,
        newlines: str = "candidate",
        renumber: bool = False,
        tokenizer: Any | None = None,
        record_scores: bool = False,
    ) -> None:
        if newlines not in NEWLINE_POLICIES:
            raise ValueError(f"newlines must be one of {NEWLINE_POLICIES}, got {newlines!r}")
        if renumber and adapter.position_seq_dim != 1:
            raise VTPruneError(
                f"renumber=True is defined for 1-D positions; {type(model).__name__} uses M-RoPE, whose positions "
                "encode each token's place in its grid, so kept tokens keep their original positions"
            )
        self.model = model
        self.adapter = adapter
        self.schedule = schedule
        self.seed = seed
        self.newlines = newlines
        self.renumber = renumber
        #: Also record the score each stage's strategy ranked the tokens by (``ImageRecord.scores_by_stage``).
        self.record_scores = record_scores
        #: Picks question words out of a row's text tokens (for strategies that read ``text_embeds``).
        self.question_tokens = QuestionTokens(adapter.special_token_ids(), tokenizer)
        self.last_record: PruneRecord | None = None
        #: State of the forward in progress (read by the decoder-layer hooks).
        self.active: PruneState | None = None
        #: What the projector read for each token it made (strategies that read pre_features).
        self.projector_inputs = ProjectorInputs(adapter.projector_rows)
        #: Per thread: ``cls_attention``, the (images, patches) [CLS] attention of the vision-tower pass of its last
        #: encoding (strategies that read cls_attention), ``prompt``, what its last prefill saw (input_stage), and for
        #: models that splice visual rows themselves ``pending_splice``, the state of a splice made before its
        #: forward, and ``use_cache``, that of the forward in progress.
        self.local = threading.local()
        self._undo: list[Callable[[], None]] = []
        # One forward at a time: the decoder hooks read the state of "the" forward in progress.
        self._forward_lock = threading.Lock()
        self._forward_thread: int | None = None

    def install(self) -> PruneHandle:
        if getattr(self.model, HANDLE_ATTR, None) is not None:
            raise AlreadyPrunedError(
                "this model is already pruned by vtprune; call .remove() on its handle (or leave its `with` "
                "block) before pruning it again, or put both steps in one schedule"
            )
        try:
            setattr(self.model, HANDLE_ATTR, self)
            self.add_undo(lambda: delattr(self.model, HANDLE_ATTR))
            prefill = InputStage(self)
            self.add_hook(self.model.register_forward_pre_hook(prefill, with_kwargs=True))
            self.add_hook(self.model.register_forward_hook(self._end_forward, always_call=True))
            if self.adapter.splices_visual_rows:
                self.add_undo(self.adapter.intercept_splice(prefill.prefill_spliced))
            else:
                self._record_encodings()
            input_stage = self.schedule.input_stage
            cls_layer = self.adapter.cls_attention_layer()
            if input_stage is not None and "cls_attention" in input_stage.strategy.needs and cls_layer is not None:
                self.add_hook(cls_layer.register_forward_hook(self._capture_cls_attention, with_kwargs=True))
            if input_stage is not None and "pre_features" in input_stage.strategy.needs:
                projector = self.adapter.projector_module()
                self.add_hook(projector.register_forward_hook(self.projector_inputs.hook, with_kwargs=True))
            if self.schedule.decoder_stages:
                DecoderStages(self).install()
        except BaseException:
            self.remove()  # never leave a model half-patched
            raise
        return self

    def _record_encodings(self) -> None:
        """Mark the model's image encoding for a prefill (generate() runs it before the first forward; a plain
        forward through ``adapter.encode``), so hooks on the vision side keep what that encoding made and nothing
        else. An attribute on this one instance; removing it brings back the class method."""
        encode = self.model._prepare_multimodal_encoder_kwargs_for_generation

        def encode_for_prefill(*args: Any, **kwargs: Any) -> Any:
            with self.encoding():
                return encode(*args, **kwargs)

        self.model._prepare_multimodal_encoder_kwargs_for_generation = encode_for_prefill
        self.add_undo(lambda: delattr(self.model, "_prepare_multimodal_encoder_kwargs_for_generation"))

    @contextmanager
    def encoding(self) -> Iterator[None]:
        """The block encodes images for a prefill: hooks on the vision side keep what it makes."""
        self.local.cls_attention = None
        with self.projector_inputs.recording():
            yield

    def _capture_cls_attention(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        # The vision tower runs before the prefill inside generate(); keep its [CLS] row for it.
        if self.projector_inputs.is_recording:
            hidden_states = args[0] if args else kwargs["hidden_states"]
            self.local.cls_attention = cls_attention(module, hidden_states)

    @property
    def vision_cls_attention(self) -> torch.Tensor | None:
        """(images, patches) [CLS] attention of this thread's last encoding for a prefill, if captured."""
        return getattr(self.local, "cls_attention", None)

    # --- one forward at a time ---------------------------------------------------------------------

    def begin_forward(self) -> None:
        """Called first by the input stage: claim the model for this thread's forward, or refuse."""
        if not self._forward_lock.acquire(blocking=False):
            raise ConcurrentCallError(
                "this vtprune-wrapped model is already running a forward in another thread; vtprune keeps the "
                "state of the forward in progress on the handle, so calls on one wrapped model must not overlap. "
                "Serialise the calls (a lock around generate()/forward) or prune one model instance per thread."
            )
        self._forward_thread = threading.get_ident()

    def owns_forward(self) -> bool:
        """Whether this thread is inside a forward of the wrapped model."""
        return self._forward_thread == threading.get_ident()

    def _end_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        # Runs after every forward of the model, failed ones included: the forward's state ends with it (it
        # lives on on the cache for the next decode step), so inner modules called later see no pruning.
        if self._forward_thread == threading.get_ident():
            self.active = None
            self._forward_thread = None
            self._forward_lock.release()

    def add_hook(self, hook: RemovableHandle) -> None:
        self._undo.append(hook.remove)

    def add_undo(self, undo: Callable[[], None]) -> None:
        self._undo.append(undo)

    def remove(self) -> None:
        """Remove every hook; the model is then exactly as it was before ``prune``."""
        while self._undo:
            self._undo.pop()()
        self.active = None
        self.projector_inputs.clear()
        self.local = threading.local()

    def __deepcopy__(self, memo: dict) -> PruneHandle:
        raise WrappedCopyError(
            "a vtprune-wrapped model (or a cache it produced) cannot be copied: the copy's hooks would still act "
            "on the original. Copy the model before pruning it (or after handle.remove()), then prune the copy."
        )

    def __reduce_ex__(self, protocol: int) -> Any:
        raise WrappedCopyError(
            "a vtprune-wrapped model (or a cache it produced) cannot be pickled: its hooks belong to this "
            "process. Call handle.remove() (or leave the `with` block) first, and prune again after loading."
        )

    @property
    def is_active(self) -> bool:
        return bool(self._undo)

    def __enter__(self) -> PruneHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    # --- record ----------------------------------------------------------------------------------

    def begin_record(self, state: PruneState | None, valid: torch.Tensor) -> None:
        num_layers = len(self.adapter.layers)
        lengths = valid.sum(dim=1, keepdim=True).cpu().expand(-1, num_layers).clone()
        images = [] if state is None else [item.record for item in state.items]
        self.last_record = PruneRecord(images=images, layer_lengths=lengths, schedule=str(self.schedule))

    def record_layer(self, layer: int, state: PruneState) -> None:
        """Tokens entering ``layer`` (and, until a later stage says otherwise, every layer after it)."""
        self.last_record.layer_lengths[:, layer:] = state.valid.sum(dim=1, keepdim=True).cpu()

    @contextmanager
    def timing(self, field: str) -> Iterator[None]:
        """Add the wall time of the block to ``last_record.<field>`` when it ran during a prefill."""
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.active is not None and self.active.prefilling and self.last_record is not None:
                setattr(self.last_record, field, getattr(self.last_record, field) + time.perf_counter() - start)

    def __repr__(self) -> str:
        status = "active" if self.is_active else "removed"
        return f"PruneHandle({type(self.model).__name__}, {self.schedule}, {status})"
