"""``random_deep``: random pruning past the information horizon (deep-layer random pruning, CVPR 2026)."""

from __future__ import annotations

from .base import DECODER_STAGE
from .random import RandomPruning
from .registry import register_strategy


@register_strategy("random_deep")
class RandomDeepPruning(RandomPruning):
    """Drop a uniform random subset of the visual tokens still present at a deep decoder layer.

    The paper's finding: past an "information horizon" layer visual tokens carry almost no
    information, so no criterion beats random there. Stack it on any pre-LLM strategy, e.g.
    ``"divprune:50%+random_deep:50%"``. The draw is seeded per sample (see ``random``).

    Left open by the paper (no public code), decided here: the layer defaults to half the decoder
    depth — the horizon the paper reports for LLaVA-1.5-7B general VQA (layer 16 of 32). Other
    reported horizons, to pass as ``@layer``: LLaVA-1.5-7B OCR-like tasks 24/32, Qwen2.5-VL-7B
    20/28 (general) and 27/28 (OCR). The ratio is the stage's budget.
    """

    stages = frozenset({DECODER_STAGE})

    def default_layer(self, num_layers: int) -> int:
        return num_layers // 2
