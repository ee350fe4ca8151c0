"""Model adapters: one per model family, picked by the model's class."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from .base import ModelAdapter
from .llava import LlavaAdapter
from .qwen import QwenVLAdapter

ADAPTERS: tuple[type[ModelAdapter], ...] = (LlavaAdapter, QwenVLAdapter)


def supported_models() -> list[str]:
    return [name for adapter in ADAPTERS for name in adapter.model_classes]


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``'s class, or a clear error naming the supported classes."""
    name = type(model).__name__
    lineage = {cls.__name__ for cls in type(model).__mro__}  # subclasses of a supported class work too
    for adapter in ADAPTERS:
        if lineage.intersection(adapter.model_classes):
            return adapter(model)
    raise UnsupportedModelError(
        f"vtprune does not support {name}; supported model classes: {', '.join(supported_models())}. "
        "Wrap the *ForConditionalGeneration model itself (not a compiled or inner module)."
    )


__all__ = ["ModelAdapter", "LlavaAdapter", "QwenVLAdapter", "adapter_for", "supported_models"]
