"""What to prune where: stages of (strategy, place, budget), and their one-line string form.

String form, for command lines (no ``=`` or ``,`` so it survives lmms-eval's ``--model_args``)::

    divprune:64                    DivPrune before the LLM, 64 tokens kept per image
    divprune:25%                   ... 25 % of each image's tokens kept (also ``0.25``)
    fastv@2:50%                    FastV inside the decoder at layer 2, half of the visual tokens kept
    divprune:64+random_deep@16:50%(seed:3)
                                   stages joined by ``+``; options in parentheses as ``key:value;...``
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field, replace
from decimal import Decimal
from numbers import Integral, Real
from typing import Any, Sequence

from .errors import BudgetError, BudgetWarning, LayerError, OptionError, ScheduleError
from .strategies.base import DECODER_PLACE, INPUT_PLACE, Strategy
from .strategies.options import constructor_defaults, declared_options, parse_value
from .strategies.registry import NAME_PATTERN, make_strategy


@dataclass(frozen=True)
class Budget:
    """How many visual tokens of one image a stage keeps: a count or a fraction (exactly one)."""

    keep: int | None = None
    keep_ratio: float | None = None

    def __post_init__(self) -> None:
        if (self.keep is None) == (self.keep_ratio is None):
            raise BudgetError("give exactly one of keep= (tokens kept per image) or keep_ratio= (fraction kept)")
        # bools are ints to Python, but keep=True is no token count and keep_ratio=True no fraction.
        if self.keep is not None:
            if isinstance(self.keep, bool) or not isinstance(self.keep, Integral) or self.keep < 1:
                raise BudgetError(f"keep must be a positive int (tokens kept per image), got {self.keep!r}")
            object.__setattr__(self, "keep", int(self.keep))
        if self.keep_ratio is not None:
            ratio = self.keep_ratio
            if isinstance(ratio, bool) or not isinstance(ratio, Real) or not 0 < ratio <= 1:
                raise BudgetError(
                    f"keep_ratio must be a number in (0, 1] (the fraction of each image's tokens kept: 0.25 for a "
                    f"quarter), got {ratio!r}"
                )
            object.__setattr__(self, "keep_ratio", float(ratio))

    def tokens(self, available: int) -> int:
        """Tokens to keep out of ``available``; a count above ``available`` keeps all (with a warning)."""
        if self.keep_ratio is not None:
            # round(r·N) as in DivPrune's reference, but never zero tokens for a non-empty image.
            return min(available, max(1, int(math.floor(self.keep_ratio * available + 0.5))))
        assert self.keep is not None  # __post_init__: exactly one of keep / keep_ratio is set
        if self.keep > available:
            warnings.warn(
                f"keep={self.keep} is more than the {available} visual tokens of an image; keeping all of them",
                BudgetWarning,
                stacklevel=2,
            )
            return available
        return self.keep

    def __str__(self) -> str:
        if self.keep is not None:
            return str(self.keep)
        # The shortest decimal that reads back as the same float, positional (the grammar has no exponents).
        return format(Decimal(repr(self.keep_ratio)), "f")


@dataclass
class Stage:
    """One pruning step: a strategy, where it acts (``layer=None``: before the LLM), and its budget."""

    strategy: Strategy
    layer: int | None = None
    budget: Budget | None = None

    @property
    def place(self) -> str:
        """Where the stage acts: ``"input"`` (before the LLM) or ``"decoder"``."""
        if self.layer is None and INPUT_PLACE in self.strategy.places:
            return INPUT_PLACE
        return DECODER_PLACE

    @property
    def key(self) -> str:
        """What records call the stage (``ImageRecord.kept_by_stage``): ``"input"``, or ``"layer K"`` in the decoder."""
        return INPUT_PLACE if self.place == INPUT_PLACE else f"layer {self.layer}"

    def __post_init__(self) -> None:
        name = self.strategy.name
        has_default = type(self.strategy).default_layer is not Strategy.default_layer
        if self.layer is None and self.place == DECODER_PLACE and not has_default:
            raise LayerError(f"strategy {name!r} acts inside the decoder: give layer=K")
        if self.place not in self.strategy.places:
            where = "inside the decoder: give layer=K" if self.place == INPUT_PLACE else "before the LLM: drop layer="
            raise LayerError(f"strategy {name!r} acts {where}")
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)):
            raise LayerError(f"layer must be an int decoder layer index, got {self.layer!r}")
        if self.layer is not None and self.layer < 0:
            raise LayerError(f"layer must be >= 0, got {self.layer}")
        if self.strategy.needs_budget and self.budget is None:
            raise BudgetError(f"strategy {name!r} needs a budget: pass keep=<tokens per image> or keep_ratio=<0..1>")
        if not self.strategy.needs_budget and self.budget is not None:
            raise BudgetError(f"strategy {name!r} keeps every token and takes no budget; drop keep/keep_ratio")

    def __str__(self) -> str:
        """The string form, which :func:`parse_schedule` reads back as this stage (options that differ from their
        defaults included; a user strategy's undeclared options cannot be written)."""
        text = self.strategy.name
        if self.layer is not None:
            text += f"@{self.layer}"
        if self.budget is not None:
            text += f":{self.budget}"
        defaults = constructor_defaults(type(self.strategy))
        options = [
            f"{name}:{option.format(getattr(self.strategy, name))}"
            for name, option in declared_options(type(self.strategy)).items()
            if getattr(self.strategy, name) != defaults.get(name, option)  # an option without a default: always
        ]
        return text + (f"({';'.join(options)})" if options else "")


@dataclass
class Schedule:
    """Stages in the order they act: at most one before the LLM, then decoder stages by layer."""

    stages: list[Stage] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.stages:
            raise ScheduleError("a schedule needs at least one stage")
        if sum(stage.place == INPUT_PLACE for stage in self.stages) > 1:
            raise ScheduleError("a schedule can have only one stage before the LLM; chain decoder stages with layer=K")
        layers = [stage.layer for stage in self.stages if stage.layer is not None]
        if len(set(layers)) != len(layers):
            raise LayerError(f"two decoder stages at the same layer: {sorted(layers)}")
        self.stages = sorted(self.stages, key=lambda stage: -1 if stage.layer is None else stage.layer)

    @property
    def input_stage(self) -> Stage | None:
        return next((stage for stage in self.stages if stage.place == INPUT_PLACE), None)

    @property
    def decoder_stages(self) -> list[Stage]:
        return [stage for stage in self.stages if stage.place == DECODER_PLACE]

    def resolved(self, num_layers: int) -> Schedule:
        """This schedule for a decoder of ``num_layers``: default depths filled in, every layer checked."""
        stages = [
            replace(stage, layer=min(num_layers - 1, max(1, _default_layer(stage, num_layers))))
            if stage.place == DECODER_PLACE and stage.layer is None
            else stage
            for stage in self.stages
        ]
        schedule = Schedule(stages)
        schedule.check_depth(num_layers)
        return schedule

    def check_depth(self, num_layers: int) -> None:
        for stage in self.decoder_stages:
            assert stage.layer is not None  # a resolved schedule: every decoder stage has its layer
            if stage.layer >= num_layers:
                raise LayerError(
                    f"{stage.strategy.name} at layer {stage.layer}: the decoder has layers 0..{num_layers - 1}"
                )
            if "attention" in stage.strategy.needs and stage.layer == 0:
                raise LayerError(
                    f"{stage.strategy.name} scores with the attention of layer K-1, so it needs layer >= 1"
                )

    def __str__(self) -> str:
        return "+".join(str(stage) for stage in self.stages)


def _default_layer(stage: Stage, num_layers: int) -> int:
    layer = stage.strategy.default_layer(num_layers)
    # Stage.__post_init__ refuses a decoder stage without layer= whose strategy has no default_layer.
    assert layer is not None, f"{stage.strategy.name} has no default layer"
    return layer


def make_stage(
    strategy: str | Strategy,
    *,
    layer: int | None = None,
    keep: int | None = None,
    keep_ratio: float | None = None,
    **options: Any,
) -> Stage:
    """Build one stage from the same arguments :func:`vtprune.prune` takes."""
    budget = None if keep is None and keep_ratio is None else Budget(keep=keep, keep_ratio=keep_ratio)
    return Stage(make_strategy(strategy, **options), layer=layer, budget=budget)


_STAGE_RE = re.compile(
    rf"^(?P<name>{NAME_PATTERN})(?:@(?P<layer>\d+))?(?::(?P<budget>[\d.]+%?))?(?:\((?P<options>[^)]*)\))?$",
    flags=re.ASCII,
)


def parse_budget(text: str) -> Budget:
    """``64`` -> 64 tokens; ``25%`` or ``0.25`` -> a quarter of the tokens."""
    number = text.removesuffix("%")
    try:
        value = float(number) if "." in number or number != text else int(number)
    except ValueError:
        raise ScheduleError(
            f"budget {text!r} is not a token count (64), a percentage (25%) or a fraction (0.25)"
        ) from None
    if text.endswith("%"):
        return Budget(keep_ratio=value / 100)
    return Budget(keep_ratio=value) if isinstance(value, float) else Budget(keep=value)


def parse_schedule(text: str) -> Schedule:
    """Parse the string form described in this module's docstring."""
    stages = []
    for part in text.replace(" ", "").split("+"):
        match = _STAGE_RE.match(part)
        if match is None:
            raise ScheduleError(
                f"cannot parse schedule stage {part!r}; expected name[@layer][:budget][(key:value;...)], "
                "e.g. 'divprune:64' or 'fastv@2:50%'"
            )
        budget = parse_budget(match["budget"]) if match["budget"] else None
        layer = int(match["layer"]) if match["layer"] is not None else None
        strategy = make_strategy(match["name"], **_parse_options(match["options"], part))
        stages.append(Stage(strategy, layer=layer, budget=budget))
    return Schedule(stages)


def parse_strategy(text: str) -> Strategy:
    """``name`` or ``name(key:value;...)`` -> a strategy instance (no place, no budget)."""
    match = _STAGE_RE.match(text.replace(" ", ""))
    if match is None or match["layer"] is not None or match["budget"] is not None:
        raise ScheduleError(f"cannot parse strategy {text!r}; expected name or name(key:value;...)")
    return make_strategy(match["name"], **_parse_options(match["options"], text))


def _parse_options(text: str | None, part: str) -> dict[str, Any]:
    options = {}
    for item in filter(None, (text or "").split(";")):
        key, sep, value = item.partition(":")
        if not sep:
            raise ScheduleError(f"option {item!r} in {part!r} must be key:value")
        if key in options:
            raise ScheduleError(f"option {key!r} is given twice in {part!r}")
        options[key] = parse_value(value)
    return options


def as_schedule(
    strategy: str | Strategy | Stage | Schedule | Sequence[Stage],
    *,
    layer: int | None = None,
    keep: int | None = None,
    keep_ratio: float | None = None,
    **options: Any,
) -> Schedule:
    """Accept every form :func:`vtprune.prune` takes and return a :class:`Schedule`."""
    extra = {"layer": layer, "keep": keep, "keep_ratio": keep_ratio, **options}
    given = sorted(key for key, value in extra.items() if value is not None)
    if isinstance(strategy, str) and not _is_schedule_string(strategy):
        return Schedule([make_stage(strategy, layer=layer, keep=keep, keep_ratio=keep_ratio, **options)])
    if isinstance(strategy, Strategy):
        return Schedule([make_stage(strategy, layer=layer, keep=keep, keep_ratio=keep_ratio, **options)])
    if given:
        raise OptionError(f"{given} cannot be combined with a schedule; put them inside its stages")
    if isinstance(strategy, str):
        return parse_schedule(strategy)
    if isinstance(strategy, Schedule):
        return strategy
    if isinstance(strategy, Stage):
        return Schedule([strategy])
    return Schedule(list(strategy))


def _is_schedule_string(text: str) -> bool:
    return any(mark in text for mark in "+:@(")
