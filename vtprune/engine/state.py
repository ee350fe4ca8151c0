"""What one prefill decided, kept for the decoder layers that follow and for every decode step.

A ``PruneState`` lives on the ``DynamicCache`` of the generate() call that made it (a new cache per
call, so it can never be stale), and on the handle for the forward in progress.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from ..record import ImageRecord
from ..vocabulary.layout import Layout, take

#: Attribute name of the state on a cache object.
STATE_ATTR = "_vtprune_state"


@dataclass
class VisualItem:
    """One image or video of one row: where its placeholder tokens sit and what it has kept so far."""

    row: int
    modality: str
    columns: Tensor
    """(N,) columns of its tokens in the original sequence."""
    seed: int
    newline: Tensor | None
    record: ImageRecord

    def seed_at(self, layer: int) -> int:
        """A separate, still content-derived seed for a decoder stage at ``layer``."""
        return zlib.crc32(f"{self.seed}|{layer}".encode())


@dataclass
class PruneState:
    items: list[VisualItem]
    valid: Tensor
    """(B, L) real tokens of the current layout (not padding, not filler)."""
    item_of_slot: Tensor
    """(B, L) which item each slot of the current layout belongs to (-1: text)."""
    token_of_slot: Tensor
    """(B, L) index of each visual slot in its item's own token order (-1: text)."""
    left_pad: bool
    seen: int
    """Tokens of the sequence generate()'s mask counts so far: prompt length, then +1 per decode step. That is the
    original (unpruned) layout, unless the model took the packed sequence as its own (``dropped_from_input``)."""
    prompt: Tensor
    """(B, L) the prompt's real tokens: ``valid`` without the tokens a cache-less generate() appended. Selection
    reads only these (question words, the scoring query), so every step of such a call picks the same tokens."""
    input_layout: Layout | None = None
    """Layout the LLM input was packed into, while the model's mask counts the original layout (None: the input
    was left as it was, or the model took the packed sequence as its own)."""
    packed: bool = False
    """Whether the input stage packed the sequence; it stays set where ``input_layout`` is cleared because the model
    took the packed sequence as its own (models that splice their visual rows themselves)."""
    dropped_from_input: int = 0
    """Where the model took the packed sequence as its own: the tokens the input stage dropped from it, which
    ``seen`` no longer counts."""
    decoder_layouts: dict[int, Layout] = field(default_factory=dict)
    """Decoder layer -> layout its stage packed the hidden states into (identity layouts are left out)."""
    next_position: Tensor | None = None
    """Position ids ((B,) or (rows, B)) of the next decoded token, once the input was packed."""
    position_shift: Tensor | None = None
    """With renumbered positions: per row, original minus renumbered position of the last prompt token."""
    prefilling: bool = True
    attention: dict[int, Tensor] = field(default_factory=dict)
    """Decoder layer K -> (B, L) last-token attention measured at layer K-1, for strategies that need it."""
    cross_shares: dict[int, Tensor] = field(default_factory=dict)
    """Decoder layer K -> (B, 2) text->visual and visual->text attention shares at layer K-1."""
    layer_inputs: tuple | None = None
    """(4-D mask, position embeddings, position ids) that replace the text model's from the last pruning layer on."""
    decoder_source: Tensor | None = None
    """(B, L) slot of the decoder's input sequence that each current slot holds, once the decoder pruned."""
    step_masks: dict[int, Tensor] = field(default_factory=dict)
    """Decode step: decoder layer K -> 2-D mask in the layout of layers >= K."""
    step_causal: dict[int, object] = field(default_factory=dict)

    @property
    def original_length(self) -> int:
        """Tokens of the original (unpruned) sequence so far, prompt and decoded."""
        return self.seen + self.dropped_from_input

    def apply(self, layout: Layout) -> None:
        """Move the per-slot bookkeeping to ``layout``."""
        self.valid = layout.take(self.valid, fill=False)
        self.prompt = layout.take(self.prompt, fill=False)
        self.item_of_slot = layout.take(self.item_of_slot, fill=-1)
        self.token_of_slot = layout.take(self.token_of_slot, fill=-1)

    def repeat_rows(self, times: int) -> PruneState:
        """This prefill's state for a batch whose rows were each repeated ``times`` times in a row (generate()'s
        beams and returned sequences), with one item (and record) per copy, in row-major order."""
        rows = self.valid.shape[0]
        order = [(index, copy) for row in range(rows) for copy in range(times) for index in self._items_of(row)]
        table = torch.full((times, max(len(self.items), 1)), -1, dtype=torch.long, device=self.valid.device)
        items = []
        for new_index, (index, copy) in enumerate(order):
            table[copy, index] = new_index
            item = self.items[index]
            row = item.row * times + copy
            record = replace(item.record, row=row, kept_by_stage=dict(item.record.kept_by_stage))
            record.scores_by_stage = dict(item.record.scores_by_stage)
            items.append(replace(item, row=row, record=record))
        copies = torch.arange(rows * times, device=self.valid.device) % times
        item_of_slot = self.item_of_slot.repeat_interleave(times, dim=0)
        item_of_slot = torch.where(item_of_slot >= 0, table[copies[:, None], item_of_slot.clamp(min=0)], -1)
        return replace(
            self,
            items=items,
            valid=self.valid.repeat_interleave(times, dim=0),
            item_of_slot=item_of_slot,
            token_of_slot=self.token_of_slot.repeat_interleave(times, dim=0),
            prompt=self.prompt.repeat_interleave(times, dim=0),
        )

    def _items_of(self, row: int) -> list[int]:
        return [index for index, item in enumerate(self.items) if item.row == row]

    def compose_decoder_source(self, layout: Layout) -> None:
        base = layout.source if self.decoder_source is None else take(self.decoder_source, layout.source, fill=-1)
        self.decoder_source = base

    def kept_tokens(self, item_index: int) -> Tensor:
        """The item's tokens still present in the current layout, in its own token order."""
        item = self.items[item_index]
        slots = self.item_of_slot[item.row] == item_index
        return self.token_of_slot[item.row][slots].sort().values.cpu()

    def begin_decode_step(self, mask: Tensor) -> Tensor:
        """Map generate()'s original-layout 2-D mask to the LLM input layout; prepare decoder masks."""
        self.seen = mask.shape[1]
        self.step_causal.clear()
        current = mask if self.input_layout is None else self.input_layout.extend_mask(mask)
        input_mask = current
        for layer in sorted(self.decoder_layouts):
            current = self.decoder_layouts[layer].extend_mask(current)
            self.step_masks[layer] = current
        return input_mask

    def governing_layer(self, layer: int) -> int | None:
        """The last decoder layer <= ``layer`` whose stage changed the layout."""
        done = [k for k in self.decoder_layouts if k <= layer]
        return max(done) if done else None


def ones_mask(rows: int, length: int, device: torch.device) -> Tensor:
    return torch.ones(rows, length, dtype=torch.long, device=device)
