"""Name -> strategy class registry, open to user strategies."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import fields
from typing import Any, TypeVar

from ..errors import OptionError, RegistrationError, UnknownStrategyError
from .base import Strategy, TokenContext
from .options import constructor_defaults

_REGISTRY: dict[str, type[Strategy]] = {}

#: What the schedule grammar reads as a strategy name (``vtprune.schedule`` parses with it).
NAME_PATTERN = r"[A-Za-z_][\w\-]*"

#: The context fields a strategy may ask the engine for; the features and the budget are always there.
NEEDABLE = frozenset(field.name for field in fields(TokenContext)) - {"features", "keep"}

S = TypeVar("S", bound=type[Strategy])


def register_strategy(name: str, *, overwrite: bool = False) -> Callable[[S], S]:
    """Class decorator that makes a :class:`Strategy` subclass available under ``name``.

    One class may be registered under several names; an instance built by name reports the name it was built by.
    """
    if not isinstance(name, str) or re.fullmatch(NAME_PATTERN, name, flags=re.ASCII) is None:
        raise RegistrationError(
            f"strategy name {name!r} cannot be written in a schedule string: use a letter or _ followed by letters, "
            "digits, _ or - (no +, :, @, parentheses, spaces)"
        )

    def decorate(cls: S) -> S:
        if not (isinstance(cls, type) and issubclass(cls, Strategy)):
            raise TypeError(f"register_strategy({name!r}) decorates Strategy subclasses, got {cls!r}")
        if name in _REGISTRY and not overwrite and _REGISTRY[name] is not cls:
            raise RegistrationError(
                f"a strategy named {name!r} is already registered; pass overwrite=True to replace it"
            )
        unknown = set(cls.needs) - NEEDABLE
        if unknown:
            raise RegistrationError(
                f"strategy {name!r} needs {sorted(unknown)}, which are not TokenContext fields; "
                f"it can need {sorted(NEEDABLE)}"
            )
        if not set(cls.optional_needs) <= set(cls.needs):
            raise RegistrationError(f"strategy {name!r}: optional_needs {sorted(cls.optional_needs)} must be in needs")
        if "name" not in vars(cls):  # the class's own first name; instances built by name carry theirs
            cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def list_strategies() -> list[str]:
    """Names of every registered strategy, sorted."""
    return sorted(_REGISTRY)


def strategy_class(name: str) -> type[Strategy]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownStrategyError(
            f"unknown strategy {name!r}; known strategies: {', '.join(list_strategies())}. "
            "Register your own with @vtprune.register_strategy(name)."
        ) from None


def make_strategy(strategy: str | Strategy, **options: Any) -> Strategy:
    """Build a strategy from its name and options (each checked), or pass an instance through unchanged."""
    if isinstance(strategy, Strategy):
        if options:
            raise OptionError(f"options {sorted(options)} given with a strategy instance; set them on the instance")
        return strategy
    cls = strategy_class(strategy)
    try:
        made = cls(**options)
    except OptionError as error:
        raise OptionError(f"strategy {strategy!r}: {error}") from None
    except TypeError as error:  # an unknown keyword
        takes = sorted(constructor_defaults(cls)) or "none"
        raise OptionError(
            f"strategy {strategy!r} does not take these options: {sorted(options)}; it takes {takes} ({error})"
        ) from None
    made.name = strategy
    return made
