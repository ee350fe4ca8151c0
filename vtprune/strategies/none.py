"""``none``: keep every token (the unpruned baseline)."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Strategy, TokenContext
from .registry import register_strategy


@register_strategy("none")
class NoPruning(Strategy):
    """Keep all N tokens: the reference point every pruned run is compared with.

    It takes no budget (``needs_budget = False``); ``ctx.keep`` is ignored and the engine treats
    the strategy as keep-all.
    """

    needs_budget = False

    def select(self, ctx: TokenContext) -> Tensor:
        return torch.arange(ctx.num_tokens, dtype=torch.int64)
