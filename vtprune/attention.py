"""Exact attention of each row's last prompt token, without switching the model to eager attention.

SDPA returns no attention weights. Recomputing one query row and the keys of one layer is cheap
and gives the same probabilities eager attention would (to float rounding), on every model
family vtprune supports: all of them apply RoPE as ``x·cos + rotate_half(x)·sin`` with ``cos`` and
``sin`` of shape (B, L, head_dim), and Qwen3-VL normalises q and k per head before it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .layout import last_valid


def _rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
    return x * cos + _rotate_half(x) * sin


def last_token_attention(
    attn: nn.Module, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor], valid: Tensor
) -> Tensor:
    """(B, L) attention probabilities from each row's last valid token, averaged over heads.

    ``attn`` is a decoder layer's self-attention module and ``hidden_states`` its input (after the
    layer's input norm); ``valid`` (B, L) marks real tokens (padding and filler are masked out).
    """
    batch, length, _ = hidden_states.shape
    head_dim = attn.head_dim
    last = last_valid(valid)
    rows = torch.arange(batch, device=hidden_states.device)
    query = attn.q_proj(hidden_states[rows, last].unsqueeze(1)).view(batch, 1, -1, head_dim)
    keys = attn.k_proj(hidden_states).view(batch, length, -1, head_dim)
    if hasattr(attn, "q_norm"):
        query, keys = attn.q_norm(query), attn.k_norm(keys)
    query, keys = query.transpose(1, 2).float(), keys.transpose(1, 2).float()
    # Tables are (1, L, d) when every row shares positions.
    cos, sin = (table.float().expand(batch, -1, -1) for table in position_embeddings)
    query = _apply_rope(query, cos[rows, last].unsqueeze(1), sin[rows, last].unsqueeze(1))
    keys = _apply_rope(keys, cos, sin)
    keys = keys.repeat_interleave(query.shape[1] // keys.shape[1], dim=1)  # grouped-query attention
    scores = (query @ keys.transpose(-1, -2)) * attn.scaling  # (B, H, 1, L)
    # The last token sees every earlier token, so padding is the only thing to mask.
    scores = scores.masked_fill(~valid[:, None, None, :].bool(), float("-inf"))
    return scores.softmax(dim=-1).mean(dim=1)[:, 0]
