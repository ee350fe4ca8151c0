"""What the projector read for each visual token, so strategies can see pre-projector features.

A forward hook on the projector (LLaVA's MLP, Qwen's merger) records its inputs and outputs. A
visual token the LLM receives is an output row — moved around by AnyRes packing and unpadding, by
Qwen2.5-VL's window order, or by generate()'s beam expansion, but not changed — so its
pre-projector features are found by matching its value against the recorded outputs. This needs
no copy of any model's packing code. Tokens that are not a projector output as such (AnyRes
newline tokens; OneVision's interpolated large images and pooled video frames) have none.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class ProjectorInputs:
    def __init__(self, rows_per_token: int) -> None:
        self.rows_per_token = rows_per_token
        self._calls: list[tuple[Tensor, Tensor]] = []
        self._index: dict[bytes, Tensor] | None = None

    def hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Tensor) -> None:
        inputs = (args[0] if args else next(iter(kwargs.values()))).detach()
        outputs = output.detach().reshape(-1, output.shape[-1])
        self._calls.append((inputs.reshape(outputs.shape[0], -1), outputs))
        self._index = None

    def clear(self) -> None:
        self._calls.clear()
        self._index = None

    def lookup(self, tokens: Tensor, newline: Tensor | None = None) -> Tensor | None:
        """(N, rows·D_vision) projector inputs of these tokens; zeros for newline tokens; None if any other is unknown."""
        if self._index is None:
            self._index = {
                row.numpy().tobytes(): source
                for inputs, outputs in self._calls
                for row, source in zip(outputs.cpu(), inputs)
            }
        if not self._index:
            return None
        width = next(iter(self._index.values())).shape[0]
        found = []
        for position, row in enumerate(tokens.detach().cpu()):
            source = self._index.get(row.numpy().tobytes())
            if source is None:
                if newline is None or not bool(newline[position]):
                    return None
                source = torch.zeros(width, dtype=tokens.dtype, device=tokens.device)
            found.append(source.to(tokens.device))
        return torch.stack(found)
