"""Qwen-VL family: Qwen2-VL, Qwen2.5-VL, Qwen3-VL (M-RoPE positions; Qwen3-VL adds deepstack)."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Callable

from torch import Tensor, nn
from transformers.modeling_outputs import ModelOutput

from ..vocabulary.compat import CACHE_KWARG
from ..vocabulary.grids import Grid
from ..vocabulary.layout import take
from .base import ModelAdapter, reduce_tokens

if TYPE_CHECKING:
    from ..engine.state import VisualItem


class QwenVLAdapter(ModelAdapter):
    """Features are merger outputs in raster order of the merged (t, h/m, w/m) grid."""

    model_classes = (
        "Qwen2VLForConditionalGeneration",
        "Qwen2_5_VLForConditionalGeneration",
        "Qwen3VLForConditionalGeneration",
    )
    # (3, B, L) t/h/w rows, or (4, B, L) with the text positions first as generate() passes them.
    position_seq_dim = 2

    def original_positions(self, kwargs: dict[str, Any], input_ids: Tensor) -> Tensor:
        if kwargs.get("position_ids") is not None:
            return kwargs["position_ids"]
        # M-RoPE must come from the unpruned ids: recomputing it on shortened ids fails. Every argument of the
        # model's own function that the caller passed goes through (second_per_grid_ts, mm_token_type_ids, and
        # whatever a later version adds), so the positions are the model's for every input it accepts.
        compute = self.inner.compute_3d_position_ids
        parameters = inspect.signature(compute).parameters.values()
        unset = inspect.Parameter.empty
        arguments = {p.name: kwargs.get(p.name, None if p.default is unset else p.default) for p in parameters}
        arguments.update(input_ids=input_ids, inputs_embeds=None, **{CACHE_KWARG: None})
        positions = compute(**arguments)
        if positions is None:  # text only: the text model's own default
            return super().original_positions(kwargs, input_ids)[None].expand(3, -1, -1)
        return positions

    def grids(self, items: list[VisualItem], positions: Tensor) -> list[Grid]:
        # M-RoPE gives each token (t, h, w) = start + its grid coordinates, so a frame's extent in h
        # and w is its grid. A frame is the first contiguous run of the item's tokens: Qwen3-VL puts
        # each video frame in its own run, Qwen2/2.5-VL one run per item.
        hw = positions[-2:]  # (2, B, L): the h and w rows, for (3, B, L) and (4, B, L) alike
        grids: list[Grid] = []
        for item in items:
            columns = item.columns
            breaks = (columns[1:] - columns[:-1] != 1).nonzero()
            frame = columns[: int(breaks[0]) + 1] if breaks.numel() else columns
            coords = hw[:, item.row, frame]
            h, w = (int(extent) for extent in coords.max(dim=1).values - coords.min(dim=1).values + 1)
            t, rest = divmod(columns.numel(), h * w)
            grids.append((t, h, w) if rest == 0 and t * h * w == columns.numel() else None)
        return grids

    def projector_module(self) -> nn.Module:
        return self.inner.visual.merger

    @property
    def projector_rows(self) -> int:  # the merger reads each spatial_merge_size^2 block as one token
        return self.inner.config.vision_config.spatial_merge_size**2

    def shorten_outputs(self, output: ModelOutput, kept: list[Tensor], weights: list[Tensor | None]) -> ModelOutput:
        shortened = super().shorten_outputs(output, kept, weights)
        if getattr(output, "deepstack_features", None) is not None:
            # Qwen3-VL adds these vision-layer features to the visual tokens of early decoder layers.
            shortened.deepstack_features = [reduce_tokens(level, kept, weights) for level in output.deepstack_features]
        return shortened

    def install_decoder_remap(self, current_source: Callable[[], Tensor | None]) -> Callable[[], None]:
        text_model = self.text_model
        if not hasattr(text_model, "_deepstack_process"):
            return lambda: None
        original = text_model._deepstack_process

        def deepstack_process(hidden_states: Tensor, visual_pos_masks: Tensor, visual_embeds: Tensor) -> Tensor:
            source = current_source()
            if source is not None:
                # visual_embeds has one row per visual slot of the decoder's input sequence, row-major.
                rank = visual_pos_masks.flatten().long().cumsum(0).view_as(visual_pos_masks) - 1
                visual_pos_masks = take(visual_pos_masks, source, fill=False)
                visual_embeds = visual_embeds[take(rank, source)[visual_pos_masks]]
            return original(hidden_states, visual_pos_masks, visual_embeds)

        # An attribute on this one instance; removing it brings back the class method.
        text_model._deepstack_process = deepstack_process
        return lambda: delattr(text_model, "_deepstack_process")
