"""An independent reference for pruning: the unpruned model with the dropped tokens masked out.

Masking a token out of attention (at its original position, from the first layer it is dropped
at) must give the kept tokens exactly what removing it gives. Nothing here uses vtprune's
layouts: kept columns are rebuilt from the record's kept indices and the placeholder positions.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor
from transformers.masking_utils import create_causal_mask

from vtprune.record import PruneRecord
from vtprune.testing import IMAGE, VIDEO
from vtprune.vocabulary.compat import CACHE_KWARG


def kept_columns(inputs: dict, record: PruneRecord, stage: str) -> Tensor:
    """(B, L) bool: original columns still present after ``stage`` (padding false)."""
    ids = inputs["input_ids"]
    keep = inputs["attention_mask"].bool().clone()
    for image in record.images:
        token = IMAGE if image.modality == "image" else VIDEO
        columns = (ids[image.row] == token).nonzero()[:, 0]
        earlier = [x for x in record.images if x.row == image.row and x.modality == image.modality][: image.index]
        start = sum(x.num_tokens for x in earlier)
        mine = columns[start : start + image.num_tokens]
        dropped = torch.ones(image.num_tokens, dtype=torch.bool)
        dropped[image.kept_by_stage[stage]] = False
        keep[image.row, mine[dropped]] = False
    return keep


def original_positions(model, inputs: dict) -> Tensor | None:
    """Explicit positions of the unpruned prefill (Qwen M-RoPE; None for 1-D models, which use arange)."""
    if not hasattr(model.model, "compute_3d_position_ids"):
        return None
    return model.model.compute_3d_position_ids(
        input_ids=inputs["input_ids"],
        inputs_embeds=None,
        image_grid_thw=inputs.get("image_grid_thw"),
        video_grid_thw=inputs.get("video_grid_thw"),
        attention_mask=inputs["attention_mask"],
        **{CACHE_KWARG: None},
        mm_token_type_ids=inputs["mm_token_type_ids"],
    )


@contextmanager
def masked_from_layer(model, layer: int, keep: Tensor) -> Iterator[None]:
    """Layers >= ``layer`` see the columns outside ``keep`` as masked keys (tokens added later are kept)."""
    text_model = model.model.language_model

    def pre_hook(module, args, kwargs):
        hidden_states = args[0] if args else kwargs["hidden_states"]
        grown = hidden_states.shape[1] - keep.shape[1]
        mask = torch.cat([keep.long(), torch.ones(keep.shape[0], grown, dtype=torch.long)], dim=1)
        kwargs["attention_mask"] = create_causal_mask(
            config=text_model.config,
            inputs_embeds=hidden_states,
            attention_mask=mask,
            **{CACHE_KWARG: None},
            position_ids=None,
        )
        return args, kwargs

    hooks = [
        text_model.layers[i].register_forward_pre_hook(pre_hook, with_kwargs=True)
        for i in range(layer, len(text_model.layers))
    ]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def reference_inputs(
    model, inputs: dict, keep_input: Tensor, *, for_generate: bool = False, renumber: bool = False
) -> dict:
    """The unpruned inputs with the input-stage drops masked and original (or renumbered) positions explicit."""
    kwargs = dict(inputs, attention_mask=keep_input.long())
    if renumber:  # contiguous over the kept tokens of each row (1-D models)
        kwargs["position_ids"] = (keep_input.long().cumsum(-1) - 1).clamp(min=0)
        return kwargs
    positions = original_positions(model, inputs)
    # generate() numbers tokens by the cumulative 2-D mask; the reference's mask has holes, so give
    # it the positions of the unmasked prompt explicitly.
    text = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    if positions is not None:
        # generate() takes (4, B, L) for Qwen: text positions first, then t/h/w.
        kwargs["position_ids"] = torch.cat([text[None], positions]) if for_generate else positions
    elif for_generate:
        kwargs["position_ids"] = text
    return kwargs


def reference(model, inputs: dict, record: PruneRecord, *, generate_tokens: int = 0, renumber: bool = False) -> Tensor:
    """Logits (or, with ``generate_tokens``, greedy tokens) of the masking reference for ``record``."""
    stages = list(record.images[0].kept_by_stage) if record.images else []
    keep_input = kept_columns(inputs, record, "input") if "input" in stages else inputs["attention_mask"].bool()
    kwargs = reference_inputs(model, inputs, keep_input, for_generate=bool(generate_tokens), renumber=renumber)
    decoder = [stage for stage in stages if stage.startswith("layer ")]
    assert len(decoder) <= 1, "the reference handles one decoder stage"
    with torch.no_grad():
        if decoder:
            layer = int(decoder[0].split()[1])
            with masked_from_layer(model, layer, kept_columns(inputs, record, decoder[0])):
                if generate_tokens:
                    # Without a cache every step re-runs the whole sequence through the masking hooks.
                    return model.generate(**kwargs, max_new_tokens=generate_tokens, do_sample=False, use_cache=False)
                return model(**kwargs).logits
        if generate_tokens:
            return model.generate(**kwargs, max_new_tokens=generate_tokens, do_sample=False)
        return model(**kwargs).logits


def kept_logits(reference_logits: Tensor, keep: Tensor, pruned_logits: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Pairs (reference, pruned) of the logits of each row's kept tokens, in order."""
    pairs = []
    for row in range(reference_logits.shape[0]):
        expected = reference_logits[row][keep[row]]
        pairs.append((expected, pruned_logits[row][-expected.shape[0] :]))
    return pairs


def final_keep(inputs: dict, record: PruneRecord) -> Tensor:
    if not record.images:
        return inputs["attention_mask"].bool()
    return kept_columns(inputs, record, list(record.images[0].kept_by_stage)[-1])
