"""Exact attention probabilities of a decoder layer, without switching the model to eager attention.

SDPA returns no attention weights. Recomputing the queries and keys of one layer from its input is
cheap next to the layer itself and gives the probabilities eager attention would (to float
rounding), on every model family vtprune supports: all of them apply RoPE as
``x·cos + rotate_half(x)·sin`` with ``cos`` and ``sin`` of shape (B, L, head_dim), and Qwen3-VL
normalises q and k per head before it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..vocabulary.layout import last_valid


def _rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
    return x * cos + _rotate_half(x) * sin


_TensorFn = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class _QueryKey:
    """What the scores read of a decoder attention module: the q and k projections (with Qwen3-VL's per-head
    norms), the head size and the score scale."""

    q_proj: _TensorFn
    k_proj: _TensorFn
    q_norm: _TensorFn | None
    k_norm: _TensorFn | None
    head_dim: int
    scaling: float

    @classmethod
    def of(cls, attn: nn.Module) -> _QueryKey:
        return cls(
            q_proj=cast(nn.Module, attn.q_proj),
            k_proj=cast(nn.Module, attn.k_proj),
            q_norm=getattr(attn, "q_norm", None),
            k_norm=getattr(attn, "k_norm", None),
            head_dim=cast(int, attn.head_dim),
            scaling=cast(float, attn.scaling),
        )

    @classmethod
    def one_head(cls, attn: nn.Module, head: int) -> _QueryKey:
        """The module restricted to one query head (and its key/value group)."""
        config: Any = attn.config  # a PretrainedConfig: its fields differ per model family
        heads, kv_heads, dim = config.num_attention_heads, config.num_key_value_heads, cast(int, attn.head_dim)
        group = head // (heads // kv_heads)
        return cls(
            q_proj=_Rows(cast(nn.Linear, attn.q_proj), head * dim, dim),
            k_proj=_Rows(cast(nn.Linear, attn.k_proj), group * dim, dim),
            q_norm=getattr(attn, "q_norm", None),
            k_norm=getattr(attn, "k_norm", None),
            head_dim=dim,
            scaling=cast(float, attn.scaling),
        )


def _project(hidden_states: Tensor, proj: _TensorFn, norm: _TensorFn | None, head_dim: int) -> Tensor:
    batch, length, _ = hidden_states.shape
    states = proj(hidden_states).view(batch, length, -1, head_dim)
    if norm is not None:
        states = norm(states)
    return states.transpose(1, 2).float()  # (B, heads, L, head_dim)


def _scores(
    attn: _QueryKey,
    queries_from: Tensor,
    hidden_states: Tensor,
    position_embeddings: tuple[Tensor, Tensor],
    query_rows: Tensor | None,
) -> Tensor:
    """Pre-softmax scores (B, H, Q, L) of the queries at ``query_rows`` (B, Q) against every key."""
    batch = hidden_states.shape[0]
    # Tables are (1, L, d) when every row shares positions.
    cos, sin = (table.float().expand(batch, -1, -1) for table in position_embeddings)
    keys = _apply_rope(_project(hidden_states, attn.k_proj, attn.k_norm, attn.head_dim), cos, sin)
    rows = torch.arange(batch, device=hidden_states.device)[:, None]
    query_states = queries_from[rows, query_rows]
    query_cos, query_sin = cos[rows, query_rows], sin[rows, query_rows]
    queries = _apply_rope(_project(query_states, attn.q_proj, attn.q_norm, attn.head_dim), query_cos, query_sin)
    keys = keys.repeat_interleave(queries.shape[1] // keys.shape[1], dim=1)  # grouped-query attention
    return (queries @ keys.transpose(-1, -2)) * attn.scaling


@torch.no_grad()  # selection is never part of a training graph
def last_token_attention(
    attn: nn.Module, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor], valid: Tensor
) -> Tensor:
    """(B, L) attention probabilities from each row's last valid token, averaged over heads.

    ``attn`` is a decoder layer's self-attention module and ``hidden_states`` its input (after the
    layer's input norm); ``valid`` (B, L) marks real tokens (padding and filler are masked out).
    """
    last = last_valid(valid)[:, None]
    scores = _scores(_QueryKey.of(attn), hidden_states, hidden_states, position_embeddings, last)  # (B, H, 1, L)
    # The last token sees every earlier token, so padding is the only thing to mask.
    scores = scores.masked_fill(~valid[:, None, None, :].bool(), float("-inf"))
    return scores.softmax(dim=-1).mean(dim=1)[:, 0]


@torch.no_grad()  # selection is never part of a training graph
def cross_modal_shares(
    attn: nn.Module, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor], valid: Tensor, visual: Tensor
) -> Tensor:
    """(B, 2) per row: the share of text queries' attention that goes to visual keys, and of visual
    queries' attention that goes to text keys (causal, padding masked, heads averaged; ToDRE)."""
    batch, length = valid.shape
    positions = torch.arange(length, device=valid.device).expand(batch, -1)
    shares = torch.zeros(batch, 2, device=valid.device)
    causal = torch.ones(length, length, dtype=torch.bool, device=valid.device).tril()
    probs = []
    config: Any = attn.config  # a PretrainedConfig: its fields differ per model family
    for head in range(config.num_attention_heads):  # one head at a time keeps memory at B·L²
        scores = _scores(_QueryKey.one_head(attn, head), hidden_states, hidden_states, position_embeddings, positions)
        allowed = causal & valid[:, None, :].bool()
        probs.append(scores[:, 0].masked_fill(~allowed, float("-inf")).softmax(dim=-1))
    mean = torch.stack(probs).mean(dim=0).nan_to_num()  # (B, L, L); padding query rows are all -inf
    visual, text = visual & valid, ~visual & valid
    to_visual = (mean * visual[:, None, :]).sum(-1)  # (B, L) per query
    to_text = (mean * text[:, None, :]).sum(-1)
    shares[:, 0] = (to_visual * text).sum(-1) / text.sum(-1).clamp(min=1)
    shares[:, 1] = (to_text * visual).sum(-1) / visual.sum(-1).clamp(min=1)
    return shares


class _Rows:
    """The output rows [start, start + size) of a linear layer."""

    def __init__(self, linear: nn.Linear, start: int, size: int) -> None:
        self.weight = linear.weight[start : start + size]
        self.bias = None if linear.bias is None else linear.bias[start : start + size]

    def __call__(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


@torch.no_grad()  # selection is never part of a training graph
def cls_attention(attn: nn.Module, hidden_states: Tensor) -> Tensor:
    """(B, S-1) attention of the [CLS] token (position 0) to the patch tokens in a ViT layer, heads averaged."""
    q_proj, k_proj = cast(nn.Linear, attn.q_proj), cast(nn.Linear, attn.k_proj)
    heads, scale = cast(int, attn.num_heads), cast(float, attn.scale)
    return cls_attention_of(q_proj(hidden_states[:, :1]), k_proj(hidden_states), heads, scale)


def cls_attention_of(query: Tensor, keys: Tensor, heads: int, scale: float) -> Tensor:
    """(B, S-1) attention of the [CLS] query (B, 1, heads·d) to the patch tokens, of the keys (B, S, heads·d) of
    every token ([CLS] first), heads averaged: :func:`cls_attention` of projections made elsewhere (vLLM's fused
    qkv projection)."""
    batch, length, _ = keys.shape
    query = query.reshape(batch, 1, heads, -1).transpose(1, 2).float()
    keys = keys.reshape(batch, length, heads, -1).transpose(1, 2).float()
    probs = ((query @ keys.transpose(-1, -2)) * scale).softmax(dim=-1)  # (B, H, 1, S)
    return probs.mean(dim=1)[:, 0, 1:]
