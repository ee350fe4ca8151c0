"""Declared strategy options: each constructor keyword of a strategy is a class attribute that checks its value.

A strategy declares its options next to its other class attributes and assigns them in ``__init__``::

    class MMTok(GreedyStrategy):
        alpha = Option(float, at_least=0)

        def __init__(self, alpha: float = 0.5) -> None:
            self.alpha = alpha  # NaN, inf, -1, "x" and True are refused here, naming ``alpha``

so a value is checked wherever a strategy is built (``prune``, a schedule string, ``select``, the class itself),
before any model is touched. The declarations also give the registry and the tests every option of every
strategy, and a stage its string form (:meth:`Option.format` writes what the schedule grammar reads back).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from numbers import Integral, Real
from typing import Any, cast

from ..errors import OptionError


class Option:
    """One strategy option: its type (``int``, ``float``, ``str`` or ``bool``) and the values it accepts.

    ``int`` and ``float`` options take finite numbers only (``float`` ones take ints too, stored as floats; bools
    are not numbers here). ``at_least`` / ``above`` / ``at_most`` / ``below`` bound them, ``choices`` lists a ``str`` option's
    values, ``optional`` allows ``None`` and ``many`` makes it a non-empty tuple of such values (written
    ``a/b/c`` in schedule strings; one value is a tuple of one).
    """

    def __init__(
        self,
        kind: type,
        *,
        at_least: float | None = None,
        above: float | None = None,
        at_most: float | None = None,
        below: float | None = None,
        choices: Sequence[str] | None = None,
        optional: bool = False,
        many: bool = False,
    ) -> None:
        if kind not in (int, float, str, bool):
            raise TypeError(f"Option kind must be int, float, str or bool, got {kind!r}")
        self.kind, self.at_least, self.above, self.at_most, self.below = kind, at_least, above, at_most, below
        self.choices = None if choices is None else tuple(choices)
        self.optional, self.many = optional, many
        self.name = ""
        self.owner: type | None = None  # the class that declares it (its constructor has the default)

    def __set_name__(self, owner: type, name: str) -> None:
        self.name, self.owner = name, owner

    def __get__(self, strategy: Any, owner: type | None = None) -> Any:
        if strategy is None:
            return self
        if (
            self.name not in strategy.__dict__
        ):  # a subclass whose __init__ did not set it: the declaring class's default
            assert self.owner is not None, "set by __set_name__ when the declaring class was made"
            return constructor_defaults(self.owner)[self.name]
        return strategy.__dict__[self.name]

    def __set__(self, strategy: Any, value: Any) -> None:
        strategy.__dict__[self.name] = self.check(value)

    def check(self, value: Any) -> Any:
        """``value`` as stored (floats as float, sequences as tuples), or an :class:`OptionError` naming the option."""
        if self.optional and (value is None or (self.kind is not str and value == "none")):
            return None
        if self.many:  # a sequence, a/b/c from a schedule string, or one value
            if isinstance(value, str):
                items = [parse_value(item) for item in value.split("/")]
            else:
                items = list(value) if isinstance(value, (list, tuple)) else [value]
            if not items:
                raise self._refuse(value)
            return tuple(self._check_one(item, value) for item in items)
        return self._check_one(value, value)

    def _check_one(self, item: Any, value: Any) -> Any:
        if self.kind is bool:
            if isinstance(item, bool):
                return item
            raise self._refuse(value)
        if self.kind is str:
            if isinstance(item, str) and (self.choices is None or item in self.choices):
                return item
            raise self._refuse(value)
        wanted = Integral if self.kind is int else Real
        if isinstance(item, bool) or not isinstance(item, wanted) or not math.isfinite(item):
            raise self._refuse(value)
        number: float = int(cast(Integral, item)) if self.kind is int else float(item)
        too_low = (self.at_least is not None and number < self.at_least) or (
            self.above is not None and number <= self.above
        )
        too_high = (self.at_most is not None and number > self.at_most) or (
            self.below is not None and number >= self.below
        )
        if too_low or too_high:
            raise self._refuse(value)
        return number

    def _refuse(self, value: Any) -> OptionError:
        return OptionError(f"option {self.name}={value!r} is not accepted: {self.name} must be {self.describe()}")

    def describe(self) -> str:
        """What the option accepts, in words (for error messages and the docs)."""
        if self.kind is bool:
            text = "true or false"
        elif self.kind is str:
            text = "a string" if self.choices is None else f"one of {', '.join(map(repr, self.choices))}"
        else:
            text = "an int" if self.kind is int else "a finite number"
            bounds = [
                f"{sign} {bound:g}"
                for sign, bound in ((">=", self.at_least), (">", self.above), ("<=", self.at_most), ("<", self.below))
                if bound is not None
            ]
            text += " " + " and ".join(bounds) if bounds else ""
        if self.many:
            text = f"a non-empty sequence of which each is {text} (in a schedule string: a/b/c)"
        return text + (", or None (none in a schedule string)" if self.optional else "")

    def format(self, value: Any) -> str:
        """``value`` as the schedule grammar reads it back (``parse_schedule(str(stage)) == stage``)."""
        if value is None:
            return "none"
        if self.many:
            return "/".join(self._format_one(item) for item in value)
        return self._format_one(value)

    @staticmethod
    def _format_one(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        return repr(value) if isinstance(value, float) else str(value)


def parse_value(text: str) -> Any:
    """An option value as written in a schedule string: ``true`` / ``false``, an int, a float, else the text."""
    lowered = text.lower()
    if lowered in {"true", "false"}:
        return lowered == "true"
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def declared_options(cls: type) -> dict[str, Option]:
    """The options ``cls`` declares, its base classes' included, by name."""
    found: dict[str, Option] = {}
    for klass in reversed(cls.__mro__):
        found.update({name: value for name, value in vars(klass).items() if isinstance(value, Option)})
    return found


def constructor_defaults(cls: type) -> dict[str, Any]:
    """The keywords ``cls``'s constructor takes, with their defaults (``inspect.Parameter.empty`` where required)."""
    parameters = list(inspect.signature(cls).parameters.values())  # the constructor's, without self
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name: p.default for p in parameters if p.kind in named}
