"""The contract every strategy implements: choose which visual tokens of one image survive.

A strategy sees a :class:`TokenContext` (the tokens of one image or video at one point of the
model, plus whatever extra inputs it declared in ``needs``) and returns the sorted indices it
keeps. It knows nothing about model classes; the engine builds the context and applies the
result. The engine hands the images of a forward over in groups (``select_batch``), so a
strategy may share work across images; :func:`vtprune.select` on plain tensors is a group of one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..errors import InputError
from ..vocabulary.grids import Segment
from .options import constructor_defaults, declared_options

#: Where a strategy can act: before the language model, or on decoder hidden states at layer K.
INPUT_PLACE = "input"
DECODER_PLACE = "decoder"


@dataclass
class TokenContext:
    """Everything a strategy may look at when it chooses the tokens of one image.

    ``features``, ``pre_features`` and ``text_embeds`` are in the dtype they come in (the model's: bfloat16 on a
    bf16 model), not float32 copies: a copy would live through the whole selection, where the papers' code converts
    for one computation and lets it go. A strategy that computes in float32 converts where it computes
    (``ctx.features.float()``, a temporary; the built-in ones all do, so their picks on bf16 tokens are those on
    the same values in float32). ``attention`` and ``cls_attention`` are float32. Optional fields are filled by
    the engine only when the strategy lists them in ``Strategy.needs``. The engine (and :func:`vtprune.select`)
    first describes a whole image with ``keep`` = N, and hands the strategy that description restricted to the
    candidate tokens with ``keep`` set by the budget; a new per-image input is one field here.
    """

    features: Tensor
    """(N, D) tokens of this image: projected tokens before the LLM, hidden states inside it (the model's dtype)."""
    keep: int
    """How many tokens to keep; the engine guarantees 1 <= keep <= N."""
    seed: int = 0
    """Per-image seed, derived by the engine from the sample's content so batching cannot change it."""
    grid: tuple[int, int, int] | None = None
    """(t, h, w) when the N tokens are one raster-ordered grid (LLaVA, Qwen); None otherwise."""
    segments: tuple[Segment, ...] | None = None
    """The grids inside an AnyRes-packed image (base tile, high-res grid with row newlines); None otherwise."""
    layer: int | None = None
    """Decoder layer the selection happens at; None before the LLM."""
    attention: Tensor | None = None
    """(N,) float32 attention the last prompt token pays to each of these tokens (heads averaged)."""
    text_embeds: Tensor | None = None
    """(m, D) input-embedding rows of the question's words (stop-words and instructions removed; the model's dtype)."""
    instruction: str | None = None
    """The question's words decoded to text (the same words as ``text_embeds``), for CLIP text towers."""
    pre_features: Tensor | None = None
    """(N, Dc) vision-tower features the projector consumed for these tokens (before projection; the model's dtype)."""
    projector: Callable[[Tensor], Tensor] | None = None
    """The model's projector / merger, float32: maps float32 ``pre_features`` rows to projected tokens."""
    cls_attention: Tensor | None = None
    """(N,) float32 attention the vision tower's [CLS] token pays to each token (LLaVA-1.5's CLIP tower)."""
    cross_shares: Tensor | None = None
    """(2,) for this token's row at this layer: share of text-query attention on visual keys, and of
    visual-query attention on text keys (heads averaged)."""
    newline: Tensor | None = None
    """(N,) bool: which tokens are AnyRes row-separator ("newline") tokens (LLaVA-NeXT / OneVision)."""

    def __post_init__(self) -> None:
        if self.features.ndim != 2:
            raise InputError(f"features must be (N, D) for one image, got shape {tuple(self.features.shape)}")
        n = self.features.shape[0]
        # An image without tokens is described (keep = N = 0) but never handed to a strategy.
        if not (1 <= self.keep <= n or self.keep == n == 0):
            raise InputError(f"keep must be in [1, {n}] for {n} tokens, got {self.keep}")

    @property
    def num_tokens(self) -> int:
        return self.features.shape[0]

    def generator(self) -> torch.Generator:
        """A CPU generator seeded for this image (CPU so results match across devices)."""
        return torch.Generator().manual_seed(self.seed)


class Strategy:
    """Base class: subclasses set the class attributes and implement :meth:`select`.

    Options (hyper-parameters) are constructor keywords, each declared as an :class:`~vtprune.strategies.options.Option`
    class attribute so that its value is checked when the strategy is built; per-image inputs live in the context.
    A strategy whose options are all declared compares equal to one with the same name and options, and prints
    them in its stage's string form.
    """

    name: str = ""
    """The name the strategy is registered under; an instance built by name carries the name it was built by."""
    needs: frozenset[str] = frozenset()
    """Optional :class:`TokenContext` fields this strategy reads (e.g. ``{"attention"}``); an instance may narrow
    it for its options (the registry checks the class's)."""
    optional_needs: ClassVar[frozenset[str]] = frozenset()
    """Those of ``needs`` the strategy has a documented fallback for; :func:`vtprune.select` requires the others."""
    places: ClassVar[frozenset[str]] = frozenset({INPUT_PLACE, DECODER_PLACE})
    """Where the strategy can act."""
    needs_budget: bool = True
    """False for strategies that decide the count themselves (``none``); an instance may say so for its options."""

    def select(self, ctx: TokenContext) -> Tensor:
        """Return the kept indices: ``ctx.keep`` unique int64 indices into ``ctx.features``, ascending.

        Strategies without a budget (``needs_budget = False``) may keep any number, none included.
        """
        raise NotImplementedError

    def select_batch(self, contexts: Sequence[TokenContext]) -> list[Tensor]:
        """``select`` for each of several images, in batch order: the engine groups consecutive images whose
        ``features`` have the same shape and dtype and whose ``keep`` is the same (other inputs may differ per
        image).

        Override it to share work across images (one greedy loop for the group instead of one per image); the
        result for an image must not depend on the other images of its group.
        """
        return [self.select(ctx) for ctx in contexts]

    def scores(self, ctx: TokenContext) -> Tensor | None:
        """(N,) the per-token score this strategy ranks by (higher: kept sooner), or None if it has none.

        For heat maps (``vtprune.scores``, ``prune(..., record_scores=True)``); never used to select, so a
        strategy's choice stays ``select`` alone. ``ctx.keep`` is N: scores cover every token.
        """
        return None

    def default_layer(self, num_layers: int) -> int | None:
        """Decoder-only strategies: the layer to act at when none is given (None: ``layer`` is required)."""
        return None

    def options(self) -> dict[str, Any]:
        """The declared options' values, by name."""
        return {name: getattr(self, name) for name in declared_options(type(self))}

    @classmethod
    def options_describe_it(cls) -> bool:
        """Whether every constructor keyword is a declared option (so the options say all there is to it)."""
        return set(constructor_defaults(cls)) <= set(declared_options(cls))

    def __eq__(self, other: object) -> bool:
        if not self.options_describe_it():
            return self is other
        return type(other) is type(self) and other.name == self.name and other.options() == self.options()

    def __hash__(self) -> int:
        if not self.options_describe_it():
            return id(self)
        return hash((type(self), self.name, tuple(self.options().items())))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{key}={value!r}' for key, value in self.options().items())})"


class GreedyStrategy(Strategy):
    """A strategy that picks tokens one at a time; the keep set for k is the first k of its order.

    Subclasses implement :meth:`order` (one image) or :meth:`order_batch` (a group of images at
    once; the built-in ones do, and their ``order`` is a group of one). Because every budget's keep
    set is a prefix of the same order, one call with the largest budget serves a whole sweep (nesting).
    """

    def order(self, ctx: TokenContext) -> Tensor:
        """Return the first ``ctx.keep`` picks, in the order they were picked."""
        if type(self).order_batch is GreedyStrategy.order_batch:  # each default calls the other
            raise NotImplementedError(f"{type(self).__name__} must implement order or order_batch")
        return self.order_batch([ctx])[0]

    def order_batch(self, contexts: Sequence[TokenContext]) -> list[Tensor]:
        """:meth:`order` for each image of a group (same features shape, same ``keep``; see ``select_batch``)."""
        return [self.order(ctx) for ctx in contexts]

    def select(self, ctx: TokenContext) -> Tensor:
        return self.order(ctx).sort().values

    def select_batch(self, contexts: Sequence[TokenContext]) -> list[Tensor]:
        return [order.sort().values for order in self.order_batch(contexts)]

    def scores(self, ctx: TokenContext) -> Tensor | None:
        """Pick order as a score: 1 for the first pick down to 1/N for the last (of the full order)."""
        n = ctx.num_tokens
        order = self.order(replace(ctx, keep=n))
        score = torch.empty(n, dtype=torch.float32)
        score[order.cpu()] = 1 - torch.arange(n, dtype=torch.float32) / n
        return score


class MergingStrategy(Strategy):
    """A strategy that replaces an image's tokens by fewer new ones (e.g. pooling) instead of a subset.

    ``merge`` returns, for each new token, the index of the original token whose place (sequence
    slot and position id) it takes — ascending and unique, what ``select`` returns and the record
    shows — and a (k, N) matrix of weights: new token i is ``weights[i] @ tokens``. The engine
    applies the same weights to every per-token tensor (projected tokens, Qwen3-VL's deepstack
    features). The count may differ from ``ctx.keep`` when the method only has certain sizes (it
    then documents how it rounds).
    """

    places: ClassVar[frozenset[str]] = frozenset({INPUT_PLACE})

    def merge(self, ctx: TokenContext) -> tuple[Tensor, Tensor]:
        """(places (k,), weights (k, N)) for this image."""
        raise NotImplementedError

    def select(self, ctx: TokenContext) -> Tensor:
        return self.merge(ctx)[0]
