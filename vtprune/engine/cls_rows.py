"""Which image each recorded [CLS] attention row belongs to, for the strategies that read it (ToDRE's pivot).

Shared by the transformers path and the vLLM backend (no import of either). A tower without a [CLS] token, and the
packings that do not map one tower pass to one image's tokens (AnyRes tiles), record no rows at all: the strategy's
declared fallback applies. A tower with a [CLS] token must give every image that reads the row exactly its own one;
anything else would rank the image's tokens with no row, another image's row or a row of other tokens, silently.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ..errors import InputError


def cls_rows_of_images(
    rows: Sequence[Tensor] | None, token_counts: Sequence[int], readers: Sequence[str | None]
) -> list[Tensor | None]:
    """Each image's [CLS] attention row (None where nothing reads it).

    ``rows``: what the encoding of these images recorded, one per image in encoding order; None where the tower
    records none by declaration (no [CLS] token, AnyRes tiles). ``token_counts``: each image's tokens. ``readers``:
    per image, what reads the row (a strategy or schedule, named in the messages), or None.
    """
    if rows is None or not any(readers):
        return [None] * len(token_counts)
    reader = next(name for name in readers if name)
    if len(rows) != len(token_counts):
        raise InputError(
            f"{len(token_counts)} images were embedded but the vision tower's [CLS] attention, which {reader!r} "
            f"reads, was recorded for {len(rows)} tower passes: vtprune records one per image the model encodes "
            "from pixels in this call and hands on, and images sent as precomputed embeddings (transformers' "
            "mm_encoder_outputs, vLLM's image embeddings) pass no tower; nor do encoder outputs other than the ones "
            "the call made (the slices generate(prefill_chunk_size=...) hands each chunk). Send the images themselves "
            "(pixel inputs) in one prefill for a strategy that reads it, or choose another strategy"
        )
    for row, count, name in zip(rows, token_counts, readers, strict=True):
        if name and len(row) != count:
            raise InputError(
                f"{name!r} reads the [CLS] attention to the image's {len(row)} patches, but the image has {count} "
                "tokens (a vision_feature_select_strategy of 'full', or llava's mm_vision_select_feature "
                "'cls_patch', keeps the [CLS] token among them), so the row does not rank them; use a checkpoint "
                "whose projector reads the patches alone, or another strategy"
            )
    return [row if name else None for row, name in zip(rows, readers, strict=True)]
