"""The decoder stages' hooks: prune visual tokens inside the decoder, from layer K on, during prefill.

The text model hands the same causal mask and the same (cos, sin) tables to every layer, so a
pre-hook sits on every layer from the first pruning layer on. At a pruning layer it selects for
all images at once (images with as many tokens left run as one group) and packs the hidden
states, the rotary tables and the mask with one layout; later layers get the packed versions.
Decode steps give layers >= K a mask sized against cache layer K.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask

from ..adapters import ModelAdapter
from ..schedule import Stage
from ..strategies.base import TokenContext
from ..vocabulary.compat import CACHE_KWARG, get_cache
from ..vocabulary.layout import pack
from .attention import cross_modal_shares, last_token_attention
from .selection import score_tokens, select_tokens
from .session import Session
from .settings import PruneSettings
from .state import PruneState


class DecoderHooks:
    """Pre-hooks for decoder layers, shared by every decoder stage of one schedule."""

    def __init__(self, adapter: ModelAdapter, settings: PruneSettings, session: Session) -> None:
        self.adapter = adapter
        self.settings = settings
        self.session = session
        self.stages: dict[int, Stage] = {}
        for stage in settings.schedule.decoder_stages:
            assert stage.layer is not None  # prune() resolves the schedule: every decoder stage has its layer
            self.stages[stage.layer] = stage

    @property
    def first_layer(self) -> int:
        return min(self.stages)

    def install(self, add_undo: Callable[[Callable[[], None]], None]) -> None:
        """Register the hooks, handing each one's undo to ``add_undo`` as soon as it is in place."""
        layers = self.adapter.layers
        for index in range(self.first_layer, len(layers)):
            add_undo(layers[index].register_forward_pre_hook(self._layer_hook(index), with_kwargs=True).remove)
        for layer, stage in self.stages.items():
            if stage.strategy.needs & {"attention", "cross_shares"}:
                attn = cast(nn.Module, layers[layer - 1].self_attn)
                add_undo(attn.register_forward_hook(self._attention_hook(layer), with_kwargs=True).remove)
        add_undo(self.adapter.install_decoder_remap(self._current_source))

    def _current_source(self) -> Any:
        state = self.session.state
        return None if state is None or not state.prefilling else state.decoder_source

    def _attention_hook(self, layer: int) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
            state = self.session.state
            if state is None or not state.prefilling:
                return
            hidden_states = args[0] if args else kwargs["hidden_states"]
            needs, tables = self.stages[layer].strategy.needs, kwargs["position_embeddings"]
            with self.session.timing("hook_seconds"), self.session.timing("selection_seconds"):
                # Scored on the prompt: the steps of a cache-less generate() append tokens that must not count.
                if "attention" in needs:
                    state.attention[layer] = last_token_attention(module, hidden_states, tables, state.prompt)
                if "cross_shares" in needs:
                    visual = state.item_of_slot >= 0
                    state.cross_shares[layer] = cross_modal_shares(module, hidden_states, tables, state.prompt, visual)

        return hook

    def _layer_hook(self, layer: int) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
            state = self.session.state
            if state is None:
                return None
            with self.session.timing("hook_seconds"):
                return self._layer_inputs(layer, state, args, kwargs)

        return hook

    def _layer_inputs(self, layer: int, state: PruneState, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        hidden_states = args[0] if args else kwargs.pop("hidden_states")
        args = args[1:]
        if state.prefilling:
            if layer in self.stages:
                hidden_states = self._prune(layer, state, hidden_states, kwargs)
            self.session.record_layer(layer, state)
            if state.layer_inputs is not None:
                mask, position_embeddings, position_ids = state.layer_inputs
                kwargs.update(attention_mask=mask, position_embeddings=position_embeddings)
                if kwargs.get("position_ids") is not None:
                    kwargs["position_ids"] = position_ids
        else:
            governing = state.governing_layer(layer)
            if governing is not None:
                kwargs["attention_mask"] = self._decode_mask(state, governing, hidden_states, kwargs)
        return (hidden_states, *args), kwargs

    def _prune(self, layer: int, state: PruneState, hidden_states: Any, kwargs: dict[str, Any]) -> Any:
        stage = self.stages[layer]
        keep = state.valid.clone()
        attention = state.attention.pop(layer, None)
        shares = state.cross_shares.pop(layer, None)
        present, images = [], []  # the items with tokens left at this layer, and what selection sees of each
        for index, item in enumerate(state.items):
            slots = (state.item_of_slot[item.row] == index).nonzero(as_tuple=True)[0]
            if slots.numel() == 0:
                continue
            present.append((item, slots))
            images.append(
                TokenContext(
                    features=hidden_states[item.row, slots],
                    keep=slots.numel(),
                    seed=item.seed_at(layer),
                    layer=layer,
                    attention=None if attention is None else attention[item.row, slots],
                    cross_shares=None if shares is None else shares[item.row],
                    newline=None if item.newline is None else item.newline[state.token_of_slot[item.row, slots]],
                )
            )
        newlines = self.settings.newlines
        with self.session.timing("selection_seconds"):
            kept_per_item = select_tokens(stage.strategy, stage.budget, images, newlines=newlines)
        for (item, slots), image, kept in zip(present, images, kept_per_item):
            if self.settings.record_scores:
                scores = score_tokens(stage.strategy, image, newlines=newlines)
                if scores is not None:  # from the slots still present to the item's own token order
                    full = torch.full((item.record.num_tokens,), torch.nan)
                    full[state.token_of_slot[item.row, slots].cpu()] = scores
                    item.record.scores_by_stage[stage.key] = full
            dropped = slots.new_ones(slots.numel(), dtype=keep.dtype)
            dropped[kept.to(slots.device)] = False
            keep[item.row, slots[dropped]] = False
        changed = not bool((keep == state.valid).all())
        if changed:
            layout = pack(keep, state.left_pad)
            state.apply(layout)
            state.decoder_layouts[layer] = layout
            state.compose_decoder_source(layout)
            hidden_states = layout.take(hidden_states)
            cos, sin = state.layer_inputs[1] if state.layer_inputs else kwargs["position_embeddings"]
            position_ids = state.layer_inputs[2] if state.layer_inputs else kwargs.get("position_ids")
            if position_ids is not None:
                position_ids = layout.take(position_ids, fill=0)
            mask = create_causal_mask(
                config=self.adapter.text_config,
                inputs_embeds=hidden_states,
                attention_mask=state.valid.long(),
                **{CACHE_KWARG: get_cache(kwargs)},
                position_ids=None,
                layer_idx=layer,
            )
            state.layer_inputs = (mask, (layout.take(cos), layout.take(sin)), position_ids)
        for index, item in enumerate(state.items):
            item.record.kept_by_stage[stage.key] = state.kept_tokens(index)
        return hidden_states

    def _decode_mask(self, state: PruneState, governing: int, hidden_states: Any, kwargs: dict[str, Any]) -> Any:
        if governing not in state.step_causal:
            state.step_causal[governing] = create_causal_mask(
                config=self.adapter.text_config,
                inputs_embeds=hidden_states,
                attention_mask=state.step_masks[governing],
                **{CACHE_KWARG: get_cache(kwargs)},
                position_ids=None,
                layer_idx=governing,
            )
        return state.step_causal[governing]
