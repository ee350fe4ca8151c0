"""Random-weight Qwen2.5-VL / Qwen3-VL checkpoints in a local folder, with the toy Qwen2-VL's tokenizer, chat
template and image geometry (8-pixel patches, 2x2 merge: a toy image is 144 tokens), for vLLM to load offline."""

import json
import shutil
from pathlib import Path

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen3VLConfig

from vtprune.toyvlm.model import QWEN2_VL_PATH

FILES = ("chat_template.jinja", "generation_config.json", "tokenizer.json", "tokenizer_config.json")
PROCESSORS = {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}


def _text(kind: str) -> dict:
    toy = json.loads((QWEN2_VL_PATH / "config.json").read_text())["text_config"]
    text = {key: toy[key] for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")}
    # Head dimension 32: vLLM's CPU attention has no kernel for 16.
    text.update(num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512)
    text.update(rms_norm_eps=1e-5, eos_token_id=toy["eos_token_id"], pad_token_id=0)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]}
    if kind == "qwen3_vl":
        rope["mrope_interleaved"] = True
    return dict(text, rope_parameters=rope)


def _vision(kind: str) -> dict:
    vision = {"depth": 2, "hidden_size": 64, "num_heads": 2, "intermediate_size": 128, "out_hidden_size": 128}
    vision.update(in_channels=3, patch_size=8, spatial_merge_size=2, temporal_patch_size=2)
    if kind == "qwen2_5_vl":
        vision.update(window_size=32, fullatt_block_indexes=[1])
    else:
        vision.update(num_position_embeddings=64, deepstack_visual_indexes=[0, 1])
    return vision


def random_qwen_checkpoint(kind: str, folder: Path) -> Path:
    """Write a random-weight ``kind`` ("qwen2_5_vl" or "qwen3_vl") checkpoint into ``folder``; returns it."""
    folder.mkdir(parents=True)
    for name in FILES:
        shutil.copy(QWEN2_VL_PATH / name, folder / name)
    processor = json.loads((QWEN2_VL_PATH / "processor_config.json").read_text())
    processor["processor_class"] = PROCESSORS[kind]
    if kind == "qwen3_vl":
        processor["image_processor"]["image_processor_type"] = "Qwen2VLImageProcessorFast"
        processor["video_processor"]["video_processor_type"] = "Qwen3VLVideoProcessor"
    (folder / "processor_config.json").write_text(json.dumps(processor, indent=2))
    ids = {"image_token_id": 4, "video_token_id": 6, "vision_start_token_id": 3, "vision_end_token_id": 5}
    torch.manual_seed(0)
    if kind == "qwen2_5_vl":
        model = Qwen2_5_VLForConditionalGeneration(
            Qwen2_5_VLConfig(text_config=_text(kind), vision_config=_vision(kind), **ids)
        )
    else:
        from transformers import Qwen3VLForConditionalGeneration

        model = Qwen3VLForConditionalGeneration(
            Qwen3VLConfig(text_config=_text(kind), vision_config=_vision(kind), **ids)
        )
    model.save_pretrained(folder)
    return folder
