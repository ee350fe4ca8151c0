"""What every family's small random-weight config and inputs share: sizes, token ids, the text and CLIP parts.

Each family module declares its own config and input layout from these (see ``Architecture``);
``vtprune.testing`` builds models and padded batches from the declarations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import CLIPVisionConfig, LlamaConfig

# Token ids shared by every random-weight vocabulary (text tokens are drawn above them).
PAD, BOS, IMAGE, VIDEO, VISION_START, VISION_END = 0, 1, 2, 3, 4, 5
FIRST_TEXT_ID = 6


@dataclass(frozen=True)
class Size:
    """Text-model and vision sizes; ``tiny`` for tests, ``mid`` for benchmarks."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    vision_hidden: int
    vision_layers: int
    image: int
    """Image side in pixels (LLaVA) / in merged tokens (Qwen grids are derived from it)."""
    patch: int
    intermediate: int = 0
    """Text MLP width; 0: twice ``hidden`` (real models' widths for benchmarks at their shapes)."""


TINY = Size(hidden=32, layers=4, heads=4, kv_heads=2, vocab=96, vision_hidden=16, vision_layers=2, image=16, patch=4)
MID = Size(hidden=256, layers=8, heads=8, kv_heads=4, vocab=512, vision_hidden=64, vision_layers=2, image=336, patch=14)


@dataclass
class RowSpec:
    """One batch row: images given as (height, width) in the family's image units, and text lengths."""

    images: list[tuple[int, int]] = field(default_factory=lambda: [(1, 1)])
    text_before: int = 3
    text_after: int = 4
    videos: int = 0


def text_fields(size: Size) -> dict:
    """Fields every random-weight text config shares (Llama, Qwen2, the Qwen-VL text models, Gemma3)."""
    return {
        "vocab_size": size.vocab,
        "hidden_size": size.hidden,
        "intermediate_size": size.intermediate or 2 * size.hidden,
        "num_hidden_layers": size.layers,
        "num_attention_heads": size.heads,
        "num_key_value_heads": size.kv_heads,
        "max_position_embeddings": 8192,
        "pad_token_id": PAD,
        "bos_token_id": BOS,
        "eos_token_id": None,
    }


def llama_text(size: Size) -> LlamaConfig:
    return LlamaConfig(**text_fields(size))


def clip_vision(size: Size) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=size.vision_hidden,
        intermediate_size=2 * size.vision_hidden,
        num_hidden_layers=size.vision_layers,
        num_attention_heads=2,
        image_size=size.image,
        patch_size=size.patch,
    )


def text_ids(count: int, vocab: int, generator: torch.Generator) -> list[int]:
    """``count`` random text token ids (above the shared special ids)."""
    return torch.randint(FIRST_TEXT_ID, vocab, (count,), generator=generator).tolist()
