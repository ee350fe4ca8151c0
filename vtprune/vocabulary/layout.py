"""Sequence layouts: which slot of the previous sequence each slot of a shortened one came from.

Every tensor that runs along the sequence (ids, masks, positions, hidden states, rotary tables)
is shortened with the same :class:`Layout`, so a kept token keeps its original position and
every row stays aligned with its mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Layout:
    """``source[b, j]`` is the slot of the previous layout that slot ``j`` of row ``b`` holds (-1: filler)."""

    source: Tensor
    previous_length: int

    @property
    def length(self) -> int:
        return self.source.shape[1]

    def take(self, x: Tensor, seq_dim: int = 1, fill: float | int | bool = 0) -> Tensor:
        """Gather ``x`` along ``seq_dim`` (batch is the dim before it); filler slots get ``fill``."""
        return take(x, self.source, seq_dim=seq_dim, fill=fill)

    def extend_mask(self, mask: Tensor) -> Tensor:
        """Map a 2-D mask of the previous layout, grown by decoded tokens, to this layout.

        The first ``previous_length`` columns are reordered; the columns after them (tokens decoded
        since the prefill) are appended unchanged.
        """
        head = self.take(mask[:, : self.previous_length], fill=0)
        return torch.cat([head, mask[:, self.previous_length :]], dim=1)


def take(x: Tensor, source: Tensor, seq_dim: int = 1, fill: float | int | bool = 0) -> Tensor:
    """``x[..., b, source[b, j], ...]`` for every row ``b``, with ``fill`` where ``source`` is -1."""
    batch_dim = seq_dim - 1
    source = source.to(x.device)  # layers may sit on other devices (device_map="auto")
    rows, length = source.shape
    if x.shape[batch_dim] != rows:  # e.g. position ids shaped (1, L) shared by all rows
        x = x.expand(*x.shape[:batch_dim], rows, *x.shape[batch_dim + 1 :])
    lead, rest = x.shape[:batch_dim], x.shape[seq_dim + 1 :]
    view = (1,) * len(lead) + (rows, length) + (1,) * len(rest)
    index = source.clamp(min=0).view(view).expand(*lead, rows, length, *rest)
    out = x.gather(seq_dim, index)
    return out.masked_fill((source < 0).view(view).expand_as(out), fill)


def pack(keep: Tensor, left_pad: bool) -> Layout:
    """Layout that keeps the slots where ``keep`` (B, L) is true, in order, padded to the longest row.

    Old padding is not kept (its slots are false in ``keep``); rows are re-padded with filler on
    the left (``left_pad``) or the right, like the input was.
    """
    counts = keep.sum(dim=1)
    length = int(counts.max()) if keep.numel() else 0
    source = torch.full((keep.shape[0], length), -1, dtype=torch.long, device=keep.device)
    rows, cols = keep.nonzero(as_tuple=True)
    rank = keep.long().cumsum(dim=1)[rows, cols] - 1
    offset = (length - counts)[rows] if left_pad else 0
    source[rows, rank + offset] = cols
    return Layout(source, previous_length=keep.shape[1])


def last_valid(valid: Tensor) -> Tensor:
    """(B,) index of each row's last real slot, for left or right padding alike."""
    return valid.long().cumsum(dim=1).argmax(dim=1)
