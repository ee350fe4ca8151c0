"""LLaVA-1.5: one CLIP image, one square raster of projector outputs (1-D RoPE positions)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, PreTrainedTokenizerFast, ProcessorMixin
from transformers.image_transforms import get_resize_output_image_size
from transformers.image_utils import ChannelDimension

from ..errors import InputError, UnsupportedModelError
from ..vocabulary.grids import Grid
from .base import Architecture, Backbone, ModelAdapter, Photo
from .geometry import ItemRegions, PixelSize, setting, shape_only, square_grid_regions
from .random_weights import BOS, IMAGE, VIDEO, RowSpec, Size, clip_vision, llama_text, text_ids
from .toys import ToyGeometry, ToyVLM, token_id

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

    from ..engine.state import VisualItem


class LlavaAdapter(ModelAdapter):
    """Features are projector outputs, one (S/p) x (S/p) raster per image."""

    def grids(self, items: list[VisualItem], positions: Tensor) -> list[Grid]:
        return square_grids(items)

    def projector_module(self) -> nn.Module:
        return self.inner.multi_modal_projector

    def cls_attention_layer(self) -> nn.Module | None:
        # The layer whose output the projector reads: one tower pass maps to one image's tokens.
        tower_type = getattr(self.config.vision_config, "model_type", "")
        if tower_type in TOWERS_WITHOUT_CLS:
            return None
        layer = self.config.vision_feature_layer
        tower = self.inner.vision_tower
        encoder = getattr(getattr(tower, "vision_model", tower), "encoder", None)  # nesting varies by version
        # A tower module whose layers vtprune cannot find is named by its class (never "clip_vision_model": refused).
        refusal = unreadable_cls_reason(tower_type if encoder is not None else type(tower).__name__, layer)
        if refusal is not None or encoder is None:
            raise UnsupportedModelError(refusal)
        return attention_read_by_projector(encoder.layers, layer)

    def check_cls_arguments(self, kwargs: Mapping[str, Any]) -> None:
        layer, configured = kwargs.get("vision_feature_layer"), self.config.vision_feature_layer
        if layer is not None and layer != configured:
            raise InputError(
                f"vision_feature_layer={layer} was passed to the call, but the [CLS] attention (todre) is recorded at "
                f"the layer the config names ({configured}), chosen at prune(); set model.config.vision_feature_layer "
                "before prune() instead"
            )

    def regions(
        self,
        inputs: Mapping[str, Any],
        image_sizes: list[PixelSize] | None,
        video_sizes: list[PixelSize] | None,
        processor: Any | None,
    ) -> list[ItemRegions]:
        # The raster of the processed S x S image, mapped back through pad-to-square / resize / centre crop.
        pixel_values = inputs["pixel_values"]
        processed = int(pixel_values.shape[-1])
        side = processed // self.config.vision_config.patch_size

        def to_original(boxes: Tensor, size: PixelSize) -> Tensor:
            return clip_geometry(size, processed, processor)(boxes)

        return square_grid_regions(pixel_values, side, image_sizes, to_original)


#: Vision tower types without a [CLS] token: a strategy that reads its attention takes its declared fallback.
TOWERS_WITHOUT_CLS = frozenset({"siglip_vision_model", "siglip2_vision_model", "pixtral"})


def unreadable_cls_reason(tower_type: str, feature_layer: int | list[int]) -> str | None:
    """Why no one [CLS] attention row ranks the tokens of a LLaVA whose tower has a [CLS] token (not one of
    :data:`TOWERS_WITHOUT_CLS`); None when the row of the layer the projector reads does. Shared with the vLLM
    backend, which refuses the same LLaVAs."""
    if tower_type != "clip_vision_model":
        return (
            f"vtprune reads the [CLS] attention (todre) of CLIP vision towers (and knows SigLIP and Pixtral towers "
            f"to have none), and this LLaVA's tower is {tower_type!r}; choose a strategy that does not read it"
        )
    if not isinstance(feature_layer, int):
        return (
            f"vision_feature_layer={feature_layer}: the projector reads several tower layers side by side, and no "
            "one layer's [CLS] attention ranks their tokens (todre); choose a strategy that does not read it"
        )
    return None


def attention_read_by_projector(layers: nn.ModuleList, feature_layer: int) -> nn.Module | None:
    """The attention of the tower layer whose output is ``hidden_states[feature_layer]``, the features the projector
    reads; None for ``hidden_states[0]``, the patch embeddings, which no attention precedes (an index outside the
    hidden states makes the model itself fail)."""
    position = feature_layer if feature_layer >= 0 else len(layers) + 1 + feature_layer
    return cast(nn.Module, layers[position - 1].self_attn) if 0 < position <= len(layers) else None


def square_grids(items: list[VisualItem]) -> list[Grid]:
    """(1, s, s) for items of s * s tokens: one square raster image each."""
    sizes = [item.columns.numel() for item in items]
    return [(1, math.isqrt(n), math.isqrt(n)) if math.isqrt(n) ** 2 == n else None for n in sizes]


def clip_geometry(size: PixelSize, processed: int, processor: Any | None) -> Callable[[Tensor], Tensor]:
    """Processed-image pixels -> original pixels through pad-to-square, resize and centre crop.

    ``processor`` (or its image processor) gives the settings; without it the CLIP default (shortest-edge
    resize, centre crop) is assumed.
    """
    image_processor = getattr(processor, "image_processor", processor)
    height, width = size
    pad_x = pad_y = 0
    if getattr(image_processor, "do_pad", False):
        side = max(height, width)
        pad_x, pad_y = (side - width) // 2, (side - height) // 2
        height = width = side
    resize = getattr(image_processor, "size", None) or {"shortest_edge": processed}
    if getattr(image_processor, "do_resize", True):
        target = setting(resize, "shortest_edge") or (setting(resize, "height"), setting(resize, "width"))
        resized = get_resize_output_image_size(
            shape_only(height, width), target, default_to_square=False, input_data_format=ChannelDimension.FIRST
        )
    else:
        resized = (height, width)
    top = left = 0
    if getattr(image_processor, "do_center_crop", True):
        top, left = (resized[0] - processed) // 2, (resized[1] - processed) // 2
    scale = torch.tensor([width / resized[1], height / resized[0]] * 2, dtype=torch.float64)
    offset = torch.tensor([left, top] * 2, dtype=torch.float64)
    shift = torch.tensor([pad_x, pad_y] * 2, dtype=torch.float64)
    return lambda boxes: (boxes + offset) * scale - shift


def llava_sequences(
    rows: list[RowSpec], image_counts: list[int], video_count: int, vocab: int, generator: torch.Generator
) -> list[list[int]]:
    """Token ids of each row the way the LLaVA processors lay them out: BOS, text, then each image's
    (and video's) placeholders followed by one text token."""
    counts = iter(image_counts)
    sequences = []
    for row in rows:
        ids = [BOS] + text_ids(row.text_before, vocab, generator)
        for _ in row.images:
            ids += [IMAGE] * next(counts) + text_ids(1, vocab, generator)
        for _ in range(row.videos):
            ids += [VIDEO] * video_count + text_ids(1, vocab, generator)
        sequences.append(ids + text_ids(row.text_after, vocab, generator))
    return sequences


def _random_config(size: Size) -> LlavaConfig:
    return LlavaConfig(
        vision_config=clip_vision(size), text_config=llama_text(size), vision_feature_layer=-2, image_token_index=IMAGE
    )


def _random_inputs(
    model: nn.Module, rows: list[RowSpec], generator: torch.Generator
) -> tuple[list[list[int]], dict[str, Tensor]]:
    """Images are (1, 1): one S x S image each."""
    config: Any = model.config  # a LlavaConfig
    side = config.vision_config.image_size
    images = sum(len(row.images) for row in rows)
    pixel_values = torch.randn(images, 3, side, side, generator=generator)
    counts = [(side // config.vision_config.patch_size) ** 2] * images
    sequences = llava_sequences(rows, counts, 0, config.text_config.vocab_size, generator)
    return sequences, ({"pixel_values": pixel_values} if images else {})


_TOY_IMAGE = "<image>"


def _toy_processor(tokenizer: PreTrainedTokenizerFast, geometry: ToyGeometry, chat_template: str) -> ProcessorMixin:
    # Imported here: the image processor classes are imported on use, not with vtprune.
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": geometry.image_size},
        crop_size={"height": geometry.image_size, "width": geometry.image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=geometry.cell,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=chat_template,
    )


def _toy_config(
    tokenizer: PreTrainedTokenizerFast, geometry: ToyGeometry, text: dict[str, Any], sizes: Mapping[str, int]
) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=sizes["vision_hidden"],
        intermediate_size=2 * sizes["vision_hidden"],
        num_hidden_layers=sizes["vision_layers"],
        num_attention_heads=sizes["heads"],
        image_size=geometry.image_size,
        patch_size=geometry.cell,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=LlamaConfig(**text),
        image_token_index=token_id(tokenizer, _TOY_IMAGE),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,  # as LLaVA-1.5; with one layer: its input, the patch embeddings (vtprune.toyvlm)
    )


#: The toy LLaVA (CLIP tower, LLaVA projector, Llama text model; the PIL image processor: the base install has no
#: torchvision).
TOY = ToyVLM(
    image_placeholder=_TOY_IMAGE,
    special_tokens=("<pad>", "<unk>", "</s>", _TOY_IMAGE),
    named_tokens={"image_token": _TOY_IMAGE},
    processor=_toy_processor,
    config=_toy_config,
    processor_class="LlavaProcessor",
    image_backend="pil",
)


def clip_photo_inputs(photo: PILImage, side: int, tokens: int) -> tuple[Any, dict[str, Tensor]]:
    """(processor, inputs) for one photo and a short prompt on a LLaVA-1.5-like model: CLIP's ``side`` px resize and
    centre crop, ``tokens`` image tokens."""
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    pixel_values = processor(images=[photo], return_tensors="pt")["pixel_values"]
    ids = [BOS, 7, 8] + [IMAGE] * tokens + [9, 10, 11]
    return processor, {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "pixel_values": pixel_values,
    }


def _photo_inputs(model: nn.Module, photo: PILImage) -> tuple[Any, dict[str, Tensor]]:
    config: Any = model.config  # a LlavaConfig
    vision = config.vision_config
    return clip_photo_inputs(photo, vision.image_size, (vision.image_size // vision.patch_size) ** 2)


#: lmms-eval's wrapper of every LLaVA class in transformers (LLaVA-1.5, LLaVA-NeXT, OneVision).
LLAVA_HF = Backbone("lmms_eval.models.simple.llava_hf", "LlavaHf", one_sample_at_a_time=True)

ARCHITECTURES = (
    Architecture(
        model_class="LlavaForConditionalGeneration",
        model_type="llava",
        adapter=LlavaAdapter,
        random_config=_random_config,
        random_inputs=_random_inputs,
        test_images=((1, 1), (1, 1)),
        backbone=LLAVA_HF,
        toy=TOY,
        photo=Photo(_photo_inputs, "LLaVA-1.5 geometry, 576 tokens"),
    ),
)
