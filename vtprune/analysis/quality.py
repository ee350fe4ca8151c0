"""How well a strategy's token scores predict the measured information, layer by layer.

For every sample, strategy and measured layer: the strategy's per-token scores (what it ranks by, from
``prune(..., record_scores=True)``) against the measured information of the same tokens —

- ROC AUC of the scores for the label "among the top ``q`` of tokens by information" (at least one token);
  0.5 is what random scores get, 1 a perfect ranking;
- nDCG of the scores' ranking with the information (negative values clipped to 0) as the relevance;
  the random reference is the mean nDCG of ``random_draws`` seeded random rankings of the same tokens.

Both are averaged over samples (sklearn.metrics; scikit-learn is in the ``eval`` and ``dev`` extras).
Strategies that act before the LLM score once, on the projected tokens; decoder-only ones (FastV) score at each
measured layer K ≥ 1 with what the engine gives them there (layer K−1's attention), which is what they would
prune by at K. Layers where a decoder strategy cannot act (K = 0 for FastV) are NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import VTPruneError
from ..schedule import Budget, Stage
from ..strategies.base import INPUT_PLACE, Strategy
from ..strategies.registry import make_strategy
from .information import SampleInformation


@dataclass
class ScoreQuality:
    """Per strategy, per measured layer: mean ROC AUC and nDCG over samples; the random reference alongside."""

    layers: list[int]
    measure: str
    q: float
    auc: dict[str, list[float]] = field(default_factory=dict)
    ndcg: dict[str, list[float]] = field(default_factory=dict)
    random_ndcg: list[float] = field(default_factory=list)
    """Mean nDCG of random rankings (the random AUC is 0.5)."""


def ranking_strategies() -> list[str]:
    """Registered strategies that rank tokens by a score (``Strategy.scores`` overridden)."""
    from ..strategies.registry import list_strategies, strategy_class

    return [name for name in list_strategies() if strategy_class(name).scores is not Strategy.scores]


def _metrics() -> Any:
    try:
        from sklearn import metrics
    except ImportError as error:
        raise VTPruneError("score quality needs scikit-learn: pip install 'vtprune[eval]'") from error
    return metrics


@torch.no_grad()
def strategy_scores(
    model: nn.Module, inputs: Mapping[str, Any], strategy: str, layers: Sequence[int], tokenizer: Any | None = None
) -> dict[int, Tensor]:
    """Measured layer -> (N,) the scores ``strategy`` gives one sample's visual tokens (all items, in order);
    layers where it cannot act are left out. Before-the-LLM strategies give the same scores for every layer."""
    from ..api import pruned

    chosen = make_strategy(strategy)
    if INPUT_PLACE in chosen.places:
        places: list[int | None] = [None]
    else:
        places = [layer for layer in layers if layer >= 1 or "attention" not in chosen.needs]
    found: dict[int | None, Tensor] = {}
    for place in places:
        budget = Budget(keep_ratio=1.0) if chosen.needs_budget else None  # keep all: scores only, nothing pruned
        stage = Stage(make_strategy(strategy), layer=place, budget=budget)
        with pruned(model, stage, record_scores=True, tokenizer=tokenizer) as handle:
            model(**inputs)
        name = INPUT_PLACE if place is None else f"layer {place}"
        record = handle.require_record()
        images = record.images
        if all(name in image.scores_by_stage for image in images):
            found[place] = torch.cat([image.scores_by_stage[name] for image in images])
    if None in found:
        return {layer: found[None] for layer in layers}
    return {layer: found[layer] for layer in layers if layer in found}


def score_quality(
    model: nn.Module,
    inputs: Sequence[Mapping[str, Any]],
    information: Sequence[SampleInformation],
    strategies: Sequence[str],
    *,
    measure: str = "kl",
    q: float = 0.1,
    tokenizer: Any | None = None,
    random_draws: int = 20,
    seed: int = 0,
) -> ScoreQuality:
    """AUC and nDCG of each strategy's scores against ``information`` (one entry per sample of ``inputs``)."""
    metrics = _metrics()
    if len(inputs) != len(information):
        raise VTPruneError(f"inputs has {len(inputs)} samples and information {len(information)}: pass the same ones")
    if not 0 < q < 1:
        raise VTPruneError(f"q must be in (0, 1): the share of tokens counted as informative, got {q}")
    layers = information[0].layers
    result = ScoreQuality(layers=list(layers), measure=measure, q=q)
    generator = torch.Generator().manual_seed(seed)
    random_ndcg = torch.zeros(len(layers))
    for sample in information:
        for row, _ in enumerate(layers):
            relevance = sample.values[measure][row].clamp(min=0).double().numpy()[None]
            draws = [
                metrics.ndcg_score(relevance, torch.rand(relevance.shape, generator=generator).numpy())
                for _ in range(random_draws)
            ]
            random_ndcg[row] += sum(draws) / random_draws
    result.random_ndcg = (random_ndcg / len(information)).tolist()
    for strategy in strategies:
        auc = torch.zeros(len(layers))
        ndcg = torch.zeros(len(layers))
        counted = torch.zeros(len(layers))
        for sample_inputs, sample in zip(inputs, information):
            scores = strategy_scores(model, sample_inputs, strategy, layers, tokenizer=tokenizer)
            for row, layer in enumerate(layers):
                if layer not in scores:
                    continue
                values = sample.values[measure][row]
                score = scores[layer][sample.tokens]
                ok = torch.isfinite(score)
                if int(ok.sum()) < 2:
                    continue
                values, score = values[ok].double(), score[ok].double()
                top = max(1, math.ceil(q * values.numel()))
                labels = torch.zeros(values.numel(), dtype=torch.bool)
                labels[values.argsort(descending=True, stable=True)[:top]] = True
                if bool(labels.all()):
                    continue
                auc[row] += metrics.roc_auc_score(labels.numpy(), score.numpy())
                ndcg[row] += metrics.ndcg_score(values.clamp(min=0).numpy()[None], score.numpy()[None])
                counted[row] += 1
        result.auc[strategy] = torch.where(counted > 0, auc / counted.clamp(min=1), torch.nan).tolist()
        result.ndcg[strategy] = torch.where(counted > 0, ndcg / counted.clamp(min=1), torch.nan).tolist()
    return result
