"""What the projector read for each visual token, so strategies can see pre-projector features.

A forward hook on the projector (LLaVA's MLP, Qwen's merger) records its inputs and outputs. A
visual token the LLM receives is an output row — moved around by AnyRes packing and unpadding, by
Qwen2.5-VL's window order, or by generate()'s beam expansion, but not changed — so its
pre-projector features are found by matching its value against the recorded outputs. This needs
no copy of any model's packing code. Tokens that are not a projector output as such (AnyRes
newline tokens; OneVision's interpolated large images and pooled video frames) have none.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn


class ProjectorInputs:
    """The projector calls of the last encoding this thread ran for a prefill (``recording()``), and no others.

    A projector call outside such an encoding (``get_image_features`` by a user, a probe) is not kept. The
    calls of one encoding stay until the next encoding starts, so every step of a cache-less generate()
    (which re-runs the prefill on the same encoder outputs) finds them. Per thread: a prefill reads what its
    own thread encoded.
    """

    def __init__(self, rows_per_token: int) -> None:
        self.rows_per_token = rows_per_token
        self._local = threading.local()

    @property
    def _calls(self) -> list[tuple[Tensor, Tensor]]:
        return getattr(self._local, "calls", [])

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Record the projector calls of the block, in place of the previous encoding's."""
        self._local.calls, self._local.index, self._local.recording = [], None, True
        try:
            yield
        finally:
            self._local.recording = False

    @property
    def has_calls(self) -> bool:
        """Whether this thread's last encoding called the projector."""
        return bool(self._calls)

    @property
    def is_recording(self) -> bool:
        return getattr(self._local, "recording", False)

    def hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Tensor) -> None:
        if not self.is_recording:
            return
        inputs = (args[0] if args else next(iter(kwargs.values()))).detach()
        outputs = output.detach().reshape(-1, output.shape[-1])
        self._local.calls.append((inputs.reshape(outputs.shape[0], -1), outputs))
        self._local.index = None

    def clear(self) -> None:
        self._local.calls, self._local.index = [], None

    def lookup(self, tokens: Tensor, newline: Tensor | None = None) -> Tensor | None:
        """(N, rows·D_vision) projector inputs of these tokens; zeros for newline tokens; None if any other is unknown."""
        if getattr(self._local, "index", None) is None:
            self._local.index = {
                _key(row): source for inputs, outputs in self._calls for row, source in zip(outputs.cpu(), inputs)
            }
        index = self._local.index
        if not index:
            return None
        width = next(iter(index.values())).shape[0]
        found = []
        for position, row in enumerate(tokens.detach().cpu()):
            source = index.get(_key(row))
            if source is None:
                if newline is None or not bool(newline[position]):
                    return None
                source = torch.zeros(width, dtype=tokens.dtype, device=tokens.device)
            found.append(source.to(tokens.device))
        return torch.stack(found)


def _key(row: Tensor) -> bytes:
    """The exact bits of one row (numpy has no bfloat16, so they are read as bytes)."""
    return row.contiguous().view(torch.uint8).numpy().tobytes()
