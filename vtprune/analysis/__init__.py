"""Measurements of what visual tokens carry: per-token information per layer, the horizon, score quality.

``token_information`` removes each visual token from a decoder layer on (batched, through vtprune's own decoder
stage) and measures the change of the answer's next-token distribution; ``horizon`` finds the layer from which on
that information vanishes or is uniform; ``score_quality`` says how well each strategy's scores predict it.
"""

from .horizon import RULES, Horizon, horizon, uniformity
from .information import MEASURES, LeaveOut, SampleInformation, token_information
from .picture import information_panels
from .quality import ScoreQuality, ranking_strategies, score_quality, strategy_scores

__all__ = [
    "MEASURES",
    "RULES",
    "Horizon",
    "LeaveOut",
    "SampleInformation",
    "ScoreQuality",
    "horizon",
    "information_panels",
    "ranking_strategies",
    "score_quality",
    "strategy_scores",
    "token_information",
    "uniformity",
]
