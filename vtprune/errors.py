"""Exceptions vtprune raises; each message says what to do instead."""


class VTPruneError(Exception):
    """Base class of every vtprune error."""


class UnknownStrategyError(VTPruneError, KeyError):
    """The strategy name is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class BudgetError(VTPruneError, ValueError):
    """The budget is missing, doubled or out of range."""


class UnsupportedModelError(VTPruneError, TypeError):
    """The model class has no adapter."""


class UnsupportedCacheError(VTPruneError, ValueError):
    """The cache or decoding mode cannot hold sequences of different lengths per layer."""


class AlreadyPrunedError(VTPruneError, RuntimeError):
    """The model instance is already wrapped by vtprune."""


class LayerError(VTPruneError, ValueError):
    """A decoder layer index is outside the model or not allowed for the strategy."""


class TextTowerError(VTPruneError, ValueError):
    """A CLIP text tower (``text_tower=``) cannot be loaded or does not fit the model's vision features."""
