"""What a family declares to be built as a trained toy VLM (``vtprune.toyvlm``): its tokens, processor and config.

The toy recipe itself (a word-level vocabulary, one visual token per cell of the task's image grid, the training
loop) lives in ``vtprune.toyvlm``; a family gives the parts only it knows, from the numbers the toy passes in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from transformers import PretrainedConfig, PreTrainedTokenizerFast, ProcessorMixin


@dataclass(frozen=True)
class ToyGeometry:
    """The toy's square images: ``image_size`` pixels a side, one visual token per ``cell`` x ``cell`` pixels."""

    image_size: int
    cell: int


@dataclass(frozen=True)
class ToyVLM:
    """How one class is built as a toy VLM: its prompt's image, special tokens, processor and config."""

    image_placeholder: str
    """How a prompt writes one image (the processor expands it to one token per cell)."""
    special_tokens: tuple[str, ...]
    """The word-level tokenizer's special tokens, ids 0, 1, ... in order: pad, unk, eos, then the family's own."""
    named_tokens: Mapping[str, str]
    """The family's special tokens by the attribute name its processor reads them under (``image_token``, ...)."""
    processor: Callable[[PreTrainedTokenizerFast, ToyGeometry, str], ProcessorMixin]
    """(tokenizer, geometry, chat template) -> the family's processor around that tokenizer."""
    config: Callable[[PreTrainedTokenizerFast, ToyGeometry, dict[str, Any], Mapping[str, int]], PretrainedConfig]
    """(tokenizer, geometry, text config fields, sizes) -> the model's config; the sizes name ``vision_hidden``,
    ``vision_layers`` and ``heads`` (the text sizes are in the text fields already)."""
    processor_class: str
    """The class name of what ``processor`` builds: how a toy's (or a loaded toy's) processor tells its family."""
    image_backend: str
    """The ``backend`` its image processor is loaded with, pinned: PIL and torchvision resize and normalise with
    different float rounding, which moves the toy benchmark's figures."""
    sizes: Mapping[str, int] = field(default_factory=dict)
    """Overrides of the toy's default model sizes."""


def token_id(tokenizer: PreTrainedTokenizerFast, token: str) -> int:
    """The id of one of the toy tokenizer's tokens."""
    ids = tokenizer.convert_tokens_to_ids(token)
    assert isinstance(ids, int), f"{token!r} is one token"
    return ids
