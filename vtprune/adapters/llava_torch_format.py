"""Conversion of a transformers LLaVA / LLaVA-NeXT checkpoint into the original LLaVA codebase's format.

The original codebase (PyPI ``llava-torch``, import ``llava``) keeps the Llama weights at the top level
(``model.*``), the projector as ``model.mm_projector.{0,2}`` and the CLIP tower as a separate folder named
by ``config.mm_vision_tower``. Same weights, same arithmetic: the converted model's fp32 logits equal the
transformers model's. Used to give the llava-torch backend trained and random-weight test models offline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPImageProcessor, GenerationConfig

from ..errors import UnsupportedModelError

#: Name of the CLIP tower's folder inside a converted checkpoint.
TOWER_FOLDER = "vision_tower"

#: transformers' projector activations and the llava-torch projector type of the same arithmetic.
_PROJECTOR_TYPES = {"gelu": "mlp2x_gelu"}


def save_as_llava_torch(model: nn.Module, folder: str | Path, tokenizer: Any | None = None) -> Path:
    """Save a ``LlavaForConditionalGeneration`` (flat) or ``LlavaNextForConditionalGeneration`` (AnyRes,
    ``spatial_unpad``) in llava-torch's format, with ``tokenizer`` if given (llava's builder loads one from the
    folder); load it with :func:`load_llava_torch`, or with llava's ``load_pretrained_model(folder, None, name)``
    (float16; ``name`` must contain "llava")."""
    name = type(model).__name__
    config: Any = model.config  # a PretrainedConfig: torch types module attributes as Tensor | Module
    anyres = name == "LlavaNextForConditionalGeneration"
    if name != "LlavaForConditionalGeneration" and not anyres:
        raise UnsupportedModelError(f"save_as_llava_torch converts LLaVA and LLaVA-NeXT models, not {name}")
    activation = config.projector_hidden_act
    if activation not in _PROJECTOR_TYPES or config.vision_config.model_type != "clip_vision_model":
        raise UnsupportedModelError(
            f"llava-torch builds a CLIP tower and a GELU MLP projector; this model has a "
            f"{config.vision_config.model_type} tower and a {activation} projector"
        )
    if config.vision_feature_select_strategy != "default" or not isinstance(config.vision_feature_layer, int):
        raise UnsupportedModelError("llava-torch reads one tower layer without its [CLS] token (strategy 'default')")
    folder = Path(folder)
    tower_folder = folder / TOWER_FOLDER
    inner: Any = model.model  # the LLaVA inner model (vision tower, projector, language model, newline)
    inner.vision_tower.save_pretrained(tower_folder)
    side = config.vision_config.image_size
    CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(
        tower_folder
    )
    text = config.text_config.to_dict()
    for key in ("architectures", "model_type", "transformers_version", "dtype"):
        text.pop(key, None)
    llava = dict(
        text,
        architectures=["LlavaLlamaForCausalLM"],
        model_type="llava_llama",
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        mm_vision_tower=str(tower_folder.resolve()),
        mm_hidden_size=config.vision_config.hidden_size,
        mm_projector_type=_PROJECTOR_TYPES[activation],
        mm_vision_select_layer=config.vision_feature_layer,
        mm_vision_select_feature="patch",
        mm_patch_merge_type="spatial_unpad" if anyres else "flat",
        image_aspect_ratio="anyres" if anyres else "pad",
        use_mm_proj=True,
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        tokenizer_padding_side="left",
    )
    if anyres:
        # transformers lists (height, width) pairs, llava (width, height): the same order, each pair swapped.
        llava["image_grid_pinpoints"] = [[width, height] for height, width in config.image_grid_pinpoints]
    # Written as is: a PretrainedConfig would replace model_type by its class's.
    (folder / "config.json").write_text(json.dumps(llava, indent=2, sort_keys=True) + "\n")
    cast(GenerationConfig, model.generation_config).save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    weights = {f"model.{key}": value for key, value in inner.language_model.state_dict().items()}
    projector = inner.multi_modal_projector
    for index, linear in ((0, projector.linear_1), (2, projector.linear_2)):
        weights.update({f"model.mm_projector.{index}.{key}": value for key, value in linear.state_dict().items()})
    if anyres:
        weights["model.image_newline"] = inner.image_newline.detach()
    weights["lm_head.weight"] = cast(nn.Linear, model.lm_head).weight.detach()
    save_file({key: value.contiguous().clone() for key, value in weights.items()}, folder / "model.safetensors")
    return folder


def load_llava_torch(folder: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A llava-torch model from a local folder in ``dtype`` with its tower loaded (exact, unlike llava's
    ``load_pretrained_model``, which loads float16). Needs ``llava-torch`` installed."""
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM

    model = LlavaLlamaForCausalLM.from_pretrained(folder, dtype=dtype)
    tower = model.get_vision_tower()
    if not tower.is_loaded:
        tower.load_model()
    tower.to(dtype=dtype)
    return model.eval()
