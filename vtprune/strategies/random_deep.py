"""``random_deep``: random pruning past the information horizon (deep-layer random pruning, CVPR 2026)."""

from __future__ import annotations

from torch import Tensor

from ..errors import LayerError, OptionError, VTPruneError
from .base import DECODER_PLACE, TokenContext
from .options import Option
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

    ``horizon=<path>`` (in a schedule string ``random_deep:50%(horizon:h.json)``) acts at the horizon
    measured for your model and task and saved by ``vtprune horizon --out h.json``
    (:class:`vtprune.analysis.Horizon`); the saved result must be of a model as deep as this one and
    must have found a horizon, and an explicit ``@layer`` other than it is refused.
    """

    places = frozenset({DECODER_PLACE})

    horizon = Option(str, optional=True)

    def __init__(self, horizon: str | None = None) -> None:
        self.horizon = horizon
        self._layer = None if self.horizon is None else self._saved_layer(self.horizon)

    @staticmethod
    def _saved_layer(path: str) -> tuple[int, int]:
        from ..analysis.horizon import Horizon

        try:
            saved = Horizon.load(path)
        except VTPruneError as error:
            raise OptionError(f"option horizon={path!r} is not accepted: {error}") from None
        if saved.layer is None:
            raise LayerError(
                f"random_deep: the horizon saved in {path!r} found no horizon (no measured layer met its rule); "
                "give the layer as random_deep@K"
            )
        return saved.layer, saved.num_layers

    def default_layer(self, num_layers: int) -> int:
        if self._layer is None:
            return num_layers // 2
        layer, measured_depth = self._layer
        if measured_depth != num_layers:
            raise LayerError(
                f"random_deep: the horizon in {self.horizon!r} was measured on a {measured_depth}-layer decoder, "
                f"this model has {num_layers}: measure it on this model (vtprune horizon)"
            )
        return layer

    def select(self, ctx: TokenContext) -> Tensor:
        if self._layer is not None and ctx.layer != self._layer[0]:
            raise LayerError(
                f"random_deep(horizon:{self.horizon!r}) acts at the saved horizon, layer {self._layer[0]}, but was "
                f"placed at layer {ctx.layer}: drop the @layer"
            )
        return super().select(ctx)
