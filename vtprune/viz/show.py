"""From a prune record to pictures: which tokens survived each stage, heat maps of scores, schedules side by side.

Each function returns one PIL image (a captioned grid: one row per picture an item's tokens lie on, one
column per stage or schedule); the ``*_panels`` functions return the panels for :func:`vtprune.viz.figure`.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from ..api import pruned
from ..record import ImageRecord, PruneRecord
from .draw import Panel, draw_kept, draw_scores, grid
from .regions import ItemRegions, View, match_records, token_regions

#: ``stages=`` values: the last stage only, or every stage of the schedule in order.
LAST, ALL = "last", "all"


def show_kept(
    record: PruneRecord,
    inputs: Mapping[str, Any],
    images: Sequence[Any] | None = None,
    *,
    model: nn.Module,
    videos: Sequence[Any] | None = None,
    processor: Any | None = None,
    stages: str | Sequence[str] = LAST,
    columns: int | None = None,
    label: str | None = None,
    questions: Sequence[str] | None = None,
) -> Image.Image:
    """The kept tokens of every item of ``record`` drawn on the pictures given to the processor.

    ``inputs`` are the processed inputs of the run that made the record, ``images`` / ``videos`` what was
    given to the processor (PIL or H x W x C arrays; a video as frames). ``stages``: ``"last"``, ``"all"``
    (one column per stage, e.g. "input", "layer 2": the per-layer view of decoder pruning) or a list of
    stage names. Kept regions are unchanged pixels; dropped ones are dimmed and hatched. Panels are laid
    out one stage per column unless ``columns`` says otherwise. ``label`` (e.g. the schedule) heads every
    panel's caption, and ``questions`` (one per batch row) are written under it.
    """
    pairs = _pairs(record, inputs, images, videos, model, processor)
    panels = kept_panels(pairs, images, videos, stages=stages, label=label, questions=questions)
    if columns is None and pairs:
        columns = len(_stage_names(pairs[0][0], stages))
    return grid(panels, columns=columns)


def kept_panels(
    pairs: Sequence[tuple[ImageRecord, ItemRegions]],
    images: Sequence[Any] | None,
    videos: Sequence[Any] | None,
    *,
    stages: str | Sequence[str] = LAST,
    label: str | None = None,
    questions: Sequence[str] | None = None,
) -> list[Panel]:
    """One panel per (item, view, stage), from :func:`vtprune.viz.match_records` pairs.

    ``label`` heads each title; ``questions[row]`` follows it, so a picture carries what was asked of it.
    """
    panels = []
    for item, regions in pairs:
        for view in regions.views:
            picture = _picture(regions, view, images, videos)
            for stage in _stage_names(item, stages):
                kept = _kept(item, stage)
                mask = torch.isin(view.tokens, kept)
                title = f"{label}\n" if label else ""
                title += f"{_wrap(questions[item.row])}\n" if questions is not None else ""
                title += f"{_name(item)} · {view.label}\n{stage}: kept {int(mask.sum())}/{view.tokens.numel()}"
                if regions.newlines.numel() and view is regions.views[-1]:
                    title += f", newlines {int(torch.isin(regions.newlines, kept).sum())}/{regions.newlines.numel()}"
                panels.append(Panel(title, draw_kept(picture, view.boxes, mask)))
    return panels


def show_scores(
    record: PruneRecord,
    inputs: Mapping[str, Any],
    images: Sequence[Any] | None = None,
    *,
    model: nn.Module,
    videos: Sequence[Any] | None = None,
    processor: Any | None = None,
    stage: str | None = None,
    strategy: str | None = None,
    questions: Sequence[str] | None = None,
) -> Image.Image:
    """Heat maps of the score a stage's strategy ranked each token by (needs ``prune(..., record_scores=True)``).

    ``stage`` defaults to the first stage that has scores. One colour scale per item, shown under it and labelled
    with what the score is for ``strategy`` (the stage's strategy name; see :data:`SCORE_MEANINGS`).
    ``questions`` (one per batch row) go into the captions.
    """
    pairs = _pairs(record, inputs, images, videos, model, processor)
    return grid(score_panels(pairs, images, videos, stage=stage, strategy=strategy, questions=questions))


def score_panels(
    pairs: Sequence[tuple[ImageRecord, ItemRegions]],
    images: Sequence[Any] | None,
    videos: Sequence[Any] | None,
    *,
    stage: str | None = None,
    strategy: str | None = None,
    questions: Sequence[str] | None = None,
) -> list[Panel]:
    """One heat-map panel per (item, view), with its colour bar labelled by :func:`score_meaning`."""
    panels = []
    for item, regions in pairs:
        name = stage or next(iter(item.scores_by_stage), None)
        if name not in item.scores_by_stage:
            known = ", ".join(item.scores_by_stage) or "none"
            raise ValueError(
                f"no scores for stage {name!r} of {_name(item)} (stages with scores: {known}); run with "
                "prune(..., record_scores=True) a strategy that has scores (not random, uniform or pooling)"
            )
        scores = item.scores_by_stage[name]
        finite = scores[torch.isfinite(scores)]
        low, high = (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 1.0)
        for view in regions.views:
            picture = _picture(regions, view, images, videos)
            heat = draw_scores(picture, view.boxes, scores[view.tokens], vmin=low, vmax=high)
            title = f"{_wrap(questions[item.row])}\n" if questions is not None else ""
            title += f"{_name(item)} · {view.label}\n{name}: {strategy or 'strategy'} scores"
            panels.append(Panel(title, heat, scale=(low, high), scale_label=score_meaning(strategy)))
    return panels


def compare(
    model: nn.Module,
    inputs: Mapping[str, Any],
    images: Sequence[Any] | None,
    schedules: Sequence[str],
    *,
    videos: Sequence[Any] | None = None,
    processor: Any | None = None,
    questions: Sequence[str] | None = None,
    **prune_options: Any,
) -> Image.Image:
    """The same inputs pruned by each of ``schedules`` (strategies or budgets), side by side, one column each.

    Runs one forward (a prefill) per schedule under ``vtprune.pruned(model, schedule, **prune_options)``.
    """
    regions = token_regions(model, inputs, images=images, videos=videos, processor=processor)
    columns: list[list[Panel]] = []
    for schedule in schedules:
        with torch.no_grad(), pruned(model, schedule, **prune_options) as handle:
            model(**inputs)
        record = handle.require_record()
        pairs = match_records(record, regions, inputs["input_ids"].shape[0])
        columns.append(kept_panels(pairs, images, videos, label=schedule, questions=questions))
    interleaved = [column[i] for i in range(len(columns[0])) for column in columns]
    return grid(interleaved, columns=len(schedules))


#: What each strategy's recorded score is (what the heat map's colours measure).
SCORE_MEANINGS = {
    "divprune": "cosine distance to the tokens picked before",
    "todre": "cosine distance to the tokens picked before",
    "mmtok": "coverage gain when picked",
    "zoo": "projector sensitivity (min-max normalised)",
    "fastv": "attention of the last prompt token",
}


def score_meaning(strategy: str | None) -> str:
    """The colour bar's label for ``strategy``'s scores (``"score"`` when unknown)."""
    meaning = SCORE_MEANINGS.get(strategy or "")
    return f"{strategy}: {meaning}" if meaning else "score"


def _wrap(text: str, width: int = 40) -> str:
    return "\n".join(textwrap.wrap(text, width)) or text


def _pairs(
    record: PruneRecord,
    inputs: Mapping[str, Any],
    images: Sequence[Any] | None,
    videos: Sequence[Any] | None,
    model: nn.Module,
    processor: Any | None,
) -> list[tuple[ImageRecord, ItemRegions]]:
    regions = token_regions(model, inputs, images=images, videos=videos, processor=processor)
    return match_records(record, regions, inputs["input_ids"].shape[0])


def _stage_names(item: ImageRecord, stages: str | Sequence[str]) -> list[str]:
    names = list(item.kept_by_stage) or ["unpruned"]
    if stages == LAST:
        return names[-1:]
    if stages == ALL:
        return names
    missing = [s for s in stages if s not in item.kept_by_stage]
    if missing:
        raise ValueError(f"stages {missing} are not in the record (it has {list(item.kept_by_stage)})")
    return list(stages)


def _kept(item: ImageRecord, stage: str) -> Tensor:
    kept = item.kept_by_stage.get(stage)
    return torch.arange(item.num_tokens) if kept is None else kept.cpu()


def _name(item: ImageRecord) -> str:
    return f"row {item.row} {item.modality} {item.index}"


def _picture(
    regions: ItemRegions, view: View, images: Sequence[Any] | None, videos: Sequence[Any] | None
) -> Image.Image:
    """The picture a view's boxes lie on: the item's image, or the view's frame of its video."""
    pictures = images if regions.modality == "image" else videos
    if pictures is None:
        raise ValueError(f"pass the {regions.modality}s given to the processor ({regions.modality}s=...) to draw on")
    picture = pictures[regions.index]
    if regions.modality == "video":
        picture = picture[min(view.frame, len(picture) - 1)]
    if not isinstance(picture, Image.Image):
        picture = Image.fromarray(np.asarray(picture, dtype=np.uint8))
    return picture.convert("RGB")
