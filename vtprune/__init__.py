"""vtprune: prune the visual tokens of Hugging Face vision-language models with one call."""

from .adapters import supported_models
from .api import prune, pruned, scores, select, select_nested
from .errors import (
    AlreadyPrunedError,
    BudgetError,
    InputError,
    LayerError,
    OptionError,
    RegistrationError,
    ScheduleError,
    StrategyOutputError,
    UnknownStrategyError,
    UnsupportedCacheError,
    UnsupportedModelError,
    VTPruneError,
)
from .handle import PruneHandle
from .record import ImageRecord, PruneRecord
from .schedule import Budget, Schedule, Stage, make_stage, parse_schedule
from .strategies import GreedyStrategy, Option, Strategy, TokenContext, list_strategies, register_strategy

__version__ = "0.1.0"

__all__ = [
    "AlreadyPrunedError",
    "Budget",
    "BudgetError",
    "GreedyStrategy",
    "ImageRecord",
    "InputError",
    "LayerError",
    "Option",
    "OptionError",
    "PruneHandle",
    "PruneRecord",
    "RegistrationError",
    "Schedule",
    "ScheduleError",
    "Stage",
    "Strategy",
    "StrategyOutputError",
    "TokenContext",
    "UnknownStrategyError",
    "UnsupportedCacheError",
    "UnsupportedModelError",
    "VTPruneError",
    "list_strategies",
    "make_stage",
    "parse_schedule",
    "prune",
    "pruned",
    "register_strategy",
    "scores",
    "select",
    "select_nested",
    "supported_models",
]
