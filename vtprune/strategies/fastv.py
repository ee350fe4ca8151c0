"""``fastv``: keep the tokens the last prompt token attends to most (FastV, Chen et al., ECCV 2024)."""

from __future__ import annotations

from torch import Tensor

from .base import DECODER_PLACE, Strategy, TokenContext
from .registry import register_strategy


@register_strategy("fastv")
class FastV(Strategy):
    """Top-``keep`` tokens by the attention the last prompt token pays them at decoder layer K.

    The engine supplies ``ctx.attention`` (heads averaged) at the layer it prunes at; FastV's paper
    uses K = 2 and drops 50-75 % of the visual tokens. Ties go to the lower index (stable sort).
    """

    needs = frozenset({"attention"})
    places = frozenset({DECODER_PLACE})

    def select(self, ctx: TokenContext) -> Tensor:
        attention = ctx.attention
        n = ctx.num_tokens
        if attention is None or attention.ndim != 1 or attention.shape[0] != n:
            got = "None" if attention is None else f"shape {tuple(attention.shape)}"
            raise ValueError(
                f"fastv needs ctx.attention of shape ({n},), got {got}. fastv acts inside the decoder "
                "(layer=K), where the engine supplies the last prompt token's attention to the visual tokens."
            )
        ranked = attention.sort(descending=True, stable=True).indices
        return ranked[: ctx.keep].sort().values

    def scores(self, ctx: TokenContext) -> Tensor | None:
        """The attention the last prompt token pays each token (what FastV ranks by)."""
        return None if ctx.attention is None else ctx.attention.clone()
