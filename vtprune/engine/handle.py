"""The handle ``vtprune.prune`` returns: owns every hook on one model instance and undoes them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

from ..adapters import ModelAdapter
from ..errors import AlreadyPrunedError, NoRecordError, VTPruneError
from ..record import PruneRecord
from ..schedule import Schedule
from .capture import EncodingCapture
from .decoder_hooks import DecoderHooks
from .input_hook import InputHook
from .session import Session, Uncopyable
from .settings import PruneSettings

#: Attribute marking a model instance as wrapped.
HANDLE_ATTR = "_vtprune_handle"


class PruneHandle(Uncopyable):
    """Hooks of one schedule on one model. ``remove()`` (or leaving the ``with`` block) undoes all of them."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, settings: PruneSettings) -> None:
        if settings.renumber and adapter.position_seq_dim != 1:
            raise VTPruneError(
                f"renumber=True is defined for 1-D positions; {type(model).__name__} uses M-RoPE, whose positions "
                "encode each token's place in its grid, so kept tokens keep their original positions"
            )
        self.model = model
        self.adapter = adapter
        self.settings = settings
        #: The forward in progress and the record of the last prefill, shared by the hooks.
        self.session = Session(len(adapter.layers), str(settings.schedule))
        #: What the vision side of the last encoding made (strategies that read pre_features or cls_attention).
        self.capture = EncodingCapture(adapter.projector_rows)
        self._undo: list[Callable[[], None]] = []

    @property
    def schedule(self) -> Schedule:
        return self.settings.schedule

    @property
    def last_record(self) -> PruneRecord | None:
        """What the last prefill pruned (None before the first)."""
        return self.session.record

    def require_record(self) -> PruneRecord:
        """What the last prefill pruned; raises :class:`NoRecordError` before the first."""
        if self.session.record is None:
            raise NoRecordError(
                "no prefill has run under this handle yet, so there is no record: run a forward or generate() of "
                "the wrapped model first (handle.last_record is None until then)"
            )
        return self.session.record

    def install(self) -> PruneHandle:
        if getattr(self.model, HANDLE_ATTR, None) is not None:
            raise AlreadyPrunedError(
                "this model is already pruned by vtprune; call .remove() on its handle (or leave its `with` "
                "block) before pruning it again, or put both steps in one schedule"
            )
        try:
            setattr(self.model, HANDLE_ATTR, self)
            self.add_undo(lambda: delattr(self.model, HANDLE_ATTR))
            input_hook = InputHook(self.adapter, self.settings, self.session, self.capture)
            self.add_hook(self.model.register_forward_pre_hook(input_hook, with_kwargs=True))
            self.add_hook(self.model.register_forward_hook(self._end_forward, always_call=True))
            if self.adapter.splices_visual_rows:
                self.add_undo(self.adapter.intercept_splice(input_hook.prefill_spliced))
            else:
                self._record_encodings()
            stage = self.schedule.input_stage
            if stage is not None and "cls_attention" in stage.strategy.needs:
                self._record_cls_attention()
            if stage is not None and "pre_features" in stage.strategy.needs:
                projector = self.adapter.projector_module()
                hook = self.capture.projector_inputs.hook
                self.add_hook(projector.register_forward_hook(hook, with_kwargs=True))
            if self.schedule.decoder_stages:
                DecoderHooks(self.adapter, self.settings, self.session).install(self.add_undo)
        except BaseException:
            self.remove()  # never leave a model half-patched
            raise
        return self

    def _record_encodings(self) -> None:
        """Mark the model's image encoding for a prefill (generate() runs it before the first forward; a plain
        forward through ``adapter.encode``), so hooks on the vision side keep what that encoding made and nothing
        else. An attribute on this one instance; removing it brings back the class method."""
        model: Any = self.model  # an XxxForConditionalGeneration: torch's typing of module attributes hides methods
        encode = model._prepare_multimodal_encoder_kwargs_for_generation

        def encode_for_prefill(model_kwargs: dict[str, Any]) -> Any:
            if self.capture.records_cls_attention:
                self.adapter.check_cls_arguments(model_kwargs)
            with self.capture.encoding():
                encoded = encode(model_kwargs)
                self.capture.encoded(encoded["mm_encoder_outputs"].get("image"))
                return encoded

        model._prepare_multimodal_encoder_kwargs_for_generation = encode_for_prefill
        self.add_undo(lambda: delattr(model, "_prepare_multimodal_encoder_kwargs_for_generation"))

    def _record_cls_attention(self) -> None:
        """Hook the vision tower's attention whose [CLS] row ranks the patches the projector reads; none where the
        adapter declares the strategy's fallback (no [CLS] token, AnyRes tiles). The adapter refuses towers whose
        [CLS] row it cannot give."""
        layer = self.adapter.cls_attention_layer()
        if layer is not None:
            self.add_hook(layer.register_forward_hook(self.capture.cls_attention_hook, with_kwargs=True))
            self.capture.records_cls_attention = True

    def _end_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.session.end()

    def add_hook(self, hook: RemovableHandle) -> None:
        self._undo.append(hook.remove)

    def add_undo(self, undo: Callable[[], None]) -> None:
        self._undo.append(undo)

    def remove(self) -> None:
        """Remove every hook; the model is then exactly as it was before ``prune``."""
        while self._undo:
            self._undo.pop()()
        self.session.state = None
        self.capture.clear()

    @property
    def is_active(self) -> bool:
        return bool(self._undo)

    def __enter__(self) -> PruneHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        status = "active" if self.is_active else "removed"
        return f"PruneHandle({type(self.model).__name__}, {self.schedule}, {status})"
