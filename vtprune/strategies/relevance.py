"""Where the instruction meets the visual tokens: the question and the tokens as vectors of one space.

CDPruner and TRIM score each visual token by its similarity to the instruction. Two sources:

- ``text_tower=None`` (default): the LLM's own input-embedding rows of the question words
  (``ctx.text_embeds``, as MMTok) against the projected tokens (``ctx.features``), the form OpenVINO
  GenAI ships; it needs nothing beyond the model and works on every family.
- ``text_tower="<CLIP id or folder>"`` or ``"open_clip:<model>/<pretrained>"``: the papers' form, the
  instruction text (``ctx.instruction``) encoded by a CLIP text tower against the CLIP image embeddings
  of the features the projector read (``ctx.pre_features``); see :mod:`vtprune.strategies.text_towers`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import TokenContext
from .text_towers import TextTower, load_text_tower


def unit_rows(x: Tensor) -> Tensor:
    """Rows scaled to unit norm in float32; zero rows stay zero (cosine 0 to everything).

    Rows in another dtype (the context keeps the model's) are converted into a new tensor, which is divided in place:
    one float32 copy, not two."""
    rows = x.float()
    norms = rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    unit: Tensor = rows / norms if rows is x else rows.div_(norms)
    return unit


class InstructionSpace:
    """The relevance source of a strategy: which inputs it needs and the (text, tokens) vectors it compares."""

    def __init__(self, text_tower: str | None = None) -> None:
        self.text_tower = text_tower
        # Loaded when the strategy is built, so an unusable text_tower is refused before any model is touched;
        # copies for other devices are loaded on first use there.
        cpu = torch.device("cpu")
        self._towers: dict[torch.device, TextTower] = (
            {} if text_tower is None else {cpu: load_text_tower(text_tower, cpu)}
        )
        self.needs = frozenset({"text_embeds"}) if text_tower is None else frozenset({"instruction", "pre_features"})

    def vectors(self, ctx: TokenContext) -> tuple[Tensor | None, Tensor]:
        """(question vectors (m, P) or None when there is no question, token vectors (N, P)), unit rows."""
        if self.text_tower is None:
            text = ctx.text_embeds
            if text is not None and text.shape[1] != ctx.features.shape[1]:
                raise ValueError(
                    f"question embeddings have width {text.shape[1]}, the tokens {ctx.features.shape[1]}: "
                    "LLM-embedding relevance compares them before the LLM"
                )
            tokens = ctx.features
        else:
            if ctx.pre_features is None:
                raise ValueError(
                    f"text_tower={self.text_tower!r} compares the instruction with the features the projector "
                    "read; this model's are not available here (use the default LLM-embedding relevance)"
                )
            tower = self.tower(ctx.pre_features.device)
            tokens = tower.encode_image(ctx.pre_features)
            text = None if not ctx.instruction else tower.encode_text(ctx.instruction)
        if text is not None and text.shape[0] == 0:
            text = None
        return (None if text is None else unit_rows(text)), unit_rows(tokens)

    def tower(self, device: torch.device) -> TextTower:
        if device not in self._towers:
            assert self.text_tower is not None, "only the text_tower= form reads a tower"
            self._towers[device] = load_text_tower(self.text_tower, device)
        return self._towers[device]
