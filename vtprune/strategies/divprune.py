"""``divprune``: max-min diversity selection (DivPrune, Alvar et al., CVPR 2025)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import GreedyStrategy, TokenContext
from .diversity import (
    PRECISIONS,
    cosine_distances,
    matrix_bytes,
    max_min_order,
    memory_groups,
    order_scores,
    precision_dtype,
    stacked_cosines,
)
from .options import Option
from .registry import register_strategy


@register_strategy("divprune")
class DivPrune(GreedyStrategy):
    """Greedy max-min diversity over the cosine distance ``d = 1 - cos``.

    1. First pick: the most isolated token, ``argmax_j min_{i != j} d(i, j)``.
    2. Then repeatedly the token farthest from the chosen set, ``argmax_j min_{i in S} d(i, j)``.

    Ties go to the lower index (``argmax``), as in the reference code. Unlike the reference loop,
    chosen tokens are masked, so exact duplicate rows never make an index come out twice. A
    running min-distance vector makes the loop O(kN) after the O(N^2 D) distance matrix (the
    reference re-gathers every chosen row each step), and a group of images runs as one loop.
    The paper acts on the projected tokens before the LLM; the strategy itself works at either stage.

    ``precision`` is the dtype of the distances: ``"float32"`` (default) reproduces the reference
    code's picks on float32 tokens (the parity cases); the reference computes in the model's
    dtype, so ``"bfloat16"`` / ``"float16"`` reproduce what it picks on a bf16 / fp16 model
    (bf16 tokens are exact in float32, so nothing is lost on the way), and ``"float64"`` is the
    previous default.
    """

    precision = Option(str, choices=tuple(PRECISIONS))

    def __init__(self, precision: str = "float32") -> None:
        self.precision = precision

    @property
    def dtype(self) -> torch.dtype:
        return precision_dtype(self.precision)

    def order_batch(self, contexts: Sequence[TokenContext]) -> list[Tensor]:
        orders: list[Tensor] = []
        for group in memory_groups(contexts, matrix_bytes(contexts, self.dtype)):
            # The matrices are a temporary, so they are gone before the next group's are made.
            orders += max_min_order(stacked_cosines(group, self.dtype, distances=True), group[0].keep)[0]
        return orders

    def scores(self, ctx: TokenContext) -> Tensor:
        """Each token's cosine distance to the tokens picked before it, in the greedy order over all tokens."""
        return order_scores(*max_min_order(cosine_distances(ctx.features, self.dtype), ctx.num_tokens))

    def __repr__(self) -> str:
        return f"DivPrune(precision={self.precision!r})"
