"""The family registry: one module per model family, each declaring its ``ARCHITECTURES``.

Everything vtprune knows about a model class (its adapter, ``model_type``, lmms-eval backbone, token geometry,
random-weight config, toy VLM and photo recipes) is one :class:`Architecture` in its family's module; the engine,
``viz``, the harness, ``vtprune.testing``, ``vtprune.toyvlm`` and the benchmarks look classes up here
(``tests/engine/test_family_names.py`` checks that nothing else names one). Adding a family = one module here + adding it to ``FAMILIES``.
"""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from . import anyres, gemma3, internvl, llava, llava_torch, qwen
from .base import Architecture, ModelAdapter

FAMILIES = (llava, anyres, qwen, internvl, gemma3, llava_torch)
ARCHITECTURES: tuple[Architecture, ...] = tuple(arch for family in FAMILIES for arch in family.ARCHITECTURES)


def supported_models() -> list[str]:
    return [arch.model_class for arch in ARCHITECTURES]


def architecture_of(model: nn.Module) -> Architecture:
    """The architecture of ``model``'s class (or of the supported class it derives from), or a clear error."""
    lineage = [cls.__name__ for cls in type(model).__mro__]  # subclasses of a supported class work too
    for name in lineage:
        for arch in ARCHITECTURES:
            if arch.model_class == name:
                return arch
    for arch in ARCHITECTURES:  # a class the registry does not name but an adapter recognises (a fork's)
        if arch.adapter.serves(model):
            return arch
    raise UnsupportedModelError(
        f"vtprune does not support {type(model).__name__}; supported model classes: {', '.join(supported_models())}. "
        "Wrap the *ForConditionalGeneration model itself (not a compiled or inner module)."
    )


def architecture(model_type: str) -> Architecture:
    """The architecture whose ``config.model_type`` is ``model_type``, or a clear error naming the known ones."""
    for arch in ARCHITECTURES:
        if arch.model_type == model_type:
            return arch
    known = ", ".join(arch.model_type for arch in ARCHITECTURES)
    raise UnsupportedModelError(f"vtprune does not support model_type {model_type!r}; supported: {known}")


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``'s class, or a clear error naming the supported classes."""
    return architecture_of(model).adapter(model)


__all__ = ["ARCHITECTURES", "Architecture", "ModelAdapter", "adapter_for", "architecture", "architecture_of"]
__all__ += ["supported_models"]
