"""What the engine needs to know about one model family, and nothing about strategies."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig
from transformers.modeling_outputs import ModelOutput

from ..errors import UnsupportedModelError
from ..vocabulary.grids import Grid, Segment
from .geometry import ItemRegions, PixelSize
from .random_weights import RowSpec, Size
from .toys import ToyVLM

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

    from ..engine.state import VisualItem

#: Raw visual inputs the vision encoder consumes.
PIXEL_INPUTS = ("pixel_values", "pixel_values_videos")

#: The engine's prefill for models that splice visual rows themselves: called with a function that runs the
#: model's own splice and returns it in the engine's form, it returns that prefill pruned.
SplicePrefill = Callable[[Callable[[], dict[str, Any]]], dict[str, Any]]


#: Config attributes naming tokens that are never question words: vision delimiters, BOS/EOS/padding.
SPECIAL_TOKEN_NAMES = ("vision_start_token_id", "vision_end_token_id", "bos_token_id", "eos_token_id", "pad_token_id")


def special_token_ids(placeholders: Iterable[int], configs: Iterable[object]) -> set[int]:
    """Token ids that are never question words: the visual ``placeholders`` and the ids the ``configs`` name in
    :data:`SPECIAL_TOKEN_NAMES` (shared with the vLLM backend, which reads vLLM's copy of the config)."""
    ids: set[int | None] = set(placeholders)
    for config in configs:
        for name in SPECIAL_TOKEN_NAMES:
            value = getattr(config, name, None)
            ids.update(value if isinstance(value, (list, tuple)) else [value])
    return {int(i) for i in ids if i is not None}


class ModelAdapter:
    """Base adapter for ``XxxForConditionalGeneration`` models whose inner model is ``model.model``.

    transformers 5.x encodes images into ``mm_encoder_outputs[modality].pooler_output`` (one tensor
    per image or video, in the order their placeholders appear in the batch) before the sequence is
    built; the engine shortens those outputs and the sequence together.
    """

    #: Position ids are (B, L) for 1-D RoPE; M-RoPE models override with their (rows, B, L) layout.
    position_seq_dim: ClassVar[int] = 1

    #: Strategy inputs (``TokenContext`` fields) this family cannot provide, with why; strategies that read
    #: one are refused at ``prune()``.
    unavailable_inputs: ClassVar[Mapping[str, str]] = {}

    #: Whether the model splices its visual rows into ``inputs_embeds`` itself, before its LLM (see
    #: ``intercept_splice``), instead of receiving placeholder ids and encoder outputs in its forward.
    splices_visual_rows: ClassVar[bool] = False

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @classmethod
    def serves(cls, model: nn.Module) -> bool:
        """Whether this adapter handles ``model`` although no declared architecture names its class (forks of a
        codebase that keep the methods the adapter calls); declared classes and their subclasses are found by name."""
        return False

    @property
    def config(self) -> Any:
        """The model's ``PretrainedConfig`` (torch types a module's attributes as ``Tensor | Module``)."""
        return self.model.config

    @property
    def inner(self) -> Any:
        # Any: the families' inner models differ in their methods (``pack_image_features``, ``get_image_features``,
        # ...), which torch's typing of module attributes (``Tensor | Module``) cannot express.
        return self.model.model

    @property
    def text_model(self) -> nn.Module:
        return self.inner.language_model

    @property
    def layers(self) -> nn.ModuleList:
        return cast(nn.ModuleList, self.text_model.layers)

    @property
    def text_config(self) -> Any:
        return self.text_model.config

    @property
    def sliding_window(self) -> int | None:
        """Width of the text layers' sliding-window attention, if any layer uses one (Gemma 3's local layers)."""
        layer_types = getattr(self.text_config, "layer_types", None)
        if layer_types is not None and all(kind == "full_attention" for kind in layer_types):
            return None
        return getattr(self.text_config, "sliding_window", None)

    def token_ids(self) -> dict[str, int]:
        """Placeholder token id of each visual modality the model takes."""
        config = self.config
        ids = {"image": config.image_token_id}
        if getattr(config, "video_token_id", None) is not None:
            ids["video"] = config.video_token_id
        return ids

    def special_token_ids(self) -> set[int]:
        """Token ids that are never question words: placeholders, vision delimiters, BOS/EOS/padding."""
        return special_token_ids(
            self.token_ids().values(), (self.config, self.text_config, self.model.generation_config)
        )

    def image_delimiter_ids(self, input_ids: Tensor) -> set[int]:
        """Ids of the tokens that open and close images in ``input_ids``, where the config does not name them (see
        ``special_token_ids`` for those it does); never question words either."""
        return set()

    def projector_module(self) -> nn.Module:
        """The module that maps vision-tower features to the LLM's visual tokens (projector / merger)."""
        raise NotImplementedError

    @property
    def projector_rows(self) -> int:
        """Vision-tower rows the projector reads per output token (Qwen's merger: a 2x2 block)."""
        return 1

    def projector(self) -> Callable[[Tensor], Tensor]:
        """A float32 copy of the projector, as a function of ``pre_features`` rows (one row per token)."""
        module = float32_copy(self.projector_module())
        rows = self.projector_rows
        # A pre_features row holds the projector's input rows for one token side by side. ``forward``, not
        # ``__call__``: hooks on the projector (vtprune's own pre-feature recorder) must not see these passes.
        return lambda x: module.forward(x.reshape(-1, x.shape[-1] // rows))

    def cls_attention_layer(self) -> nn.Module | None:
        """The vision-tower attention module whose [CLS] row ranks patches (None: no [CLS] token)."""
        return None

    def check_cls_arguments(self, kwargs: Mapping[str, Any]) -> None:
        """Refuse a call's encoder arguments that make the projector read another tower layer than the one
        :meth:`cls_attention_layer` gave at ``prune()`` (its [CLS] row would rank other features)."""

    def encode(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Run the vision encoder the way ``generate()`` does, so a plain forward prunes the same features.

        Replaces the raw pixel inputs in ``kwargs`` by ``kwargs["mm_encoder_outputs"]``; the other
        inputs the encoder read (``image_grid_thw``, ``image_sizes``, ...) stay for the positions.
        """
        # Any: transformers annotates this private generate() step as returning a Tensor; it returns the kwargs.
        generation: Any = self.model
        encoded = generation._prepare_multimodal_encoder_kwargs_for_generation(dict(kwargs))
        kept = {key: value for key, value in kwargs.items() if key not in PIXEL_INPUTS}
        return {**kept, "mm_encoder_outputs": encoded["mm_encoder_outputs"]}

    def original_positions(self, kwargs: dict[str, Any], input_ids: Tensor) -> Tensor:
        """Position ids the unpruned model would use for this prefill."""
        position_ids = kwargs.get("position_ids")
        if position_ids is not None:
            return position_ids
        # The text model's default when no ids are passed: arange(L), regardless of padding.
        return torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)

    def grids(self, items: list[VisualItem], positions: Tensor) -> list[Grid]:
        """(t, h, w) token grid of each item whose tokens form one raster grid, else None.

        Read from what the forward itself sees (``generate()`` has already consumed ``image_sizes``
        and ``image_grid_thw`` by then), so forward and generate() select alike.
        """
        return [None] * len(items)

    def segments(self, item: VisualItem) -> tuple[Segment, ...] | None:
        """The grids inside an AnyRes-packed item (None where the item is one grid or none)."""
        return None

    def newline_embedding(self) -> Tensor | None:
        """The learned row-separator token of AnyRes models (LLaVA-NeXT/OneVision), if any."""
        return None

    def shorten_outputs(self, output: ModelOutput, kept: list[Tensor], weights: list[Tensor | None]) -> ModelOutput:
        """A copy of one modality's encoder output with each item's tokens reduced to ``kept``
        (or, where a merging strategy gave ``weights``, replaced by ``weights @ tokens``)."""
        shortened = type(output)(**dict(output.items()))
        items = output["pooler_output"]
        pooled = reduce_tokens(items, kept, weights)
        # Some models stack equal-length items (OneVision videos); equal budgets keep them equal.
        shortened["pooler_output"] = torch.stack(pooled) if isinstance(items, Tensor) else pooled
        return shortened

    def intercept_splice(self, prefill: SplicePrefill) -> Callable[[], None]:
        """Route the model's own splicing of visual rows through ``prefill``; return an undo function.

        Only for ``splices_visual_rows`` models. The function given to ``prefill`` encodes the images, splices
        them, and returns the prefill as the engine knows it: ``input_ids`` with the placeholder id of
        ``token_ids()`` at every visual row, the spliced ``inputs_embeds``, ``attention_mask``, ``position_ids``
        (None: the model's default), ``labels`` and the cache if any, and ``mm_encoder_outputs`` holding each
        item's rows in order. ``prefill`` returns it with every sequence tensor packed (``inputs_embeds``
        included) and the items' rows shortened; the adapter puts those rows where the placeholders are.
        """
        raise NotImplementedError(f"{type(self).__name__} receives visual tokens in its forward; nothing to route")

    def install_decoder_remap(self, current_source: Callable[[], Tensor | None]) -> Callable[[], None]:
        """Hook model parts that add per-visual-token state inside the decoder; return an undo function.

        ``current_source()`` gives the layout of the hidden states relative to the sequence the
        decoder started with (None while nothing was dropped inside the decoder). Models without
        such state need nothing.
        """
        return lambda: None

    def regions(
        self,
        inputs: Mapping[str, Any],
        image_sizes: list[PixelSize] | None,
        video_sizes: list[PixelSize] | None,
        processor: Any | None,
    ) -> list[ItemRegions]:
        """The image region of every visual token of the processed ``inputs``, per image then per video.

        ``image_sizes`` / ``video_sizes``: (height, width) of the pictures given to the processor, when known
        (boxes then land on them); ``processor`` gives resize / crop settings where the geometry needs them.
        """
        raise UnsupportedModelError(f"vtprune.viz has no token geometry for {type(self.model).__name__}")


@dataclass(frozen=True)
class Backbone:
    """lmms-eval's simple wrapper that loads and prompts a class, and what it needs to run under vtprune's model."""

    module: str
    name: str
    one_sample_at_a_time: bool = False
    """It generates one sample at a time (lmms-eval's ``llava_hf`` asserts it mid-run): a larger ``--batch_size`` is
    refused before any weights load."""
    cpu_device_map: str | None = None
    """The ``device_map`` it needs on the CPU, where the device name alone would make it pick cuda."""


@dataclass(frozen=True)
class Photo:
    """How a real photograph goes into this class's random-weight model at benchmark size (``MID``), for pictures
    of its token geometry (``eval/photo_figures.py``)."""

    inputs: Callable[[nn.Module, PILImage], tuple[Any, dict[str, Tensor]]]
    """(model, photo) -> (the image processor used, the model's inputs: the photo and a short prompt)."""
    title: str
    """What the picture shows of the geometry."""
    sample: int = 0
    """Which of ``vtprune.viz.photos.sample_photos()`` it is drawn on (0: china.jpg, 1: flower.jpg)."""


#: (token ids of each row, unpadded; pixel inputs) for a batch of ``RowSpec`` rows, laid out as the processor would.
RandomInputs = Callable[[nn.Module, list[RowSpec], torch.Generator], tuple[list[list[int]], dict[str, Tensor]]]


@dataclass(frozen=True)
class Architecture:
    """One supported ``*ForConditionalGeneration`` class and everything vtprune knows about it.

    Family modules declare these (``ARCHITECTURES``); the engine, ``viz``, the harness and ``vtprune.testing``
    look them up in ``vtprune.adapters`` instead of keeping tables of their own.
    """

    model_class: str
    """``type(model).__name__`` (subclasses are served too)."""
    model_type: str
    """``config.model_type``; also the name tests and benchmarks build it by."""
    adapter: type[ModelAdapter]
    random_config: Callable[[Size], PretrainedConfig] | None = None
    """A small random-weight config of this class (tests: ``TINY``, benchmarks: ``MID``); None for classes outside
    transformers (the original LLaVA codebase's), which ``vtprune.testing`` cannot build and its own tests do."""
    random_inputs: RandomInputs | None = None
    test_images: tuple[tuple[int, int], tuple[int, int]] = ((1, 1), (1, 1))
    """A square and a wide image, in the units ``random_inputs`` reads, for the test batches."""
    bench_image: tuple[int, int] = (1, 1)
    """One image for benchmarks at ``MID`` size, in the same units (about LLaVA-1.5's 576 tokens, or a wide one)."""
    takes_video: bool = False
    token_types: str | None = None
    """Input naming each token's modality (1 image, 2 video), which this class's forward reads, if any."""
    backbone: Backbone | None = None
    """lmms-eval's simple wrapper that loads and prompts this class, if lmms-eval has one."""
    toy: ToyVLM | None = None
    """How ``vtprune.toyvlm`` builds this class as a trained toy VLM, for the families it has toys of."""
    photo: Photo | None = None
    """How a real photograph is fed to it, for the classes whose geometry the README pictures."""


def reduce_tokens(items: list[Tensor], kept: list[Tensor], weights: list[Tensor | None]) -> list[Tensor]:
    """Per item, the kept rows, or the weighted merges of all rows (computed in float32)."""
    return [
        tokens[index] if merge is None else (merge.to(tokens.device) @ tokens.float()).to(tokens.dtype)
        for tokens, index, merge in zip(items, kept, weights)
    ]


def float32_copy(module: nn.Module) -> nn.Module:
    """A float32 copy of a small module, for selection math that must not run in half precision."""
    first = next(module.parameters(), None)
    if first is not None and first.dtype == torch.float32:
        return module
    # Without the instance's hooks (vtprune's own recorder sits on the projector): a copy to compute with.
    memo = {
        id(hooks): type(hooks)() for part in module.modules() for key, hooks in vars(part).items() if "hooks" in key
    }
    return copy.deepcopy(module, memo).float()
