"""What the vision side made during this thread's last image encoding for a prefill, for strategies that read it:
the projector's inputs per token (``pre_features``) and the vision tower's [CLS] attention (``cls_attention``)."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .attention import cls_attention
from .projector_inputs import ProjectorInputs


class EncodingCapture:
    """Filled by hooks on the projector and the vision tower while :meth:`encoding` is open, per thread."""

    def __init__(self, projector_rows: int) -> None:
        self.projector_inputs = ProjectorInputs(projector_rows)
        #: Whether a hook records the vision tower's [CLS] attention (a strategy reads it, and the tower has a
        #: [CLS] token whose row ranks one image's tokens per pass); False is the strategy's declared fallback.
        self.records_cls_attention = False
        self._local = threading.local()

    @contextmanager
    def encoding(self) -> Iterator[None]:
        """The block encodes images for a prefill: what it makes replaces the previous encoding's."""
        self._local.cls_attention = None
        self._local.images = None
        with self.projector_inputs.recording():
            yield

    def encoded(self, images: object | None) -> None:
        """The image encoder outputs of the encoding in progress (made from pixels or passed in precomputed): the
        only ones its [CLS] rows belong to. Held weakly: the prefill holds them while it needs the rows."""
        if self.records_cls_attention and images is not None:
            self._local.images = weakref.ref(images)

    def cls_attention_hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        # The vision tower runs before the prefill inside generate(); keep its [CLS] rows for it, of every pass
        # (llava-torch's tower encodes a list of images one at a time).
        if self.projector_inputs.is_recording:
            hidden_states = args[0] if args else kwargs["hidden_states"]
            rows = cls_attention(module, hidden_states)
            previous = self.cls_attention
            self._local.cls_attention = rows if previous is None else torch.cat([previous, rows])

    @property
    def cls_attention(self) -> torch.Tensor | None:
        """(images, patches) [CLS] attention of this thread's last encoding for a prefill, if captured."""
        return getattr(self._local, "cls_attention", None)

    def cls_rows_for(self, images: object) -> torch.Tensor | None:
        """The (images, patches) [CLS] attention recorded for these image encoder outputs; None where their encoding
        passed no tower (precomputed outputs) or where they are not this thread's last encoding's (a forward that
        was handed outputs made elsewhere: the rows of an earlier call belong to other images)."""
        made = getattr(self._local, "images", None)
        return self.cls_attention if made is not None and made() is images else None

    def clear(self) -> None:
        self.projector_inputs.clear()
        self._local = threading.local()
