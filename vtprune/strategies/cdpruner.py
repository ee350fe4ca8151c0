"""``cdpruner``: conditional diversity by a DPP (CDPruner, Zhang et al., arXiv 2506.10967, NeurIPS 2025)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import INPUT_PLACE, GreedyStrategy, TokenContext
from .diversity import rows
from .options import Option
from .registry import register_strategy
from .relevance import InstructionSpace

#: A pick whose determinant gain is at most this has nothing left to add: the kernel's rank is exhausted.
RANK_EPS = 1e-10


def dpp_greedy_order(kernel: Tensor, count: int) -> Tensor:
    """Greedy MAP inference of a DPP with kernel ``kernel`` (..., N, N), PSD: picks (..., count).

    Each step adds the token ``j`` maximising ``det(L_{S+j})``, i.e. its Schur complement
    ``d_j^2 = L_jj - L_jS L_S^-1 L_Sj``, kept up to date by the incremental Cholesky factor of
    Chen, Zhang & Zhou (NeurIPS 2018, Alg. 1): for the pick ``j``, every token's new factor entry is
    ``e_i = (L_ji - <c_j, c_i>) / d_j`` and ``d_i^2 -= e_i^2``. O(N·count²) per matrix after the
    kernel, a few elementwise tensor ops per step for a whole group of images (no matmul whose
    summation order could depend on the group size). Ties go to the lower index (``argmax``);
    chosen tokens are masked. Once the best gain is at most :data:`RANK_EPS` the kernel has no
    rank left for this set (exact duplicates, or zero-quality tokens): the remaining picks follow
    the diagonal ``L_ii`` (the tokens' quality), ties again to the lower index.
    """
    *batch, n, _ = kernel.shape
    diagonal = kernel.diagonal(dim1=-2, dim2=-1)
    gains = diagonal.clone()
    factor = kernel.new_zeros(*batch, count, n)
    taken = torch.zeros(*batch, n, dtype=torch.bool, device=kernel.device)
    exhausted = torch.zeros(batch, dtype=torch.bool, device=kernel.device)
    picks = []
    for step in range(count):
        score = torch.where(exhausted[..., None], diagonal, gains).masked_fill(taken, -torch.inf)
        j = score.argmax(dim=-1)
        picks.append(j)
        taken.scatter_(-1, j[..., None], True)
        if step == count - 1:
            break
        gain = gains.gather(-1, j[..., None]).squeeze(-1)
        exhausted |= gain <= RANK_EPS
        earlier = factor[..., :step, :]
        at_j = earlier.gather(-1, j[..., None, None].expand(*batch, step, 1))
        residual = rows(kernel, j) - (earlier * at_j).sum(dim=-2)
        entry = residual / gain.clamp_min(RANK_EPS).sqrt()[..., None]
        entry = entry.masked_fill(exhausted[..., None], 0.0)
        factor[..., step, :] = entry
        gains = gains - entry * entry
    return torch.stack(picks, dim=-1)


@register_strategy("cdpruner")
class CDPruner(GreedyStrategy):
    """Keep the visual tokens that are diverse *given the instruction*: greedy MAP of a conditional DPP.

    With V the token vectors and T the question's vectors (see below), all rows unit-normalised:

    1. relevance ``r_i = mean_t cos(T_t, V_i)``, negated with ``negative_relevance=True``, then
       min-max normalised to [0, 1] (all ones when every token is equally relevant);
    2. quality ``q = r`` (the paper's kernel), or ``q = exp(α·r)`` with ``α = θ / (2(1-θ))`` when
       ``theta`` is given: then ``log det L_S = (θ/(1-θ))·Σ_{i∈S} r_i + log det S_S``, the relevance /
       diversity trade-off of Chen et al. (2018) that OpenVINO GenAI exposes as ``relevance_weight``
       (``theta=0``: plain diversity, a DPP on S alone);
    3. similarity ``S = cos(V, V)`` in float32 and kernel ``L = diag(q)·S·diag(q)``;
    4. :func:`dpp_greedy_order` picks ``keep`` tokens (exact fast greedy MAP; nested keep sets).

    Relevance source (``text_tower``): by default T are the LLM's input-embedding rows of the row's
    question words (``text_embeds``, stop-words dropped when a tokenizer is passed, as for ``mmtok``)
    and V the projected tokens — OpenVINO's form, on every family. With ``text_tower=`` (a
    transformers CLIP id or folder, or ``open_clip:<model>/<pretrained>``) T is the instruction
    encoded by that CLIP text tower (one row per 77-token segment) and V the CLIP image embeddings
    of the features the projector read (:mod:`vtprune.strategies.text_towers`), which then also give S — the
    paper's form. The paper negates the relevance for CLIP-tower LLaVA models (their patch features
    anti-correlate with the text); ``negative_relevance`` is that switch, off by default.

    Fallback (documented, not the paper's): without question words the relevance is uniform and
    the strategy is a DPP on S. The paper prunes the tokens before the LLM; so does this strategy.
    """

    places = frozenset({INPUT_PLACE})

    theta = Option(float, at_least=0, below=1, optional=True)
    negative_relevance = Option(bool)
    text_tower = Option(str, optional=True)

    def __init__(
        self, theta: float | None = None, negative_relevance: bool = False, text_tower: str | None = None
    ) -> None:
        self.theta, self.negative_relevance, self.text_tower = theta, negative_relevance, text_tower
        self.space = InstructionSpace(self.text_tower)
        self.needs = self.space.needs

    def order_batch(self, contexts: Sequence[TokenContext]) -> list[Tensor]:
        # Per image, as the diversity strategies do: the group must see exactly the kernel each image gets alone.
        kernels = torch.stack([self.kernel(ctx) for ctx in contexts])
        return list(dpp_greedy_order(kernels, contexts[0].keep))

    def relevance(self, ctx: TokenContext) -> Tensor:
        """(N,) the min-max normalised instruction relevance of each token (ones without a question)."""
        return self._relevance(*self.space.vectors(ctx))

    def kernel(self, ctx: TokenContext) -> Tensor:
        """(N, N) float32 conditional kernel ``diag(q)·S·diag(q)``."""
        text, tokens = self.space.vectors(ctx)
        r = self._relevance(text, tokens)
        quality = r if self.theta is None else torch.exp(self.theta / (2 * (1 - self.theta)) * r)
        return quality[:, None] * (tokens @ tokens.T) * quality[None, :]

    def _relevance(self, text: Tensor | None, tokens: Tensor) -> Tensor:
        if text is None:
            return tokens.new_ones(tokens.shape[0])
        r = (tokens @ text.T).mean(dim=1)
        if self.negative_relevance:
            r = -r
        low, spread = r.min(), r.max() - r.min()
        # A select, not an `if`: reading the spread back to the host would synchronise a GPU.
        normalised = (r - low) / spread.clamp_min(torch.finfo(r.dtype).tiny)
        return torch.where(spread > 0, normalised, torch.ones_like(r))
