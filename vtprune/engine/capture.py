"""What the vision side made during this thread's last image encoding for a prefill, for strategies that read it:
the projector's inputs per token (``pre_features``) and the vision tower's [CLS] attention (``cls_attention``)."""

from __future__ import annotations

import threading
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
        self._local = threading.local()

    @contextmanager
    def encoding(self) -> Iterator[None]:
        """The block encodes images for a prefill: what it makes replaces the previous encoding's."""
        self._local.cls_attention = None
        with self.projector_inputs.recording():
            yield

    def cls_attention_hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        # The vision tower runs before the prefill inside generate(); keep its [CLS] row for it.
        if self.projector_inputs.is_recording:
            hidden_states = args[0] if args else kwargs["hidden_states"]
            self._local.cls_attention = cls_attention(module, hidden_states)

    @property
    def cls_attention(self) -> torch.Tensor | None:
        """(images, patches) [CLS] attention of this thread's last encoding for a prefill, if captured."""
        return getattr(self._local, "cls_attention", None)

    def clear(self) -> None:
        self.projector_inputs.clear()
        self._local = threading.local()
