"""Real photographs on random-weight full-size geometries: which tokens each strategy keeps, and where they sit in
feature space. Writes docs/photo_kept.png, docs/photo_kept_anyres.png and docs/photo_feature_space.png.

The photos are scikit-learn's two sample images (``sklearn.datasets.load_sample_images``: china.jpg and
flower.jpg, CC BY 2.0, attribution in README). The models have RANDOM weights (``vtprune.testing`` at the
LLaVA-1.5 geometry: CLIP 336 px, patch 14, 576 tokens; LLaVA-NeXT AnyRes on 336 px tiles; Qwen2.5-VL: patch 14, 2 × 2 merge, a dynamic grid from
the photo's own size): the pictures show the token -> region mapping and how a strategy spreads its picks over a
real image's features, not what a trained model would keep.

    python eval/photo_figures.py --threads 2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import vtprune
from vtprune import viz
from vtprune.testing import IMAGE, MID, VISION_END, VISION_START, build_model
from vtprune.viz.photos import llava_photo_inputs, sample_photos

SCHEDULES = ("divprune:64", "random:64", "fastv@2:64", "mmtok:64")


def next_inputs(model, photo: Image.Image):
    from transformers import LlavaNextImageProcessor

    processor = LlavaNextImageProcessor(
        image_grid_pinpoints=model.config.image_grid_pinpoints,
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
    )
    out = processor(images=[photo], return_tensors="pt")
    with torch.no_grad():  # AnyRes: base tile + high-res grid with row newlines, counted by the model itself
        count = len(model.model.get_image_features(**out).pooler_output[0])
    ids = [1, 7, 8] + [IMAGE] * count + [9, 10, 11]
    return processor, {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "pixel_values": out["pixel_values"],
        "image_sizes": out["image_sizes"],
    }


def qwen_inputs(model, photo: Image.Image):
    from transformers import Qwen2VLImageProcessor

    processor = Qwen2VLImageProcessor(min_pixels=200 * 28 * 28, max_pixels=320 * 28 * 28, patch_size=14)
    out = processor(images=[photo], return_tensors="pt")
    tokens = int(out["image_grid_thw"].prod()) // 4
    ids = torch.tensor([[7, 8, VISION_START] + [IMAGE] * tokens + [VISION_END, 9, 10, 11]])
    return processor, {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": out["pixel_values"],
        "image_grid_thw": out["image_grid_thw"],
        "mm_token_type_ids": (ids == IMAGE).long(),
    }


def feature_space(model, inputs, schedules, title: str):
    """PCA and t-SNE of the projected tokens of one LLaVA image, kept vs dropped, one column per strategy."""
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    with torch.no_grad():  # the projected tokens, what every strategy before the LLM selects from
        tokens = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]
    tokens = tokens.double().numpy()
    from threadpoolctl import threadpool_limits  # scikit-learn's own dependency

    threadpool_limits(torch.get_num_threads())  # sklearn is loaded now: t-SNE's OpenMP loops get --threads
    maps = {
        "PCA": PCA(n_components=2, random_state=0).fit_transform(tokens),
        "t-SNE": TSNE(n_components=2, random_state=0, init="pca", perplexity=30).fit_transform(tokens),
    }
    fig, axes = plt.subplots(2, len(schedules), figsize=(3 * len(schedules), 6), squeeze=False)
    for column, schedule in enumerate(schedules):
        with torch.no_grad(), vtprune.pruned(model, schedule) as handle:
            model(**inputs)
        kept = np.zeros(len(tokens), dtype=bool)
        kept[handle.last_record.images[0].kept.numpy()] = True
        for row, (name, xy) in enumerate(maps.items()):
            ax = axes[row, column]
            ax.scatter(xy[~kept, 0], xy[~kept, 1], s=4, c="lightgrey", label="dropped")
            ax.scatter(xy[kept, 0], xy[kept, 1], s=8, c="crimson", label="kept")
            ax.set_title(f"{schedule} · {name}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs", help="folder for the PNGs")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    china, flower = sample_photos()
    out = Path(args.out)
    panels = []
    runs = (
        ("llava", lambda model, photo: llava_photo_inputs(photo), china),
        ("llava_next", next_inputs, china),
        ("qwen2_5_vl", qwen_inputs, flower),
    )
    for kind, make, photo in runs:
        model = build_model(kind, MID)
        processor, inputs = make(model, photo)
        label = {
            "llava": "LLaVA-1.5 geometry, 576 tokens",
            "llava_next": "LLaVA-NeXT AnyRes geometry (base tile + high-res grid)",
            "qwen2_5_vl": "Qwen2.5-VL dynamic grid",
        }[kind]
        picture = viz.compare(model, inputs, [photo], list(SCHEDULES), processor=processor)
        if kind == "llava_next":  # two views per strategy (base tile, high-res grid): a picture of its own
            viz.grid([viz.Panel(f"{label} (RANDOM weights)", picture)], height=600).save(out / "photo_kept_anyres.png")
        else:
            panels.append(viz.Panel(f"{label} (RANDOM weights)", picture))
        if kind == "llava":
            title = f"{label}, RANDOM weights: projected tokens of china.jpg, kept (red) vs dropped"
            feature_space(model, inputs, SCHEDULES, title).savefig(out / "photo_feature_space.png", dpi=110)
    viz.grid(panels, columns=1, height=300).save(out / "photo_kept.png")
    print(f"-> {out}/photo_kept.png, {out}/photo_kept_anyres.png, {out}/photo_feature_space.png")


if __name__ == "__main__":
    main()
