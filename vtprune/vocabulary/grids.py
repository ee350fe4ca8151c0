"""How one image's tokens lie on a raster: its grid (t, h, w), and the segments of an AnyRes-packed image."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: Grid of one image's tokens, (t, h, w), or None when they are not one raster grid.
Grid = tuple[int, int, int] | None


@dataclass(frozen=True)
class Segment:
    """A raster grid of cells inside one image's token list (AnyRes packs a base tile and a high-res grid)."""

    start: int
    """Token index of the first cell."""
    grid: tuple[int, int, int]
    """(t, h, w) of the cells."""
    row_newlines: bool = False
    """A newline token follows every row (LLaVA-NeXT / OneVision's unpadded high-res grid)."""

    @property
    def row_length(self) -> int:
        return self.grid[2] + int(self.row_newlines)

    def cells(self) -> Tensor:
        """Token indices of the cells, in raster order (frame, row, column)."""
        t, h, w = self.grid
        frame, row, col = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
        return (self.start + (frame * h + row) * self.row_length + col).flatten()

    def newline_after(self, row: int) -> int:
        """Token index of the newline that ends ``row`` (``row_newlines`` segments)."""
        return self.start + row * self.row_length + self.grid[2]
