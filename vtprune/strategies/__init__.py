"""Built-in strategies. Importing this package registers them under their names."""

from .base import DECODER_PLACE, INPUT_PLACE, GreedyStrategy, MergingStrategy, Strategy, TokenContext
from .cdpruner import CDPruner
from .divprune import DivPrune
from .fastv import FastV
from .matryoshka import Matryoshka
from .mmtok import MMTok
from .none import NoPruning
from .options import Option
from .random import RandomPruning
from .random_deep import RandomDeepPruning
from .registry import list_strategies, make_strategy, register_strategy, strategy_class
from .todre import ToDRE, ToDRERelevance
from .trim import TRIM
from .uniform import UniformPruning
from .zoo import ZOOPrune

__all__ = [
    "DECODER_PLACE",
    "INPUT_PLACE",
    "TRIM",
    "CDPruner",
    "DivPrune",
    "FastV",
    "GreedyStrategy",
    "MMTok",
    "Matryoshka",
    "MergingStrategy",
    "NoPruning",
    "Option",
    "RandomDeepPruning",
    "RandomPruning",
    "Strategy",
    "ToDRE",
    "ToDRERelevance",
    "TokenContext",
    "UniformPruning",
    "ZOOPrune",
    "list_strategies",
    "make_strategy",
    "register_strategy",
    "strategy_class",
]
