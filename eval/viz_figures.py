"""The README's two Visualisation pictures, drawn by ``vtprune.viz`` on inputs that are the same on every machine.
Writes docs/viz_compare.png and docs/viz_anyres.png.

- ``viz_compare.png``: the shipped toy LLaVA, one test scene ("how many circles are there ?", answer three), every
  strategy at 8 of 144 tokens (9 for Matryoshka's nearest scale), one prefill each through ``viz.compare``.
- ``viz_anyres.png``: the tiny random-weight LLaVA-NeXT of ``vtprune.testing`` on two colour gradients (a wide and a
  tall AnyRes image, one per batch row), DivPrune at the input and FastV at layer 2, one column per stage.

Both are deterministic (a seeded model or the shipped weights, generated pictures, no sampling):
tests/integration/test_readme_figures.py redraws them and compares them with the committed files pixel for pixel.

    python eval/viz_figures.py
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from transformers import LlavaNextImageProcessorPil, PretrainedConfig

import vtprune
from vtprune import viz
from vtprune.adapters import anyres
from vtprune.testing import RowSpec, build_inputs, build_model, gradient
from vtprune.toyvlm import load_toy_model, make_split
from vtprune.toyvlm.data import TEST_SEED
from vtprune.toyvlm.model import prompt_inputs

COMPARE_SCHEDULES = ("random:8", "uniform:8", "matryoshka:9", "zoo:8", "divprune:8", "mmtok:8", "fastv@2:8")
#: The test scene of ``viz_compare.png``: ``make_split(TEST_SEED, 8)[2]``, the demo's third question.
COMPARE_SCENE = 2
ANYRES_SCHEDULE = "divprune:25%+fastv@2:50%"


def compare_figure() -> Image.Image:
    """Every strategy at 8 tokens on one toy scene, side by side."""
    model, processor = load_toy_model()
    sample = make_split(TEST_SEED, COMPARE_SCENE + 1)[COMPARE_SCENE]
    inputs = prompt_inputs(processor, [sample.image], [sample.question])
    return viz.compare(
        model,
        inputs,
        [sample.image],
        list(COMPARE_SCHEDULES),
        processor=processor,
        tokenizer=processor,
        questions=[sample.question],
    )


def anyres_figure() -> Image.Image:
    """LLaVA-NeXT's base tile and high-res grid (newlines counted) of two images, at the input and at layer 2."""
    model = build_model(anyres.ARCHITECTURES[0].model_type)  # the AnyRes family's first class: LLaVA-NeXT
    config = model.config
    assert isinstance(config, PretrainedConfig)
    processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 16},
        crop_size={"height": 16, "width": 16},
        image_grid_pinpoints=config.image_grid_pinpoints,
    )
    images = [gradient(16, 32, 60), gradient(32, 16, 180)]
    inputs = build_inputs(model, [RowSpec(images=[(1, 2)]), RowSpec(images=[(2, 1)], text_before=1)])
    inputs.update(processor(images=images, return_tensors="pt"))  # the same shapes, real pixels instead of noise
    with torch.no_grad(), vtprune.pruned(model, ANYRES_SCHEDULE) as handle:
        model(**inputs)
    record = handle.require_record()
    return viz.show_kept(record, inputs, images, model=model, stages="all", label=ANYRES_SCHEDULE)


#: File name in docs/ -> what draws it.
FIGURES: dict[str, Callable[[], Image.Image]] = {"viz_compare.png": compare_figure, "viz_anyres.png": anyres_figure}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs", help="folder for the PNGs")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name, draw in FIGURES.items():
        draw().save(Path(args.out) / name)
        print(f"-> {args.out}/{name}")


if __name__ == "__main__":
    main()
