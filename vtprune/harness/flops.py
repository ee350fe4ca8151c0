"""Analytic prefill cost of the LLM from the tokens that actually entered each decoder layer.

One formula, counted per layer from ``PruneRecord.layer_lengths`` (so a stage inside the decoder
is charged exactly for the layers it shortened). For a layer that sees ``n`` tokens, with hidden
size ``d``, ``h`` query heads and ``g`` key/value heads of size ``c``, and MLP width ``m``::

    FLOPs(n) = 2·n·d·(2·h·c + 2·g·c)      q, k, v, o projections
             + 2·2·n²·h·c                  scores q·kᵀ and the weighted sum of values
             + 2·k·n·d·m                   MLP with k matrices (3 for gated SwiGLU, 2 otherwise)

(2 FLOPs per multiply-add; the causal mask is not credited, as in the papers). The pruning papers
use FastV's per-layer count ``4nd² + 2n²d + 2ndm`` (multiply-adds, multi-head attention, a
two-matrix MLP): with ``g = h``, ``h·c = d`` and ``k = 2`` this formula is exactly twice FastV's,
so ratios between runs are the same; with grouped-query attention and gated MLPs (every model
vtprune supports) it counts what those layers really compute. The vision encoder, the LM head,
norms and rotary embeddings are not counted: they do not depend on the pruning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from torch import nn


@dataclass(frozen=True)
class DecoderShape:
    """The sizes of one decoder layer that the cost formula needs."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp_width: int
    mlp_matrices: int
    layers: int

    @classmethod
    def of(cls, text_model: nn.Module) -> DecoderShape:
        """Read the sizes off a decoder (``adapter.text_model``): its config, and its MLP for the gate."""
        config: Any = text_model.config  # a PretrainedConfig: torch types module attributes as Tensor | Module
        heads: int = config.num_attention_heads
        mlp = cast(nn.ModuleList, text_model.layers)[0].mlp
        return cls(
            hidden=config.hidden_size,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            mlp_width=config.intermediate_size,
            mlp_matrices=3 if hasattr(mlp, "gate_proj") else 2,
            layers=config.num_hidden_layers,
        )

    def layer_flops(self, tokens: int) -> int:
        """FLOPs of one decoder layer over ``tokens`` tokens (the formula in the module docstring)."""
        d, c = self.hidden, self.head_dim
        projections = 2 * tokens * d * (2 * self.heads * c + 2 * self.kv_heads * c)
        attention = 4 * tokens * tokens * self.heads * c
        mlp = 2 * self.mlp_matrices * tokens * d * self.mlp_width
        return projections + attention + mlp

    def prefill_flops(self, layer_lengths: Sequence[int]) -> int:
        """FLOPs of the whole decoder for one sample, given the tokens that entered each layer."""
        return sum(self.layer_flops(int(n)) for n in layer_lengths)

    def kv_cache_bytes(self, layer_lengths: Sequence[int], bytes_per_value: int) -> int:
        """Bytes of keys and values the prefill leaves in a DynamicCache (each layer holds what entered it)."""
        return sum(2 * int(n) * self.kv_heads * self.head_dim * bytes_per_value for n in layer_lengths)
