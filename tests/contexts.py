"""Inputs for any registered strategy: every TokenContext field a strategy may need, filled with seeded data.

The contract, property and option tests run over ``list_strategies()``; registration refuses ``needs`` outside the
TokenContext fields, so a context from :func:`full_inputs` serves every strategy there is, a new one included.
"""

from __future__ import annotations

from typing import Any

import torch

from vtprune.strategies.base import TokenContext

PRE_WIDTH = 6


def full_inputs(n: int, dim: int, seed: int) -> dict[str, Any]:
    """Per-image inputs for ``n`` tokens of width ``dim``: the features and every optional context field.

    ``n`` must factor as the grid below describes (``grid = (1, h, w)`` with ``h * w == n``, h the largest divisor
    of n not above its square root), so pooling strategies have a grid.
    """
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(PRE_WIDTH, dim, generator=generator)
    pre = torch.randn(n, PRE_WIDTH, generator=generator)

    def projector(rows: torch.Tensor) -> torch.Tensor:
        return torch.tanh(rows @ weight)

    h = max(d for d in range(1, int(n**0.5) + 1) if n % d == 0)
    return {
        "features": projector(pre) + 0.05 * torch.randn(n, dim, generator=generator),
        "seed": seed,
        "grid": (1, h, n // h),
        "attention": torch.rand(n, generator=generator),
        "text_embeds": torch.randn(3, dim, generator=generator),
        "pre_features": pre,
        "projector": projector,
        "cls_attention": torch.rand(n, generator=generator),
        "cross_shares": torch.rand(2, generator=generator) * 0.2,
    }


def full_context(n: int, keep: int, seed: int, dim: int = 5) -> TokenContext:
    return TokenContext(keep=keep, **full_inputs(n, dim, seed))


def assert_valid_selection(strategy: Any, kept: torch.Tensor, ctx: TokenContext) -> None:
    """The Strategy.select contract: unique int64 indices in [0, N), ascending; exactly ``keep`` of them for a
    budgeted strategy that selects (a merging one rounds the count its own way, one without a budget decides)."""
    from vtprune.strategies.base import MergingStrategy

    assert isinstance(kept, torch.Tensor) and kept.dtype == torch.int64 and kept.ndim == 1
    if kept.numel():
        assert int(kept.min()) >= 0 and int(kept.max()) < ctx.num_tokens
        assert bool((kept[1:] > kept[:-1]).all()), f"not strictly ascending: {kept.tolist()}"
    if strategy.needs_budget and not isinstance(strategy, MergingStrategy):
        assert kept.numel() == ctx.keep
