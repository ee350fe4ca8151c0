"""Name -> strategy class registry, open to user strategies."""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from ..errors import UnknownStrategyError
from .base import Strategy

_REGISTRY: dict[str, type[Strategy]] = {}

S = TypeVar("S", bound=type[Strategy])


def register_strategy(name: str, *, overwrite: bool = False) -> Callable[[S], S]:
    """Class decorator that makes a :class:`Strategy` subclass available under ``name``."""

    def decorate(cls: S) -> S:
        if not (isinstance(cls, type) and issubclass(cls, Strategy)):
            raise TypeError(f"register_strategy({name!r}) decorates Strategy subclasses, got {cls!r}")
        if name in _REGISTRY and not overwrite and _REGISTRY[name] is not cls:
            raise ValueError(f"a strategy named {name!r} is already registered; pass overwrite=True to replace it")
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
    """Build a strategy from its name and options, or pass an instance through unchanged."""
    if isinstance(strategy, Strategy):
        if options:
            raise TypeError(f"options {sorted(options)} given with a strategy instance; set them on the instance")
        return strategy
    cls = strategy_class(strategy)
    try:
        return cls(**options)
    except TypeError as exc:
        raise TypeError(f"strategy {strategy!r} does not take these options: {sorted(options)} ({exc})") from None
