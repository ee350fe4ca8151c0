"""Selection for the images of a forward: budget, candidates and checks around a strategy's ``select_batch``.

The hooks and :func:`vtprune.select` (a batch of one image) both call :func:`select_tokens`, so
what researchers run on plain tensors is exactly what runs inside a model.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch
from torch import Tensor

from ..errors import InputError, StrategyOutputError, VTPruneError
from ..schedule import Budget
from ..strategies.base import MergingStrategy, Strategy, TokenContext

#: What to do with LLaVA-NeXT / OneVision row-separator ("newline") tokens.
NEWLINE_POLICIES = ("candidate", "drop")


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


def check_features(features: object) -> None:
    """What :func:`vtprune.select` and its siblings get from a user as tokens: one image's (N, D) tensor."""
    if not isinstance(features, Tensor) or features.ndim != 2:
        got = f"shape {tuple(features.shape)}" if isinstance(features, Tensor) else type(features).__name__
        raise InputError(
            f"features must be one image's tokens as an (N, D) tensor, got {got}; for several images or a batch, "
            "call once per image"
        )


def check_inputs(strategy: Strategy, inputs: TokenContext) -> None:
    """What :func:`vtprune.select` and its siblings get from a user beyond the tokens: every input the strategy
    needs (those with a documented fallback excepted), each with one row per token."""
    n, width = inputs.features.shape
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
    images: Sequence[TokenContext],
    newlines: str = "candidate",
) -> list[Tensor]:
    """For each image, described by a whole-image context (``keep`` = N), the sorted indices ``strategy`` keeps
    under ``budget``.

    Consecutive images whose candidates have the same count, width, dtype and budget go to the strategy as
    one group (``Strategy.select_batch``: the greedy strategies run one loop for the group, not one
    per image), so a strategy still sees the images in batch order; every result is checked on its own.
    A group's contexts exist only while it is selected, and on a CPU an image whose context is a copy (dropped
    newline tokens) is a group of its own (:func:`_copied_on_cpu`). Newline tokens are ordinary candidates by
    default, as in DivPrune's reference; with ``newlines="drop"`` they are never kept and the budget counts the
    other tokens only (as MMTok).
    """
    kept: dict[int, Tensor] = {}
    groups: list[list[tuple[int, Tensor, int]]] = []  # per group, (image, candidates, keep) of its members
    last = None  # the (count, width, dtype, keep) of the group being filled
    for image, inputs in enumerate(images):
        features = inputs.features
        candidates = _candidates(inputs, newlines)
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
        key = (available, features.shape[1], features.dtype, keep)
        alone = _copied_on_cpu(inputs, candidates)
        if key != last or alone:
            groups.append([])
        last = None if alone else key
        groups[-1].append((image, candidates, keep))
    for members in groups:
        kept.update(_select_group(strategy, images, members))
    return [kept[image] for image in range(len(images))]


def _select_group(
    strategy: Strategy, images: Sequence[TokenContext], members: list[tuple[int, Tensor, int]]
) -> dict[int, Tensor]:
    """The kept indices of one group's images (``members``: image, candidates, keep), each checked. The strategy's
    contexts are built here and released on return, so only one group's copies exist at a time."""
    contexts = [restrict(images[image], keep, candidates) for image, candidates, keep in members]
    for (image, _, _), ctx in zip(members, contexts):
        check_finite(image, ctx)
    chosen = strategy.select_batch(contexts)
    if not isinstance(chosen, (list, tuple)) or len(chosen) != len(members):
        got = f"{len(chosen)} selections" if isinstance(chosen, (list, tuple)) else type(chosen).__name__
        raise StrategyOutputError(
            f"strategy {strategy.name!r} returned {got} for {len(members)} images; select_batch must return a "
            "list of index tensors, one per image"
        )
    # A merging strategy's count follows its own rounding (matryoshka: the nearest pooling scale).
    exact = strategy.needs_budget and not isinstance(strategy, MergingStrategy)
    kept = {}
    for (image, candidates, _), ctx, indices in zip(members, contexts, chosen):
        _check(strategy.name, indices, ctx.keep if exact else None, ctx.num_tokens)
        kept[image] = candidates[indices.to(candidates.device)]
    return kept


def _copied_on_cpu(image: TokenContext, candidates: Tensor) -> bool:
    """Whether the strategy's view of ``image`` (:func:`restrict`) copies its tokens in CPU memory: candidates that
    leave some tokens out (dropped newline tokens) index every per-token input. Such an image is a group of its own,
    so a batch holds one image's copies at a time, as one call of the papers' code per image does. On an
    accelerator the group stays whole: its greedy loop is launch-bound, and one loop for the batch is the point of
    grouping. Tokens in half precision are no copy: the context keeps them in their dtype (:class:`TokenContext`)."""
    return image.features.device.type == "cpu" and candidates.numel() != image.num_tokens


@torch.no_grad()
def score_tokens(strategy: Strategy, inputs: TokenContext, newlines: str = "candidate") -> Tensor | None:
    """(N,) float32 CPU: the score ``strategy`` ranks each token of one image (a whole-image context) by, NaN where
    a token is not a candidate (``newlines="drop"``); None when the strategy has no score (random, uniform,
    pooling)."""
    n = inputs.num_tokens
    candidates = _candidates(inputs, newlines)
    if candidates.numel() == 0:
        return None
    context = restrict(inputs, candidates.numel(), candidates)
    check_finite(0, context)
    values = strategy.scores(context)
    if values is None:
        return None
    scores = torch.full((n,), torch.nan)
    scores[candidates.cpu()] = values.detach().float().cpu()
    return scores


@torch.no_grad()  # selection is never part of a training graph
def merge_tokens(
    strategy: MergingStrategy, budget: Budget | None, inputs: TokenContext
) -> tuple[Tensor, Tensor | None]:
    """(places, weights) a merging strategy makes for one image (a whole-image context); (all, None) at full
    budget. Strategies that decide the count themselves (``needs_budget = False``) take no budget and always run."""
    features = inputs.features
    n = features.shape[0]
    keep = n if budget is None else budget.tokens(n)
    if keep == n and strategy.needs_budget:
        return torch.arange(n, device=features.device), None
    places, weights = strategy.merge(restrict(inputs, keep))
    _check(strategy.name, places, None, n)
    if not isinstance(weights, Tensor) or weights.shape != (places.numel(), n):
        raise StrategyOutputError(
            f"strategy {strategy.name!r} gave weights {tuple(weights.shape)} for {places.numel()} places"
        )
    return places.to(features.device), weights.float()


def restrict(image: TokenContext, keep: int, candidates: Tensor | None = None) -> TokenContext:
    """What the strategy sees of a whole-image context: ``keep`` of the ``candidates`` (default: all tokens). The
    tokens, pre-projector features and question rows keep their dtype (a float32 copy of half-precision ones would
    live through the whole selection; each strategy converts where it computes); the attention vectors are float32."""
    # A grid describes all N tokens; once some are excluded it no longer does.
    whole = candidates is None or candidates.numel() == image.num_tokens

    def per_token(x: Tensor | None) -> Tensor | None:
        # All candidates are all tokens in order: the tensor itself, not an indexed copy of it.
        return None if x is None else (x if whole else x[candidates])

    def as_float(x: Tensor | None) -> Tensor | None:
        return None if x is None else x.float()

    return replace(
        image,
        features=image.features if whole else image.features[candidates],
        keep=keep,
        grid=image.grid if whole else None,
        segments=image.segments if whole else None,
        attention=as_float(per_token(image.attention)),
        pre_features=per_token(image.pre_features),
        cls_attention=as_float(per_token(image.cls_attention)),
        newline=per_token(image.newline),
    )


def _candidates(image: TokenContext, newlines: str) -> Tensor:
    """Indices of the tokens that may be kept: all, or all but the newline tokens (``newlines="drop"``)."""
    features = image.features
    candidates = torch.arange(features.shape[0], device=features.device)
    if newlines == "drop" and image.newline is not None:
        candidates = candidates[~image.newline.to(features.device)]
    return candidates


def check_finite(image: int, ctx: TokenContext) -> None:
    """Refuse NaN / inf where a strategy compares values: every argmax, sort and distance would be meaningless."""
    for name in ("features", "attention", "cls_attention", "pre_features", "text_embeds", "cross_shares"):
        value = getattr(ctx, name)
        if value is not None and not _all_finite(value):
            rows = (~value.isfinite()).reshape(value.shape[0], -1).any(dim=1).nonzero()[:, 0].tolist()
            raise InputError(
                f"{name} of image {image} contain NaN or inf (rows {rows[:8]}{' ...' if len(rows) > 8 else ''}); "
                "vtprune cannot rank non-finite values. Check the input, or a float16 model that overflows"
            )


def _all_finite(value: Tensor) -> bool:
    """Whether ``value`` holds no NaN or inf. ``isfinite().all()`` would make four temporaries the size of the input
    (15.8 MB for 576 x 4096 float32 features, more than DivPrune itself); the minimum and maximum carry any NaN or
    infinity instead."""
    if value.numel() == 0:
        return True
    low, high = torch.aminmax(value)
    return bool(torch.isfinite(low) & torch.isfinite(high))


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
