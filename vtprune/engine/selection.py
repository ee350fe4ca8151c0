"""Selection for the images of a forward: budget, candidates and checks around a strategy's ``select_batch``.

The hooks and :func:`vtprune.select` (a batch of one image) both call :func:`select_tokens`, so
what researchers run on plain tensors is exactly what runs inside a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..errors import InputError, StrategyOutputError, VTPruneError
from ..schedule import Budget
from ..strategies.base import MergingStrategy, Strategy, TokenContext
from ..vocabulary.grids import Grid, Segment

#: What to do with LLaVA-NeXT / OneVision row-separator ("newline") tokens.
NEWLINE_POLICIES = ("candidate", "drop")


@dataclass
class TokenInputs:
    """Per-image inputs beyond the features; each is optional."""

    seed: int = 0
    grid: Grid = None
    segments: tuple[Segment, ...] | None = None
    layer: int | None = None
    attention: Tensor | None = None
    newline: Tensor | None = None
    """(N,) bool: which tokens are AnyRes newline tokens."""
    text_embeds: Tensor | None = None
    instruction: str | None = None
    pre_features: Tensor | None = None
    projector: Callable[[Tensor], Tensor] | None = None
    cls_attention: Tensor | None = None
    cross_shares: Tensor | None = None


#: What each per-image input is on the plain-tensor path, for N tokens of width D (what error messages say).
INPUT_SHAPES = {
    "attention": "a tensor of shape (N,)",
    "newline": "a bool tensor of shape (N,)",
    "text_embeds": "a tensor of shape (m, D)",
    "pre_features": "a tensor of shape (N, Dc)",
    "projector": "a callable mapping pre_features rows to tokens",
    "cls_attention": "a tensor of shape (N,)",
    "cross_shares": "a tensor of shape (2,)",
    "grid": "a (t, h, w) tuple",
    "segments": "a tuple of Segment",
    "layer": "an int",
}


def check_inputs(strategy: Strategy, features: object, inputs: TokenInputs) -> None:
    """What :func:`vtprune.select` and its siblings get from a user: one image's (N, D) tokens, every input the
    strategy needs (those with a documented fallback excepted), each with one row per token."""
    if not isinstance(features, Tensor) or features.ndim != 2:
        got = f"shape {tuple(features.shape)}" if isinstance(features, Tensor) else type(features).__name__
        raise InputError(
            f"features must be one image's tokens as an (N, D) tensor, got {got}; for several images or a batch, "
            "call once per image"
        )
    n, width = features.shape
    missing = sorted(name for name in strategy.needs - strategy.optional_needs if getattr(inputs, name) is None)
    if missing:
        wanted = "; ".join(f"{name}= {INPUT_SHAPES[name]}" for name in missing)
        raise InputError(
            f"strategy {strategy.name!r} needs {', '.join(missing)} for these tokens: pass {wanted} "
            "(inside a model the hooks supply it)"
        )
    for name in ("attention", "cls_attention", "newline", "pre_features", "text_embeds", "cross_shares"):
        value = getattr(inputs, name)
        if value is None:
            continue
        if name == "cross_shares":
            fits = isinstance(value, Tensor) and tuple(value.shape) == (2,)
        elif name == "text_embeds":
            fits = isinstance(value, Tensor) and value.ndim == 2 and value.shape[1] == width
        else:
            rank = 2 if name == "pre_features" else 1
            fits = isinstance(value, Tensor) and value.ndim == rank and value.shape[0] == n
        if not fits:
            got = f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
            raise InputError(f"{name} must be {INPUT_SHAPES[name]} for N={n}, D={width}; got {got}")


@torch.no_grad()  # selection is never part of a training graph
def select_tokens(
    strategy: Strategy,
    budget: Budget | None,
    images: Sequence[tuple[Tensor, TokenInputs]],
    newlines: str = "candidate",
) -> list[Tensor]:
    """For each image, given as its features (N, D) and inputs, the sorted indices ``strategy`` keeps under ``budget``.

    Consecutive images whose candidates have the same count, width and budget go to the strategy as
    one group (``Strategy.select_batch``: the greedy strategies run one loop for the group, not one
    per image), so a strategy still sees the images in batch order; every result is checked on its own. Newline tokens are ordinary candidates by default, as in
    DivPrune's reference; with ``newlines="drop"`` they are never kept and the budget counts the
    other tokens only (as MMTok).
    """
    kept: dict[int, Tensor] = {}
    pending: dict[int, tuple[Tensor, TokenContext]] = {}  # image -> (candidates, what the strategy sees)
    groups: list[list[int]] = []
    last = None  # the (count, width, keep) of the group being filled
    for image, (features, inputs) in enumerate(images):
        candidates = _candidates(features, inputs, newlines)
        available = candidates.numel()
        if available == 0:
            kept[image] = candidates
            continue
        keep = available if budget is None else budget.tokens(available)
        if keep == available and strategy.needs_budget:
            kept[image] = candidates
            continue
        if "attention" in strategy.needs and inputs.attention is None:
            raise VTPruneError(f"strategy {strategy.name!r} needs attention scores; run it inside the decoder")
        pending[image] = candidates, token_context(features, keep, inputs, candidates)
        check_finite(image, pending[image][1])
        key = (available, features.shape[1], keep)
        if key != last:
            groups.append([])
            last = key
        groups[-1].append(image)
    for members in groups:
        chosen = strategy.select_batch([pending[image][1] for image in members])
        if not isinstance(chosen, (list, tuple)) or len(chosen) != len(members):
            got = f"{len(chosen)} selections" if isinstance(chosen, (list, tuple)) else type(chosen).__name__
            raise StrategyOutputError(
                f"strategy {strategy.name!r} returned {got} for {len(members)} images; select_batch must return a "
                "list of index tensors, one per image"
            )
        # A merging strategy's count follows its own rounding (matryoshka: the nearest pooling scale).
        exact = strategy.needs_budget and not isinstance(strategy, MergingStrategy)
        for image, indices in zip(members, chosen):
            candidates, ctx = pending[image]
            _check(strategy.name, indices, ctx.keep if exact else None, ctx.num_tokens)
            kept[image] = candidates[indices.to(candidates.device)]
    return [kept[image] for image in range(len(images))]


@torch.no_grad()
def score_tokens(
    strategy: Strategy, features: Tensor, inputs: TokenInputs, newlines: str = "candidate"
) -> Tensor | None:
    """(N,) float32 CPU: the score ``strategy`` ranks each token of one image by, NaN where a token is not a
    candidate (``newlines="drop"``); None when the strategy has no score (random, uniform, pooling)."""
    n = features.shape[0]
    candidates = _candidates(features, inputs, newlines)
    if candidates.numel() == 0:
        return None
    context = token_context(features, candidates.numel(), inputs, candidates)
    check_finite(0, context)
    values = strategy.scores(context)
    if values is None:
        return None
    scores = torch.full((n,), torch.nan)
    scores[candidates.cpu()] = values.detach().float().cpu()
    return scores


@torch.no_grad()  # selection is never part of a training graph
def merge_tokens(
    strategy: MergingStrategy, budget: Budget | None, features: Tensor, inputs: TokenInputs
) -> tuple[Tensor, Tensor | None]:
    """(places, weights) a merging strategy makes for one image; (all, None) at full budget. Strategies that
    decide the count themselves (``needs_budget = False``) take no budget and always run."""
    n = features.shape[0]
    keep = n if budget is None else budget.tokens(n)
    if keep == n and strategy.needs_budget:
        return torch.arange(n, device=features.device), None
    places, weights = strategy.merge(token_context(features, keep, inputs))
    _check(strategy.name, places, None, n)
    if not isinstance(weights, Tensor) or weights.shape != (places.numel(), n):
        raise StrategyOutputError(
            f"strategy {strategy.name!r} gave weights {tuple(weights.shape)} for {places.numel()} places"
        )
    return places.to(features.device), weights.float()


def token_context(features: Tensor, keep: int, inputs: TokenInputs, candidates: Tensor | None = None) -> TokenContext:
    """The strategy's view of one image: float32 tensors, restricted to ``candidates`` (default: all)."""
    # A grid describes all N tokens; once some are excluded it no longer does.
    whole = candidates is None or candidates.numel() == features.shape[0]

    def per_token(x: Tensor | None) -> Tensor | None:
        # All candidates are all tokens in order: the tensor itself, not an indexed copy of it.
        return None if x is None else (x if whole else x[candidates]).float()

    return TokenContext(
        features=per_token(features),
        keep=keep,
        seed=inputs.seed,
        grid=inputs.grid if whole else None,
        segments=inputs.segments if whole else None,
        layer=inputs.layer,
        attention=per_token(inputs.attention),
        text_embeds=None if inputs.text_embeds is None else inputs.text_embeds.float(),
        instruction=inputs.instruction,
        pre_features=per_token(inputs.pre_features),
        projector=inputs.projector,
        cls_attention=per_token(inputs.cls_attention),
        cross_shares=inputs.cross_shares,
    )


def _candidates(features: Tensor, inputs: TokenInputs, newlines: str) -> Tensor:
    """Indices of the tokens that may be kept: all, or all but the newline tokens (``newlines="drop"``)."""
    candidates = torch.arange(features.shape[0], device=features.device)
    if newlines == "drop" and inputs.newline is not None:
        candidates = candidates[~inputs.newline.to(features.device)]
    return candidates


def check_finite(image: int, ctx: TokenContext) -> None:
    """Refuse NaN / inf where a strategy compares values: every argmax, sort and distance would be meaningless."""
    for name in ("features", "attention", "cls_attention", "pre_features", "text_embeds", "cross_shares"):
        value = getattr(ctx, name)
        if value is not None and not bool(value.isfinite().all()):
            rows = (~value.isfinite()).reshape(value.shape[0], -1).any(dim=1).nonzero()[:, 0].tolist()
            raise InputError(
                f"{name} of image {image} contain NaN or inf (rows {rows[:8]}{' ...' if len(rows) > 8 else ''}); "
                "vtprune cannot rank non-finite values. Check the input, or a float16 model that overflows"
            )


def _check(name: str, chosen: object, keep: int | None, available: int) -> None:
    """User strategies are code we did not write: refuse malformed output instead of pruning wrongly."""
    if not isinstance(chosen, Tensor) or chosen.ndim != 1 or chosen.dtype not in (torch.int64, torch.int32):
        got = f"{chosen.dtype} {tuple(chosen.shape)}" if isinstance(chosen, Tensor) else type(chosen).__name__
        raise StrategyOutputError(f"strategy {name!r} must return a 1-D integer tensor of indices, got {got}")
    if keep is not None and chosen.numel() != keep:
        raise StrategyOutputError(f"strategy {name!r} returned {chosen.numel()} indices for a budget of {keep}")
    if chosen.numel() and (int(chosen.min()) < 0 or int(chosen.max()) >= available):
        raise StrategyOutputError(f"strategy {name!r} returned indices outside [0, {available})")
    if chosen.numel() > 1 and not bool((chosen[1:] > chosen[:-1]).all()):
        raise StrategyOutputError(f"strategy {name!r} must return unique indices in ascending order")
