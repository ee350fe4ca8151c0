"""What one forward (or the prefill of one ``generate()``) pruned, per row and per image."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class ImageRecord:
    """One image or video of one batch row."""

    row: int
    """Row of the batch the model saw (after beam / num_return_sequences expansion)."""
    modality: str
    """"image" or "video"."""
    index: int
    """Order of this item among the row's items of the same modality."""
    num_tokens: int
    """Visual tokens the model produced for it."""
    kept_by_stage: dict[str, Tensor] = field(default_factory=dict)
    """Stage name ("input", "layer 2", ...) -> indices still kept after that stage, in the image's own token order."""
    scores_by_stage: dict[str, Tensor] = field(default_factory=dict)
    """With ``prune(..., record_scores=True)``: stage name -> (num_tokens,) score the stage's strategy ranked
    each token by, NaN for tokens it did not see (gone before that stage, or not candidates); stages whose
    strategy has no score (random, uniform, pooling) are absent."""

    @property
    def kept(self) -> Tensor | None:
        """Indices kept after the last stage (None if no stage ran)."""
        return list(self.kept_by_stage.values())[-1] if self.kept_by_stage else None

    def tokens_after(self) -> dict[str, int]:
        """Visual tokens of this image left after each stage."""
        return {stage: int(kept.numel()) for stage, kept in self.kept_by_stage.items()}


@dataclass
class PruneRecord:
    """Record of the last prefill: kept tokens per image and sequence length entering each decoder layer."""

    images: list[ImageRecord]
    layer_lengths: Tensor
    """(B, num_layers): tokens (padding excluded) each row fed into each decoder layer."""
    schedule: str
    """The schedule that produced it, in its string form."""
    selection_seconds: float = 0.0
    """Wall time the strategies spent selecting (CPU clock; on GPU it excludes unsynchronised kernels)."""
    hook_seconds: float = 0.0
    """Wall time inside vtprune's hooks during the prefill, selection included."""

    def for_row(self, row: int) -> list[ImageRecord]:
        return [image for image in self.images if image.row == row]

    def visual_tokens(self) -> dict[str, int]:
        """Visual tokens of the whole batch before pruning ("before") and after each stage."""
        totals = {"before": sum(image.num_tokens for image in self.images)}
        for image in self.images:
            for stage, count in image.tokens_after().items():
                totals[stage] = totals.get(stage, 0) + count
        return totals

    def visual_tokens_left(self) -> int:
        """Visual tokens of the whole batch after the last stage (all of them when no stage pruned)."""
        return list(self.visual_tokens().values())[-1]
