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


class ScheduleError(VTPruneError, ValueError):
    """A schedule string that does not parse, or stages that do not form a schedule."""


class OptionError(VTPruneError, ValueError, TypeError):
    """A strategy option that the strategy does not take, of the wrong type or out of its range."""


class InputError(VTPruneError, ValueError):
    """Tokens or per-image inputs of the wrong shape, missing, or not finite."""


class RegistrationError(VTPruneError, ValueError):
    """A strategy that cannot be registered: a name the schedule grammar cannot parse, a taken name, unknown needs."""


class StrategyOutputError(VTPruneError):
    """A strategy returned something other than what its contract says (user strategies are code vtprune did not write)."""


class TextTowerError(OptionError):
    """A CLIP text tower (``text_tower=``) cannot be loaded or does not fit the model's vision features."""


class ConcurrentCallError(VTPruneError, RuntimeError):
    """A second thread called a wrapped model while a forward of it was in progress."""


class WrappedCopyError(VTPruneError, TypeError):
    """A wrapped model (or a cache it produced) was deep-copied or pickled."""


class UnsupportedTrainingError(VTPruneError, ValueError):
    """A training input a decoder stage cannot honour (labels, gradient checkpointing)."""


class NoRecordError(VTPruneError, RuntimeError):
    """A record was asked of a handle under which no prefill has run yet."""


class BudgetWarning(UserWarning):
    """A budget asked for more tokens than an image has (shown once per place by default)."""


class RunFailed(BaseException):
    """A vtprune benchmark run (``vtprune.harness``) cannot go on (a ``generate()`` raised, or the model could not be set up).

    Deliberately not an ``Exception``: lmms-eval catches ``Exception`` around ``generate()`` (an empty
    answer) and around the whole evaluation (a traceback, then exit code 0), so only a
    ``BaseException`` reliably stops the run and makes the process fail.
    """
