"""vtprune: prune the visual tokens of Hugging Face vision-language models with one call."""

from .adapters import supported_models
from .api import prune, pruned, scores, select, select_nested
from .engine.handle import PruneHandle
from .errors import (
    AlreadyPrunedError,
    BudgetError,
    BudgetWarning,
    ConcurrentCallError,
    InputError,
    LayerError,
    NoRecordError,
    OptionError,
    RegistrationError,
    RunFailed,
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
from .strategies import (
    DECODER_PLACE,
    INPUT_PLACE,
    GreedyStrategy,
    MergingStrategy,
    Option,
    Strategy,
    TokenContext,
    list_strategies,
    register_strategy,
)
from .vocabulary.grids import Segment

__version__ = "0.1.0"

__all__ = [
    "AlreadyPrunedError",
    "Budget",
    "BudgetError",
    "BudgetWarning",
    "DECODER_PLACE",
    "ConcurrentCallError",
    "GreedyStrategy",
    "INPUT_PLACE",
    "ImageRecord",
    "InputError",
    "LayerError",
    "MergingStrategy",
    "NoRecordError",
    "Option",
    "OptionError",
    "PruneHandle",
    "PruneRecord",
    "RegistrationError",
    "RunFailed",
    "Schedule",
    "ScheduleError",
    "Segment",
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
