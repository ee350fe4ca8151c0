"""``trim``: instruction-relevant outliers plus one merged token (TRIM, Song et al., arXiv 2409.10994, COLING 2025)."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import MergingStrategy, TokenContext
from .options import Option
from .registry import register_strategy
from .relevance import InstructionSpace

#: Tukey's fences: a token is an outlier above ``Q3 + IQR_FACTOR·(Q3 - Q1)``.
IQR_FACTOR = 1.5


def iqr_outliers(scores: Tensor) -> Tensor:
    """Ascending indices of the scores above ``Q3 + 1.5·IQR`` (quartiles by linear interpolation, ``torch.quantile``)."""
    q1, q3 = torch.quantile(scores, torch.tensor([0.25, 0.75], dtype=scores.dtype, device=scores.device))
    outliers: Tensor = (scores > q3 + IQR_FACTOR * (q3 - q1)).nonzero()[:, 0]
    return outliers


@register_strategy("trim")
class TRIM(MergingStrategy):
    """Keep the tokens most similar to the instruction; replace all the others by their average.

    1. Relevance ``s = softmax_i(mean_t cos(T_t, V_i) / temperature)`` over the N tokens, with T the
       question's vectors and V the tokens' (source as for ``cdpruner``: the LLM's input embeddings of the
       question words against the projected tokens by default, or a CLIP text tower with
       ``text_tower=``, the paper's form). ``temperature=0.01`` is CLIP's logit scale (100).
    2. Kept: with a budget ``keep``, the ``keep - 1`` highest ``s`` (ties to the lower index), so the image
       ends with ``keep`` tokens; with ``adaptive=True`` (the paper's method, no budget) the IQR outliers
       ``s > Q3 + 1.5·(Q3 - Q1)`` — as many as the image has; the record shows the count per image.
    3. One merged token, the plain average of every token not kept, appended as TRIM does: it takes the
       sequence slot and original position id (1-D or M-RoPE) of the last (highest-index) token it
       averages, so it comes after every kept token of the image that precedes that slot. With no
       remaining tokens there is none; with ``keep = 1`` it is the average of the whole image.

    Fallback (documented, not the paper's): without question words every ``s`` is equal — no outliers
    (adaptive: only the merged token), and the budgeted form keeps the first tokens in index order.
    """

    adaptive = Option(bool)
    temperature = Option(float, above=0)
    text_tower = Option(str, optional=True)

    def __init__(self, adaptive: bool = False, temperature: float = 0.01, text_tower: str | None = None) -> None:
        self.adaptive, self.temperature, self.text_tower = adaptive, temperature, text_tower
        self.needs_budget = not self.adaptive  # shadows the class attribute: the adaptive form takes no budget
        self.space = InstructionSpace(self.text_tower)
        self.needs = self.space.needs

    def scores(self, ctx: TokenContext) -> Tensor:
        """(N,) the softmax relevance of each token to the instruction."""
        text, tokens = self.space.vectors(ctx)
        if text is None:
            return tokens.new_full((tokens.shape[0],), 1.0 / tokens.shape[0])
        return torch.softmax((tokens @ text.T).mean(dim=1) / self.temperature, dim=0)

    def kept(self, ctx: TokenContext) -> Tensor:
        """Ascending indices of the tokens kept as they are."""
        scores = self.scores(ctx)
        if self.adaptive:
            return iqr_outliers(scores)
        return scores.argsort(descending=True, stable=True)[: ctx.keep - 1].sort().values

    def merge(self, ctx: TokenContext) -> tuple[Tensor, Tensor]:
        n = ctx.num_tokens
        kept = self.kept(ctx).cpu()
        rest = torch.ones(n, dtype=torch.bool)
        rest[kept] = False
        weights = torch.eye(n)[kept]
        places = kept
        if bool(rest.any()):
            average = rest.float() / rest.sum()
            places = torch.cat([kept, rest.nonzero()[-1]])
            weights = torch.cat([weights, average[None]])
            order = places.argsort()
            places, weights = places[order], weights[order]
        return places, weights

    def __repr__(self) -> str:
        return f"TRIM(adaptive={self.adaptive}, temperature={self.temperature}, text_tower={self.space.text_tower!r})"
