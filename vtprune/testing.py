"""Random-weight models of every supported class, built from configs, with matching inputs.

They prove the mechanics (and time them) without any download: tests use the tiny sizes,
``eval/bench_prefill.py`` the mid sizes. Inputs are built the way the processors lay them out:
placeholder tokens where the images go, the counts taken from the model's own vision encoder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

MODEL_KINDS = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")

# Token ids shared by every synthetic vocabulary (text tokens are drawn above them).
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


TINY = Size(hidden=32, layers=4, heads=4, kv_heads=2, vocab=96, vision_hidden=16, vision_layers=2, image=16, patch=4)
MID = Size(hidden=256, layers=8, heads=8, kv_heads=4, vocab=512, vision_hidden=64, vision_layers=2, image=336, patch=14)


def _text_fields(size: Size) -> dict:
    """Fields every synthetic text config shares (Llama, Qwen2, the Qwen-VL text models)."""
    return dict(
        vocab_size=size.vocab,
        hidden_size=size.hidden,
        intermediate_size=2 * size.hidden,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        max_position_embeddings=8192,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=None,
    )


def _llama_text(size: Size) -> LlamaConfig:
    return LlamaConfig(**_text_fields(size))


def _clip_vision(size: Size) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=size.vision_hidden,
        intermediate_size=2 * size.vision_hidden,
        num_hidden_layers=size.vision_layers,
        num_attention_heads=2,
        image_size=size.image,
        patch_size=size.patch,
    )


def _qwen_text(size: Size, kind: str) -> dict:
    head_dim = size.hidden // size.heads
    quarter = head_dim // 8  # M-RoPE sections (t, h, w) must add up to head_dim / 2
    rope = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "mrope_section": [head_dim // 2 - 2 * quarter, quarter, quarter],
    }
    if kind == "qwen3_vl":
        rope["mrope_interleaved"] = True
    return dict(_text_fields(size), head_dim=head_dim, rope_parameters=rope)


def _qwen_vision(size: Size, kind: str) -> dict:
    vision = dict(
        depth=size.vision_layers,
        hidden_size=size.vision_hidden,
        num_heads=2,
        in_channels=3,
        patch_size=size.patch,
        spatial_merge_size=2,
        temporal_patch_size=2,
        intermediate_size=2 * size.vision_hidden,
    )
    if kind == "qwen2_vl":
        vision.update(embed_dim=size.vision_hidden, hidden_size=size.hidden, mlp_ratio=2)
        del vision["intermediate_size"]
    else:
        vision["out_hidden_size"] = size.hidden
    if kind == "qwen2_5_vl":
        vision.update(window_size=4 * size.patch, fullatt_block_indexes=[size.vision_layers - 1])
    if kind == "qwen3_vl":
        vision.update(num_position_embeddings=64, deepstack_visual_indexes=list(range(min(2, size.vision_layers))))
    return vision


def build_model(kind: str, size: Size = TINY, *, attn_implementation: str = "sdpa", seed: int = 0) -> nn.Module:
    """A randomly initialised ``*ForConditionalGeneration`` of ``kind`` (one of ``MODEL_KINDS``), in eval mode."""
    torch.manual_seed(seed)
    tokens = dict(image_token_id=IMAGE)
    if kind == "llava":
        config = LlavaConfig(
            vision_config=_clip_vision(size), text_config=_llama_text(size), vision_feature_layer=-2, **tokens
        )
        model_cls = LlavaForConditionalGeneration
    elif kind == "llava_next":
        pinpoints = [[size.image, 2 * size.image], [2 * size.image, size.image], [2 * size.image, 2 * size.image]]
        config = LlavaNextConfig(
            vision_config=_clip_vision(size),
            text_config=_llama_text(size),
            image_grid_pinpoints=pinpoints,
            vision_feature_layer=-2,
            **tokens,
        )
        model_cls = LlavaNextForConditionalGeneration
    elif kind == "llava_onevision":
        pinpoints = [[size.image, 2 * size.image], [2 * size.image, size.image], [2 * size.image, 2 * size.image]]
        text = Qwen2Config(**{k: v for k, v in _qwen_text(size, kind).items() if k != "rope_parameters"})
        config = LlavaOnevisionConfig(
            vision_config=_clip_vision(size),
            text_config=text,
            image_grid_pinpoints=pinpoints,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            video_token_id=VIDEO,
            **tokens,
        )
        model_cls = LlavaOnevisionForConditionalGeneration
    elif kind in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        config_cls, model_cls = {
            "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
            "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration),
            "qwen3_vl": (Qwen3VLConfig, Qwen3VLForConditionalGeneration),
        }[kind]
        config = config_cls(
            text_config=_qwen_text(size, kind),
            vision_config=_qwen_vision(size, kind),
            video_token_id=VIDEO,
            vision_start_token_id=VISION_START,
            vision_end_token_id=VISION_END,
            **tokens,
        )
    else:
        raise ValueError(f"unknown model kind {kind!r}; choose from {MODEL_KINDS}")
    config._attn_implementation = attn_implementation
    model = model_cls(config)
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = None
    return model.eval()


@dataclass
class RowSpec:
    """One batch row: images given as (height, width) in pixels (Qwen: in patches), and text lengths."""

    images: list[tuple[int, int]] = field(default_factory=lambda: [(1, 1)])
    text_before: int = 3
    text_after: int = 4
    videos: int = 0


def _kind(model: nn.Module) -> str:
    names = {
        "LlavaForConditionalGeneration": "llava",
        "LlavaNextForConditionalGeneration": "llava_next",
        "LlavaOnevisionForConditionalGeneration": "llava_onevision",
        "Qwen2VLForConditionalGeneration": "qwen2_vl",
        "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
        "Qwen3VLForConditionalGeneration": "qwen3_vl",
    }
    return names[type(model).__name__]


def build_inputs(model: nn.Module, rows: list[RowSpec], *, seed: int = 0) -> dict[str, Tensor]:
    """Left-padded inputs for ``rows``, as the model's processor would lay them out.

    Image sizes are multiples of the model's image side (LLaVA family: (1, 1) is one base tile,
    (1, 2) a wide AnyRes image) or, for Qwen, the merged-token grid (h, w) of each image.
    """
    generator = torch.Generator().manual_seed(seed)
    kind = _kind(model)
    config = model.config
    vocab = config.text_config.vocab_size
    sequences, extra = [], {}
    if kind.startswith("qwen"):
        vision = config.vision_config
        patch, temporal, merge = vision.patch_size, vision.temporal_patch_size, vision.spatial_merge_size
        pixels, grids, video_pixels, video_grids = [], [], [], []
        for row in rows:
            ids = _text(row.text_before, vocab, generator)
            for h, w in row.images:
                grid = (1, h * merge, w * merge)
                grids.append(grid)
                pixels.append(torch.randn(math.prod(grid), 3 * temporal * patch * patch, generator=generator))
                ids += [VISION_START] + [IMAGE] * (h * w) + [VISION_END]
            for _ in range(row.videos):
                grid = (2, 2 * merge, 2 * merge)
                video_grids.append(grid)
                video_pixels.append(torch.randn(math.prod(grid), 3 * temporal * patch * patch, generator=generator))
                if kind == "qwen3_vl":  # one group per frame, each after its timestamp text
                    for _ in range(2):
                        ids += _text(1, vocab, generator) + [VISION_START] + [VIDEO] * 4 + [VISION_END]
                else:
                    ids += [VISION_START] + [VIDEO] * (2 * 2 * 2) + [VISION_END]
            sequences.append(ids + _text(row.text_after, vocab, generator))
        if pixels:
            extra.update(pixel_values=torch.cat(pixels), image_grid_thw=torch.tensor(grids))
        if video_pixels:
            extra.update(pixel_values_videos=torch.cat(video_pixels), video_grid_thw=torch.tensor(video_grids))
    else:
        side = config.vision_config.image_size
        sizes = []
        for row in rows:
            for h, w in row.images:
                sizes.append((h * side, w * side))
        if kind == "llava":
            pixel_values = torch.randn(len(sizes), 3, side, side, generator=generator)
            counts = [(side // config.vision_config.patch_size) ** 2] * len(sizes)
        else:
            from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

            tiles = [image_size_to_num_patches(s, config.image_grid_pinpoints, side) for s in sizes]
            pixel_values = torch.randn(len(sizes), max(tiles, default=1), 3, side, side, generator=generator)
            counts = _anyres_counts(model, pixel_values, sizes)
            extra["image_sizes"] = torch.tensor(sizes)
        if sizes:
            extra["pixel_values"] = pixel_values
        image_counts = iter(counts)
        video_count = 0
        if any(row.videos for row in rows):
            frames = 4
            videos = sum(row.videos for row in rows)
            extra["pixel_values_videos"] = torch.randn(videos, frames, 3, side, side, generator=generator)
            video_count = len(model.model.get_video_features(extra["pixel_values_videos"][:1]).pooler_output[0])
        for row in rows:
            ids = [BOS] + _text(row.text_before, vocab, generator)
            for _ in row.images:
                ids += [IMAGE] * next(image_counts) + _text(1, vocab, generator)
            for _ in range(row.videos):
                ids += [VIDEO] * video_count + _text(1, vocab, generator)
            sequences.append(ids + _text(row.text_after, vocab, generator))
    length = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(rows), length), PAD, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, ids in enumerate(sequences):
        input_ids[i, length - len(ids) :] = torch.tensor(ids)
        attention_mask[i, length - len(ids) :] = 1
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, **extra)
    if kind.startswith("qwen"):
        inputs["mm_token_type_ids"] = (input_ids == IMAGE).long() + 2 * (input_ids == VIDEO).long()
    return inputs


def _text(count: int, vocab: int, generator: torch.Generator) -> list[int]:
    return torch.randint(FIRST_TEXT_ID, vocab, (count,), generator=generator).tolist()


def _anyres_counts(model: nn.Module, pixel_values: Tensor, sizes: list[tuple[int, int]]) -> list[int]:
    """Visual tokens per AnyRes image, read off the model's own packing (base tile, tiles, newlines)."""
    if not sizes:
        return []
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=pixel_values, image_sizes=torch.tensor(sizes))
    return [len(f) for f in features.pooler_output]
