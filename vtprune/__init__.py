"""vtprune: prune the visual tokens of Hugging Face vision-language models with one call."""

from .adapters import supported_models
from .api import prune, pruned, scores, select, select_nested
from .engine.handle import PruneHandle
from .errors import (
    AlreadyPrunedError,
    BudgetError,
    ConcurrentCallError,
    InputError,
    LayerError,
    OptionError,
    RegistrationError,
    ScheduleError,
    StrategyOutputError,
    TextTowerError,
    UnknownStrategyError,
    UnsupportedCacheError,
    UnsupportedModelError,
    UnsupportedTrainingError,
    VTPruneError,
    WrappedCopyError,
)
from .record import ImageRecord, PruneRecord
from .schedule import Budget, Schedule, Stage, make_stage, parse_schedule
from .strategies import GreedyStrategy, Option, Strategy, TokenContext, list_strategies, register_strategy

__version__ = "0.1.0"

__all__ = [
    "AlreadyPrunedError",
    "Budget",
    "BudgetError",
    "ConcurrentCallError",
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
    "TextTowerError",
    "TokenContext",
    "UnknownStrategyError",
    "UnsupportedCacheError",
    "UnsupportedModelError",
    "UnsupportedTrainingError",
    "VTPruneError",
    "WrappedCopyError",
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
