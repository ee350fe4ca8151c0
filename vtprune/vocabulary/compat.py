"""The one transformers difference inside the supported range: the name of the KV-cache argument.

transformers 5.23 calls it ``past_key_values``; 5.24 renamed it ``cache`` (the old name is still
accepted, with a deprecation warning). vtprune reads whichever the caller used and passes the
current name on.
"""

from __future__ import annotations

import inspect
from typing import Any

from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask

#: The keyword this transformers version uses for the KV cache.
CACHE_KWARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
_CACHE_NAMES = ("cache", "past_key_values")


def get_cache(kwargs: dict[str, Any]) -> Cache | None:
    """The KV cache a forward was called with, under either name."""
    for name in _CACHE_NAMES:
        cache: Cache | None = kwargs.get(name)
        if cache is not None:
            return cache
    return None


def output_cache(output: Any) -> Cache | None:
    """The KV cache a model output carries (``output.cache`` from 5.24 on, ``past_key_values`` before)."""
    for name in _CACHE_NAMES:
        cache: Cache | None = getattr(output, name, None)
        if cache is not None:
            return cache
    return None
