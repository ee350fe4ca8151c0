"""``mmtok``: multimodal coverage maximisation (MMTok, ICLR 2026)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import coverage
from .base import GreedyStrategy, TokenContext
from .coverage import coverage_order
from .options import Option
from .registry import register_strategy
from .relevance import unit_rows

VARIANTS = ("multimodal", "vision", "text")


def _coverage_probabilities(queries: Tensor, keys: Tensor, temperature: float) -> Tensor:
    """Row-softmax of ``cos(queries, keys) / temperature`` in float32: how well each key covers each query."""
    # float32 as in the reference; the parity cases are reproduced exactly in float32.
    q = unit_rows(queries)
    k = q if keys is queries else unit_rows(keys)
    logits = (q @ k.T).div_(temperature)
    del q, k  # only the logits and the probabilities are alive at once
    return torch.softmax(logits, dim=1)


@register_strategy("mmtok")
class MMTok(GreedyStrategy):
    """Greedy coverage of the question and of the image itself by the kept tokens.

    With T (m, D) the question words' input-embedding rows (``ctx.text_embeds``), V (n, D) the
    tokens (``ctx.features``) and C (n, Dc) the pre-projector features (``ctx.pre_features``):

    - ``P = softmax_rows(cos(T, V) / text_temp)`` (m, n): how well token j covers question word i;
    - ``Q = softmax_rows(cos(C, C) / vision_temp)`` (n, n): how well token j covers token i;
    - ``f(S) = (1/m) sum_i max_{j in S} P_ij + alpha (1/n) sum_i max_{j in S} Q_ij``, monotone
      submodular, maximised greedily (a ``1 - 1/e`` approximation) over the rows of ``[P/m ; alpha Q/n]``
      by :func:`~vtprune.strategies.coverage.coverage_order`. Ties go to the lower index; chosen tokens are never
      picked twice.
      Images of a group whose questions have as many words run as one loop.

    Options: ``alpha = 0.5``, ``vision_temp = 0.2`` and ``text_temp = 0.02`` are the paper's LLaVA
    defaults; its Qwen2.5-VL runs use ``text_temp = 0.01``. ``variant`` selects the paper's ablations:
    ``"multimodal"`` (both terms), ``"vision"`` (the Q term alone) and ``"text"`` (the P term alone);
    a term used alone is not scaled by ``alpha``, which only weighs the two terms against each other.
    ``needs`` follows the variant, so the engine computes only the inputs that are read.

    Fallbacks (documented choices, not the paper's): without question words (``text_embeds`` None
    or with 0 rows, e.g. a prompt that is all instructions or stop-words) the multimodal and text
    variants maximise the vision term alone. Without ``pre_features`` (models whose projector input
    vtprune does not expose, and the text variant, which does not ask for them) C is the tokens
    themselves, ``ctx.features``. The reference's
    exclusion of LLaVA-1.5 letterbox-padding patches is not applied: the strategy sees no image
    geometry. The paper selects the projected tokens before the LLM; the strategy works at either stage.
    """

    needs = frozenset({"text_embeds", "pre_features"})
    optional_needs = frozenset({"text_embeds", "pre_features"})  # the fallbacks above
    alpha = Option(float, at_least=0)
    text_temp = Option(float, above=0)
    vision_temp = Option(float, above=0)
    variant = Option(str, choices=VARIANTS)

    def __init__(
        self, alpha: float = 0.5, text_temp: float = 0.02, vision_temp: float = 0.2, variant: str = "multimodal"
    ) -> None:
        self.alpha, self.text_temp, self.vision_temp, self.variant = alpha, text_temp, vision_temp, variant
        # Shadows the class attribute (the multimodal set) so the engine skips inputs this variant ignores.
        self.needs = {
            "multimodal": frozenset({"text_embeds", "pre_features"}),
            "vision": frozenset({"pre_features"}),
            "text": frozenset({"text_embeds"}),
        }[variant]

    def order_batch(self, contexts: Sequence[TokenContext]) -> list[Tensor]:
        # One loop per row count (question length): zero rows for shorter questions would cover nothing, but
        # they change the order in which torch sums a column's gain, and the greedy meets near-ties.
        by_rows: dict[int, list[int]] = {}
        for image, ctx in enumerate(contexts):
            by_rows.setdefault(self.coverage_rows(ctx), []).append(image)
        # On a CPU the loop takes one matrix at a time, so each image's weights are made, ordered and released
        # before the next image's. On an accelerator a group is one dense loop, over the layout it reads: each
        # image's weights are written transposed into the group's buffer and released, so the group holds that
        # buffer and the loop's scratch like it, never a list, a stacked copy and a transposed copy of its weights.
        incremental = coverage.updates_gains_incrementally(contexts[0].features.device)
        orders: dict[int, Tensor] = {}
        for group in by_rows.values():
            if incremental:
                for image in group:
                    orders[image] = coverage_order(self.coverage_weights(contexts[image]), contexts[image].keep)
                continue
            keep = contexts[group[0]].keep  # a group's images share their budget (GreedyStrategy.order_batch)
            columns: Tensor | None = None
            for index, image in enumerate(group):
                weights = self.coverage_weights(contexts[image])
                if columns is None:
                    columns = weights.new_empty(len(group), weights.shape[1], weights.shape[0])
                columns[index] = weights.mT
                del weights
            assert columns is not None  # a group has an image
            orders.update(zip(group, coverage.dense_coverage_order_of_columns(columns, keep)))
        return [orders[image] for image in range(len(contexts))]

    def scores(self, ctx: TokenContext) -> Tensor:
        """Each token's coverage gain ``f(S + j) - f(S)`` when the greedy over all tokens picked it."""
        weights = self.coverage_weights(ctx)
        order = coverage_order(weights, ctx.num_tokens)
        covered = weights[:, order].cummax(dim=1).values.sum(dim=0)  # f of each prefix of the order
        score = torch.empty_like(covered)
        score[order] = torch.diff(covered, prepend=covered.new_zeros(1)).clamp_min(0)  # no negative rounding noise
        return score

    def coverage_weights(self, ctx: TokenContext) -> Tensor:
        """The (R, n) matrix whose rows the greedy covers: ``f(S)`` is the sum of its rows' maxima over S."""
        features, n = ctx.features, ctx.num_tokens
        text = None if self.variant == "vision" else ctx.text_embeds
        if text is not None and text.shape[0] == 0:
            text = None
        if text is not None and text.shape[1] != features.shape[1]:
            raise ValueError(
                f"mmtok compares question words with tokens: text_embeds width {text.shape[1]} != features "
                f"width {features.shape[1]}"
            )
        if text is not None:
            text_term = _coverage_probabilities(text, features, self.text_temp)
            if self.variant == "text":
                return text_term.div_(text.shape[0])
        clip = features if ctx.pre_features is None else ctx.pre_features
        if clip.shape[0] != n:
            raise ValueError(f"pre_features has {clip.shape[0]} rows for {n} tokens")
        vision_term = _coverage_probabilities(clip, clip, self.vision_temp)
        if text is None:
            return vision_term.div_(n)
        return torch.cat([text_term.div_(text.shape[0]), vision_term.div_(n).mul_(self.alpha)])

    def coverage_rows(self, ctx: TokenContext) -> int:
        """How many rows :meth:`coverage_weights` has for ``ctx``: question words, tokens, or both."""
        words = 0 if self.variant == "vision" or ctx.text_embeds is None else ctx.text_embeds.shape[0]
        if self.variant == "text" and words:
            return words
        return words + ctx.num_tokens
