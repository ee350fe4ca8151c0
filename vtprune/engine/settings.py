"""What :func:`vtprune.prune` was asked for, fixed for the life of one handle."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..schedule import Schedule
from .selection import NEWLINE_POLICIES


@dataclass(frozen=True)
class PruneSettings:
    """The schedule (resolved for the model's depth) and the keywords of :func:`vtprune.prune` that go with it."""

    schedule: Schedule
    seed: int = 0
    """Feeds the random strategies, mixed with each sample's own tokens."""
    newlines: str = "candidate"
    """Whether AnyRes newline tokens are ordinary candidates ("candidate") or always dropped ("drop")."""
    renumber: bool = False
    """Number kept tokens contiguously instead of keeping their original positions (1-D RoPE only)."""
    tokenizer: Any | None = None
    """A tokenizer or processor, for text-aware strategies to find the question's words."""
    record_scores: bool = False
    """Also record the score each stage's strategy ranked the tokens by (``ImageRecord.scores_by_stage``)."""

    def __post_init__(self) -> None:
        if self.newlines not in NEWLINE_POLICIES:
            raise ValueError(f"newlines must be one of {NEWLINE_POLICIES}, got {self.newlines!r}")
