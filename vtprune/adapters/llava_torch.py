"""The original LLaVA codebase (PyPI ``llava-torch``, import ``llava``): ``LlavaLlamaForCausalLM``,
``LlavaMistralForCausalLM`` and any class with ``prepare_inputs_labels_for_multimodal`` and
``get_model().mm_projector``.

These models splice the projected image rows into ``inputs_embeds`` themselves, in
``prepare_inputs_labels_for_multimodal``, which ``forward()`` calls and ``generate()`` calls *before*
transformers' generate. The adapter wraps that method on the one instance: it runs the original with
each text column's index passed through the ``labels`` argument (text rows come back carrying it, image
rows as ``IGNORE_INDEX``), so it knows which spliced row came from which text column and which image;
it hands the engine that prefill in the engine's own form (placeholder ids at the visual rows, each
image's rows as an encoder output) and splices the engine's pruned result back.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..errors import InputError, UnsupportedModelError
from ..vocabulary.compat import CACHE_KWARG, get_cache
from ..vocabulary.grids import Grid, Segment
from .anyres import anyres_segments
from .base import Architecture, Backbone, ModelAdapter, SplicePrefill
from .llava import attention_read_by_projector

if TYPE_CHECKING:
    from ..engine.state import VisualItem

#: llava's placeholder for one image in ``input_ids`` and its label for rows that are not text.
IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100


class LlavaTorchAdapter(ModelAdapter):
    """Llama/Mistral decoders of the original LLaVA codebase, flat (LLaVA-1.5) or AnyRes (``spatial_unpad``)."""

    splices_visual_rows = True

    #: llava-torch's classes (``get_model``, ``get_vision_tower``, ...) carry no type information.
    model: Any

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        if getattr(self.model.get_model(), "layers", None) is None:
            raise UnsupportedModelError(
                f"vtprune supports llava-torch's Llama and Mistral models, not {type(model).__name__}: llava-torch "
                "1.2.2's MPT forward calls prepare_inputs_labels_for_multimodal with arguments that do not match "
                "it, and MPT's ALiBi attention takes no position ids, so kept tokens could not keep their positions"
            )

    @classmethod
    def serves(cls, model: nn.Module) -> bool:
        get_model = getattr(model, "get_model", None)
        has_projector = callable(get_model) and hasattr(get_model(), "mm_projector")
        return hasattr(model, "prepare_inputs_labels_for_multimodal") and has_projector

    @property
    def inner(self) -> Any:
        return self.model.get_model()

    @property
    def text_model(self) -> nn.Module:
        return self.model.get_model()

    @property
    def text_config(self) -> Any:
        return self.config

    def token_ids(self) -> dict[str, int]:
        return {"image": IMAGE_TOKEN_INDEX}

    def projector_module(self) -> nn.Module:
        return self.inner.mm_projector

    def cls_attention_layer(self) -> nn.Module | None:
        # The tower layer whose output the projector reads; one tower pass per image only for flat LLaVA-1.5 (AnyRes
        # images are tiles, packed or flattened one after another: the declared fallback). The tower's own settings,
        # which its forward reads.
        anyres = str(getattr(self.config, "image_aspect_ratio", "")).startswith("anyres")
        if getattr(self.config, "mm_patch_merge_type", "flat") != "flat" or anyres:
            return None
        tower = self.model.get_vision_tower()
        clip = tower.vision_tower
        encoder = getattr(clip, "vision_model", clip).encoder  # nesting varies by version
        return attention_read_by_projector(encoder.layers, tower.select_layer)

    def grids(self, items: list[VisualItem], positions: Tensor) -> list[Grid]:
        if getattr(self.config, "mm_patch_merge_type", "flat") != "flat":
            return [None] * len(items)
        sizes = [item.columns.numel() for item in items]
        return [(1, math.isqrt(n), math.isqrt(n)) if math.isqrt(n) ** 2 == n else None for n in sizes]

    def segments(self, item: VisualItem) -> tuple[Segment, ...] | None:
        if item.newline is None:
            return None
        return anyres_segments(item.newline, self.model.get_vision_tower().num_patches_per_side)

    def newline_embedding(self) -> Tensor | None:
        return getattr(self.inner, "image_newline", None)

    def intercept_splice(self, prefill: SplicePrefill) -> Callable[[], None]:
        original = self.model.prepare_inputs_labels_for_multimodal  # the class's method, bound

        def prepare_inputs_labels_for_multimodal(
            input_ids: Tensor,
            position_ids: Tensor | None,
            attention_mask: Tensor | None,
            past_key_values: Any,
            labels: Tensor | None,
            images: Any,
            image_sizes: Any = None,
        ) -> tuple:
            call = (input_ids, position_ids, attention_mask, past_key_values, labels, images, image_sizes)
            if images is None or input_ids.shape[1] == 1 or self.model.get_vision_tower() is None:
                return original(*call)  # text only, or a decode step: llava splices nothing
            spliced: dict[str, Any] = {}

            def splice() -> dict[str, Any]:
                spliced.update(self._splice(original, *call))
                return dict(spliced)

            pruned = prefill(splice)
            return self._respliced(pruned, spliced, given_mask=attention_mask is not None, given_labels=labels)

        self.model.prepare_inputs_labels_for_multimodal = prepare_inputs_labels_for_multimodal
        cache_keyword = fix_cache_keyword(self.model)  # generate() must run while pruned, on 5.24 too

        def undo() -> None:
            cache_keyword.remove()
            delattr(self.model, "prepare_inputs_labels_for_multimodal")

        return undo

    def _splice(
        self,
        original: Callable[..., tuple],
        input_ids: Tensor,
        position_ids: Tensor | None,
        attention_mask: Tensor | None,
        past_key_values: Any,
        labels: Tensor | None,
        images: Any,
        image_sizes: Any,
    ) -> dict[str, Any]:
        """Run llava's splice with column markers as labels; return it in the engine's prefill form."""
        batch, length = input_ids.shape
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        markers = torch.arange(length, device=input_ids.device).expand(batch, -1)
        _, positions, spliced_mask, cache, embeds, source = original(
            input_ids, position_ids, mask, past_key_values, markers, images, image_sizes
        )
        valid = spliced_mask.bool()
        text = source >= 0
        if batch > 1 and bool((~valid[:, -1]).any()):
            raise InputError(
                "llava-torch padded this batch on the right (config.tokenizer_padding_side), which gives wrong "
                "generations for the shorter rows even without pruning; set model.config.tokenizer_padding_side = "
                "'left' (and pad input_ids on the left)"
            )
        column = source.clamp(min=0)
        ids = torch.where(text, input_ids.gather(1, column), IMAGE_TOKEN_INDEX)
        ids = ids.masked_fill(~valid, 0)
        features = [embeds[row, slots] for row, slots in self._images(input_ids, mask.bool(), valid & ~text, source)]
        kwargs: dict[str, Any] = {
            "input_ids": ids,
            "inputs_embeds": embeds,
            "attention_mask": valid.to(mask.dtype),
            "position_ids": positions,
            "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=features)},  # type: ignore[arg-type]  # per image, as HF's own
        }
        if labels is not None:
            kwargs["labels"] = torch.where(text, labels.gather(1, column), IGNORE_INDEX).masked_fill(
                ~valid, IGNORE_INDEX
            )
        if cache is not None:
            kwargs[CACHE_KWARG] = cache
        return kwargs

    def _images(self, input_ids: Tensor, valid_in: Tensor, visual: Tensor, source: Tensor) -> list[tuple[int, Tensor]]:
        """(row, spliced slots) of every image, in llava's order (row by row, left to right).

        A run of image rows belongs to the placeholders between the text columns around it; several
        placeholders with no text between them make one run, split evenly (flat images all have one size).
        """
        found: list[tuple[int, Tensor]] = []
        flat = getattr(self.config, "mm_patch_merge_type", "flat") == "flat"
        for row in range(input_ids.shape[0]):
            slots = visual[row].nonzero(as_tuple=True)[0]
            if slots.numel() == 0:
                continue
            breaks = (slots[1:] != slots[:-1] + 1).nonzero(as_tuple=True)[0] + 1
            placeholders = ((input_ids[row] == IMAGE_TOKEN_INDEX) & valid_in[row]).nonzero(as_tuple=True)[0]
            for run in torch.tensor_split(slots, breaks.tolist()):
                first, last = int(run[0]), int(run[-1])
                before = int(source[row, first - 1]) if first > 0 and source[row, first - 1] >= 0 else -1
                after_slot = last + 1 < source.shape[1] and source[row, last + 1] >= 0
                after = int(source[row, last + 1]) if after_slot else input_ids.shape[1]
                count = int(((placeholders > before) & (placeholders < after)).sum())
                if count == 0 or run.numel() % count or (count > 1 and not flat):
                    raise InputError(
                        f"row {row}: {count} <image> placeholders spliced into one run of {run.numel()} rows that "
                        "vtprune cannot split into images (AnyRes images of different sizes, or a sequence cut by "
                        "tokenizer_model_max_length); put a text token between images"
                    )
                found.extend((row, part) for part in run.chunk(count))
        return found

    @staticmethod
    def _respliced(pruned: dict[str, Any], spliced: dict[str, Any], given_mask: bool, given_labels: Any) -> tuple:
        """llava's return value for the engine's (possibly pruned) prefill."""
        embeds, mask = pruned["inputs_embeds"], pruned["attention_mask"]
        if embeds is spliced["inputs_embeds"] and not given_mask:  # nothing dropped: what llava returned
            mask = None
        labels = pruned.get("labels") if given_labels is not None else None
        return None, pruned["position_ids"], mask, get_cache(pruned), embeds, labels


def fix_cache_keyword(model: nn.Module) -> RemovableHandle:
    """Let a llava-torch model run under transformers >= 5.24, whose generate() passes the KV cache as ``cache=``
    while llava's ``forward(past_key_values=...)`` has no such keyword (a TypeError on every step). A forward
    pre-hook on this one instance renames it; ``.remove()`` the returned handle to undo it."""

    def rename(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        if "cache" not in kwargs:
            return None
        kwargs = dict(kwargs)
        cache = kwargs.pop("cache")
        if kwargs.get("past_key_values") is None:
            kwargs["past_key_values"] = cache
        return args, kwargs

    return model.register_forward_pre_hook(rename, with_kwargs=True)


#: The original codebase's classes: transformers cannot build them, so they are outside the generic tests'
#: enrolment (tests/adapters/test_llava_torch.py builds them); lmms-eval's own ``llava`` wrapper loads them.
ARCHITECTURES = tuple(
    Architecture(
        model_class=model_class,
        model_type=model_type,
        adapter=LlavaTorchAdapter,
        backbone=Backbone("lmms_eval.models.simple.llava", "Llava", cpu_device_map="auto"),
    )
    for model_class, model_type in (
        ("LlavaLlamaForCausalLM", "llava_llama"),
        ("LlavaMistralForCausalLM", "llava_mistral"),
    )
)


def llava_torch_inputs(inputs: dict[str, Tensor], image_token_id: int, tokens_per_image: int) -> dict[str, Any]:
    """The same left-padded prompts for llava-torch, from a flat LLaVA processor's ``inputs``: each image's
    ``tokens_per_image`` placeholders become one ``IMAGE_TOKEN_INDEX``, ``pixel_values`` become ``images``, and
    ``position_ids`` are given (llava then numbers each row from its first real token, as ``generate()`` does)."""
    sequences = []
    for ids, valid in zip(inputs["input_ids"], inputs["attention_mask"].bool()):
        row = ids[valid]
        is_image = row == image_token_id
        if int(is_image.sum()) % tokens_per_image:
            raise InputError(f"{int(is_image.sum())} image tokens in a row: not {tokens_per_image} each")
        first = is_image & (torch.cumsum(is_image, 0) % tokens_per_image == 1 % tokens_per_image)
        sequences.append(row[~is_image | first].masked_fill(first[~is_image | first], IMAGE_TOKEN_INDEX))
    length = max(len(sequence) for sequence in sequences)
    input_ids = torch.zeros(len(sequences), length, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, sequence in enumerate(sequences):
        input_ids[row, length - len(sequence) :] = sequence
        mask[row, length - len(sequence) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions, "images": inputs["pixel_values"]}
