"""``random``: a seeded uniform random subset (the baseline every pruning table needs)."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Strategy, TokenContext
from .registry import register_strategy


@register_strategy("random")
class RandomPruning(Strategy):
    """Keep a uniformly random subset of ``ctx.keep`` tokens.

    The subset is the first ``keep`` entries of a permutation drawn from ``ctx.generator()``, so
    it depends only on ``ctx.seed`` and N (the engine derives the seed from the sample's content,
    so batching cannot change it). Because the generator lives on the CPU, the result is the same
    on every device.
    """

    def select(self, ctx: TokenContext) -> Tensor:
        perm = torch.randperm(ctx.num_tokens, generator=ctx.generator(), dtype=torch.int64)
        return perm[: ctx.keep].sort().values
