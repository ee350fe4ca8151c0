"""The public entry points: wrap a model with a schedule, or select on plain tensors."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

from .adapters import ModelAdapter, adapter_for
from .engine.handle import PruneHandle
from .engine.selection import check_features, check_finite, check_inputs, restrict, score_tokens, select_tokens
from .engine.settings import PruneSettings
from .errors import BudgetError, LayerError, OptionError, UnsupportedModelError
from .schedule import Budget, Schedule, Stage, as_schedule
from .strategies.base import GreedyStrategy, Strategy, TokenContext
from .strategies.registry import NEEDABLE, make_strategy

StrategySpec = str | Strategy | Stage | Schedule | Sequence[Stage]


def prune(
    model: nn.Module,
    strategy: StrategySpec,
    *,
    keep: int | None = None,
    keep_ratio: float | None = None,
    layer: int | None = None,
    seed: int = 0,
    newlines: str = "candidate",
    renumber: bool = False,
    tokenizer: Any | None = None,
    record_scores: bool = False,
    **options: Any,
) -> PruneHandle:
    """Prune the visual tokens of ``model`` (patched in place) until ``handle.remove()``.

    ``strategy`` is a registered name (with ``keep`` tokens per image or ``keep_ratio``, ``layer=K``
    to act inside the decoder, and the strategy's own ``options``), a schedule string such as
    ``"divprune:64+fastv@2:50%"``, or :class:`Stage` / :class:`Schedule` objects. ``seed`` feeds the
    random strategies (mixed with each sample's own tokens, so batching does not change a draw);
    ``newlines`` says whether LLaVA-NeXT/OneVision row-separator tokens are ordinary candidates
    (``"candidate"``, DivPrune's choice) or always dropped (``"drop"``). Kept tokens keep their original
    positions; ``renumber=True`` numbers them contiguously instead, as the LLaVA reference code of the
    papers does (1-D RoPE models only; it applies to the stage before the LLM). ``tokenizer`` (or
    a processor) lets text-aware strategies (``mmtok``) drop stop-words and instruction words from
    the question; without it every non-special text token of the prompt counts. ``record_scores=True``
    also stores, per image and stage, the score each strategy ranked the tokens by
    (``ImageRecord.scores_by_stage``, for heat maps; greedy strategies then run their order over all tokens
    once more, so leave it off when timing).
    """
    adapter = adapter_for(model)
    schedule = as_schedule(strategy, layer=layer, keep=keep, keep_ratio=keep_ratio, **options)
    schedule = schedule.resolved(len(adapter.layers))
    _check_sliding_window(adapter.text_config, schedule)
    _check_inputs(adapter, schedule)
    settings = PruneSettings(
        schedule, seed=seed, newlines=newlines, renumber=renumber, tokenizer=tokenizer, record_scores=record_scores
    )
    return PruneHandle(model, adapter, settings).install()


@contextmanager
def pruned(model: nn.Module, strategy: StrategySpec, **kwargs: Any) -> Iterator[PruneHandle]:
    """``prune`` as a context manager: the hooks are removed on exit, exceptions included."""
    handle = prune(model, strategy, **kwargs)
    try:
        yield handle
    finally:
        handle.remove()


def select(
    strategy: str | Strategy,
    features: Tensor,
    *,
    keep: int | None = None,
    keep_ratio: float | None = None,
    newlines: str = "candidate",
    **inputs_and_options: Any,
) -> Tensor:
    """Sorted kept indices for one image's tokens ``features`` (N, D), exactly as the hooks select.

    Keywords named like :class:`TokenContext` fields are per-image inputs: ``seed``, ``grid``
    (t, h, w), ``layer``, ``attention`` (N,) last-token attention (fastv), ``newline`` (N,) bool
    AnyRes newline tokens, ``text_embeds`` (m, D) question words and ``pre_features`` (N, Dc)
    (mmtok), ``projector`` (zoo), ``cls_attention`` (N,) (todre), ``cross_shares`` (2,)
    (todre_relevance). Every other keyword is a strategy option.
    """
    image, options = _describe(features, inputs_and_options)
    chosen = make_strategy(strategy, **options)
    budget = None if keep is None and keep_ratio is None else Budget(keep=keep, keep_ratio=keep_ratio)
    if chosen.needs_budget and budget is None:
        raise BudgetError(f"strategy {chosen.name!r} needs a budget: pass keep= or keep_ratio=")
    check_inputs(chosen, image)
    return select_tokens(chosen, budget, [image], newlines=newlines)[0]


def scores(
    strategy: str | Strategy, features: Tensor, *, newlines: str = "candidate", **inputs_and_options: Any
) -> Tensor | None:
    """(N,) the score ``strategy`` ranks one image's tokens ``features`` (N, D) by, for heat maps; None if it has none.

    Higher means kept sooner: DivPrune / ToDRE the cosine distance to the tokens picked before (in the
    greedy order over all N), MMTok the coverage gain at pick time, ZOO the normalised sensitivity, FastV
    the attention (``attention=``), other greedy strategies the pick order. NaN for tokens that are not
    candidates (``newlines="drop"``). Inputs and options as in :func:`select`; no budget is needed.
    """
    image, options = _describe(features, inputs_and_options)
    chosen = make_strategy(strategy, **options)
    check_inputs(chosen, image)
    return score_tokens(chosen, image, newlines=newlines)


def select_nested(
    strategy: str | Strategy, features: Tensor, budgets: Sequence[int], **inputs_and_options: Any
) -> dict[int, Tensor]:
    """Keep sets for several budgets from one greedy pass: budget -> sorted kept indices.

    A greedy strategy's keep set for k is the first k tokens of its pick order, so scoring once
    at the largest budget serves a whole sweep (the sets are nested). Inputs and options as in
    :func:`select`.
    """
    image, options = _describe(features, inputs_and_options)
    chosen = make_strategy(strategy, **options)
    if not isinstance(chosen, GreedyStrategy):
        raise OptionError(
            f"strategy {chosen.name!r} is not greedy, so its keep sets are not nested; call select() per budget"
        )
    check_inputs(chosen, image)
    n = image.num_tokens
    if not budgets or any(isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n for k in budgets):
        raise BudgetError(f"budgets must be token counts in [1, {n}], got {list(budgets)}")
    context = restrict(image, max(budgets))
    check_finite(0, context)
    order = chosen.order(context)
    return {k: order[:k].sort().values for k in budgets}


def _describe(features: Tensor, kwargs: dict[str, Any]) -> tuple[TokenContext, dict[str, Any]]:
    """One image's whole-image context from ``features`` and the keywords that are context fields (per-image
    inputs); the other keywords (strategy options)."""
    check_features(features)
    inputs = {key: value for key, value in kwargs.items() if key in NEEDABLE}
    image = TokenContext(features=features, keep=features.shape[0], **inputs)
    return image, {key: value for key, value in kwargs.items() if key not in NEEDABLE}


def _check_sliding_window(text_config: Any, schedule: Schedule) -> None:
    layer_types = getattr(text_config, "layer_types", None) or []
    for stage in schedule.decoder_stages:
        if any(kind != "full_attention" for kind in layer_types[stage.layer :]):
            raise LayerError(
                f"{stage.strategy.name} at layer {stage.layer}: layers from there on use sliding-window "
                "attention, which vtprune cannot shorten inside the decoder; prune before the LLM instead"
            )


def _check_inputs(adapter: ModelAdapter, schedule: Schedule) -> None:
    for stage in schedule.stages:
        for name in sorted(stage.strategy.needs & adapter.unavailable_inputs.keys()):
            raise UnsupportedModelError(
                f"{stage.strategy.name} reads {name}, which {type(adapter.model).__name__} cannot give: "
                f"{adapter.unavailable_inputs[name]}; choose a strategy that does not read it"
            )
