"""``zoo``: zeroth-order sensitivity through the projector, times diversity (ZOO-Prune, CVPR 2026)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .base import INPUT_PLACE, GreedyStrategy, TokenContext
from .diversity import matrix_bytes, memory_groups, rows, stacked_cosines
from .options import Option
from .registry import register_strategy


@register_strategy("zoo")
class ZOOPrune(GreedyStrategy):
    """How much the projector's output moves when a token's input moves, and how new the token is.

    No public code; implemented from the method's description (see docs/strategies notes):

    1. Sensitivity. For ``directions`` random unit vectors ``u_j`` in the projector's input space,
       ``S(i) = mean_j || M(x_i + h u_j) - M(x_i - h u_j) || / 2h`` with ``M`` the model's own
       projector (LLaVA MLP, Qwen merger), ``x_i`` the token's pre-projector features and ``h =
       step``. All perturbed passes run as a few large batches, in float32 (``h·u`` is about one
       bf16 ulp). ``S`` is min-max normalised to ``Ŝ``.
    2. Selection. First ``argmax Ŝ``; then ``argmax_{i not chosen} Ŝ(i)·(1 - max_{j chosen} cos(Z_i, Z_j))``
       with ``Z`` the projected tokens (the paper's product form, which beat a sum). A running
       maximum keeps the loop O(kN), and a group of images runs as one loop (the projector passes
       stay per image: each draws its own directions).

    Cost: ``2·directions`` projector passes over the image's tokens — at the defaults (64) about
    as many FLOPs as a 7B prefill on LLaVA-1.5, so ``eval/bench_selection.py`` reports it; the
    paper reports robustness for 16-160 directions, and ``directions=8`` is the cheap setting.
    ``rank`` projects the directions into a random ``rank``-dimensional subspace of the input
    (the low-rank variant reported for LLaVA-NeXT), which changes accuracy, not cost per pass.
    Directions are drawn from the per-image seed, so selection is deterministic.
    """

    needs = frozenset({"pre_features", "projector"})
    places = frozenset({INPUT_PLACE})
    directions = Option(int, at_least=1)
    step = Option(float, above=0)
    rank = Option(int, at_least=1, optional=True)
    chunk = Option(int, at_least=1)
    """Directions per batch of projector passes (memory, not results)."""

    def __init__(self, directions: int = 64, step: float = 0.01, rank: int | None = None, chunk: int = 16) -> None:
        self.directions, self.step, self.rank, self.chunk = directions, step, rank, chunk

    def sensitivity(self, ctx: TokenContext) -> Tensor:
        """(N,) finite-difference sensitivity of each token, before normalisation."""
        if ctx.pre_features is None or ctx.projector is None:
            raise ValueError(
                "zoo needs each token's pre-projector features, and some tokens of this image are not a projector "
                "output as such (LLaVA-OneVision's interpolated large images and pooled video frames)"
            )
        x = ctx.pre_features.float()
        generator = ctx.generator()
        width = x.shape[1]
        if self.rank is not None and self.rank < width:
            basis = torch.linalg.qr(torch.randn(width, self.rank, generator=generator))[0]  # (width, rank)
            directions = torch.randn(self.directions, self.rank, generator=generator) @ basis.T
        else:
            directions = torch.randn(self.directions, width, generator=generator)
        directions = (directions / directions.norm(dim=1, keepdim=True)).to(x.device)
        total = torch.zeros(x.shape[0], device=x.device)
        for start in range(0, self.directions, self.chunk):  # a few big batches, bounded memory
            u = directions[start : start + self.chunk, None, :] * self.step  # (c, 1, width)
            plus = ctx.projector((x[None] + u).reshape(-1, width))
            minus = ctx.projector((x[None] - u).reshape(-1, width))
            delta = (plus - minus).float().view(u.shape[0], x.shape[0], -1) / (2 * self.step)
            total += delta.norm(dim=-1).sum(dim=0)
        mean: Tensor = total / self.directions
        return mean

    def scores(self, ctx: TokenContext) -> Tensor:
        """The min-max normalised sensitivity ``Ŝ`` (the first factor of the greedy's criterion)."""
        return _normalised(self.sensitivity(ctx))

    def order_batch(self, contexts: Sequence[TokenContext]) -> list[Tensor]:
        orders: list[Tensor] = []
        for group in memory_groups(contexts, matrix_bytes(contexts, torch.float32)):
            score = torch.stack([_normalised(self.sensitivity(ctx)).double() for ctx in group])
            similarity = stacked_cosines(group, torch.float32, distances=False).to(score.device)
            orders += product_order(score, similarity, group[0].keep)
        return orders


def product_order(score: Tensor, similarity: Tensor, count: int) -> Tensor:
    """Per image ``argmax score``, then repeatedly ``argmax_{i not chosen} score(i)·(1 - max_{j chosen} cos(i, j))``.

    ``score`` (..., N), ``similarity`` (..., N, N) -> picks (..., count); a running maximum keeps it O(count·N) per
    image. Ties go to the lower index; chosen tokens are masked.
    """
    first = score.argmax(dim=-1)
    picks = [first]
    closest = rows(similarity, first)  # max cos to the chosen set
    chosen = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, first[..., None], True)
    for _ in range(count - 1):
        j = (score * (1 - closest)).masked_fill_(chosen, -torch.inf).argmax(dim=-1)
        picks.append(j)
        chosen.scatter_(-1, j[..., None], True)
        torch.maximum(closest, rows(similarity, j), out=closest)
    return torch.stack(picks, dim=-1)


def _normalised(score: Tensor) -> Tensor:
    """Min-max normalisation to [0, 1]; all ones when every token scores the same (decided on the device: no
    value is read back to the host)."""
    spread = score.max() - score.min()
    return torch.where(spread > 0, (score - score.min()) / spread, torch.ones_like(score))
