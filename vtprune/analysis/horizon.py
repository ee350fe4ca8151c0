"""The information horizon: the layer from which on visual tokens carry (almost) no information, or equal shares.

Per measured layer, over all samples and measured tokens: the mean information (with its standard error over
samples), the mean relative to the first measured layer, and the uniformity of the information over a sample's
tokens — the normalised entropy ``H(w) / log m`` of the shares ``w_i = I_i / Σ_j I_j`` (negative values clipped
to 0), 1 when every token carries the same, near 0 when one token carries everything; averaged over samples.

Two rules, both "from this layer on" (every later measured layer must satisfy it too, so a dip does not count):

- ``"fraction"`` (default): relative mean information ≤ ``fraction`` (0.1), i.e. it fell to a tenth of the
  first measured layer's — the paper's "information vanishes";
- ``"uniform"``: uniformity ≥ ``uniformity`` (0.95) — the paper's "information becomes uniform", past which no
  criterion can tell tokens apart, so random selection is as good as any.

The horizon is None when no measured layer satisfies the rule. Everything the rule read is in the result.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from ..errors import VTPruneError
from .information import MEASURES, SampleInformation

RULES = ("fraction", "uniform")


@dataclass
class Horizon:
    """Per-layer curves and the horizon they give (JSON round-trip with :meth:`save` / :meth:`load`)."""

    layers: list[int]
    num_layers: int
    """Decoder depth of the model measured (a saved horizon is only used on a model of this depth)."""
    measure: str
    mean: list[float]
    """Mean information per layer, over samples and measured tokens."""
    sem: list[float]
    """Standard error of ``mean`` over samples (0 with one sample)."""
    relative: list[float]
    """``mean`` divided by the first measured layer's."""
    uniformity: list[float]
    """Mean normalised entropy of the per-token shares (1 = uniform)."""
    rule: str
    fraction: float
    uniformity_threshold: float
    samples: int
    layer: int | None
    """The horizon: first measured layer from which on the rule holds (None: never)."""

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Horizon:
        try:
            data = json.loads(Path(path).read_text())
            return cls(**{f.name: data[f.name] for f in fields(cls)})  # other keys (score quality) ride along
        except (OSError, ValueError, TypeError, KeyError) as error:
            raise VTPruneError(f"cannot read a saved horizon from {str(path)!r}: {error}") from error


def uniformity(values: torch.Tensor) -> torch.Tensor:
    """(...,) normalised entropy of the shares of ``values`` (..., m) along the last dim; 1 where all are 0."""
    weights = values.clamp(min=0).double()
    total = weights.sum(-1, keepdim=True)
    m = values.shape[-1]
    if m < 2:
        return torch.ones(values.shape[:-1], dtype=torch.float64)
    shares = torch.where(total > 0, weights / total.clamp(min=torch.finfo(torch.float64).tiny), 1.0 / m)
    entropy = -(shares * shares.clamp(min=1e-300).log()).sum(-1)
    return entropy / math.log(m)


def horizon(
    information: Sequence[SampleInformation],
    *,
    num_layers: int,
    measure: str = "kl",
    rule: str = "fraction",
    fraction: float = 0.1,
    uniformity_threshold: float = 0.95,
) -> Horizon:
    """The per-layer curves of ``information`` (from :func:`token_information`) and the horizon by ``rule``."""
    if measure not in MEASURES:
        raise VTPruneError(f"measure must be one of {MEASURES}, got {measure!r}")
    if rule not in RULES:
        raise VTPruneError(f"rule must be one of {RULES}, got {rule!r}")
    if not information:
        raise VTPruneError("horizon needs the information of at least one sample")
    layers = information[0].layers
    if any(sample.layers != layers for sample in information):
        raise VTPruneError("every sample must be measured at the same layers")
    per_sample = torch.stack([sample.values[measure].double().mean(-1) for sample in information])  # (S, layers)
    spread = torch.stack([uniformity(sample.values[measure]) for sample in information])
    mean = per_sample.mean(0)
    sem = per_sample.std(0) / math.sqrt(len(information)) if len(information) > 1 else torch.zeros_like(mean)
    first = float(mean[0])
    relative = mean / first if first > 0 else torch.zeros_like(mean)
    even = spread.mean(0)
    holds = relative <= fraction if rule == "fraction" else even >= uniformity_threshold
    found = None
    for index in range(len(layers) - 1, -1, -1):  # the earliest layer from which on it holds everywhere
        if not bool(holds[index]):
            break
        found = layers[index]
    return Horizon(
        layers=list(layers),
        num_layers=num_layers,
        measure=measure,
        mean=mean.tolist(),
        sem=sem.tolist(),
        relative=relative.tolist(),
        uniformity=even.tolist(),
        rule=rule,
        fraction=fraction,
        uniformity_threshold=uniformity_threshold,
        samples=len(information),
        layer=found,
    )
