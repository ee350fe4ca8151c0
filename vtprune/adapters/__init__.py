"""Model adapters: one per model family, picked by the model's class."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from .base import ModelAdapter
from .llava import LlavaAdapter
from .llava_torch import LlavaTorchAdapter
from .qwen import QwenVLAdapter

ADAPTERS: tuple[type[ModelAdapter], ...] = (LlavaAdapter, QwenVLAdapter, LlavaTorchAdapter)


def supported_models() -> list[str]:
    return [name for adapter in ADAPTERS for name in adapter.model_classes]


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``'s class, or a clear error naming the supported classes."""
    name = type(model).__name__
    for adapter in ADAPTERS:
        if adapter.serves(model):  # subclasses of a supported class work too
            return adapter(model)
    raise UnsupportedModelError(
        f"vtprune does not support {name}; supported model classes: {', '.join(supported_models())}. "
        "Wrap the *ForConditionalGeneration model itself (not a compiled or inner module)."
    )


__all__ = ["LlavaAdapter", "LlavaTorchAdapter", "ModelAdapter", "QwenVLAdapter", "adapter_for", "supported_models"]
