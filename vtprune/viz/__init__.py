"""See what was kept: map every visual token back to its image region and draw the kept ones.

Two lines after a pruned run::

    from vtprune import viz
    viz.show_kept(handle.last_record, inputs, images, model=model, processor=processor).save("kept.png")

``regions`` maps token indices to pixel boxes per model family (no drawing), ``draw`` draws with PIL
only, ``show`` puts records, regions and drawings together. :func:`figure` (matplotlib, the ``viz``
extra) turns panels into a figure for notebooks.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from PIL import Image

from .draw import Panel, draw_kept, draw_scores, grid
from .regions import ItemRegions, View, match_records, token_regions
from .show import compare, kept_panels, score_panels, show_kept, show_scores


def figure(panels: Sequence[Panel] | Image.Image, columns: int | None = None) -> Any:
    """A matplotlib figure of ``panels`` (titles as axes titles) or of one composed image.

    matplotlib is optional (``pip install vtprune[viz]``); everything else in ``vtprune.viz`` needs PIL only.
    """
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("vtprune.viz.figure needs matplotlib: pip install 'vtprune[viz]'") from error
    if isinstance(panels, Image.Image):
        panels = [Panel("", panels)]
    columns = columns or len(panels)
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, panel in zip(axes.flat, panels):
        ax.imshow(panel.image, interpolation="nearest")
        ax.set_title(panel.title, fontsize=8)
    fig.tight_layout()
    return fig


__all__ = [
    "ItemRegions",
    "Panel",
    "View",
    "compare",
    "draw_kept",
    "draw_scores",
    "figure",
    "grid",
    "kept_panels",
    "match_records",
    "score_panels",
    "show_kept",
    "show_scores",
    "token_regions",
]
