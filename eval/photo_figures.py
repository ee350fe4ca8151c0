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

import vtprune
from vtprune import viz
from vtprune.adapters import ARCHITECTURES, architecture
from vtprune.testing import MID, build_model
from vtprune.viz.photos import sample_photos

SCHEDULES = ("divprune:64", "random:64", "fastv@2:64", "mmtok:64")
#: ``sample_photos()``'s files, in its order.
PHOTO_NAMES = ("china.jpg", "flower.jpg")
#: The classes whose family declares how a real photo goes in (``Architecture.photo``), in registry order.
PHOTO_KINDS = tuple(arch.model_type for arch in ARCHITECTURES if arch.photo is not None)


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
        kept[handle.require_record().images[0].kept.numpy()] = True
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
    parser.add_argument(
        "--models",
        nargs="+",
        choices=PHOTO_KINDS,
        default=list(PHOTO_KINDS),
        help="model types to draw (default: every class whose family declares how a photo goes in); the first one's "
        "tokens are also drawn in feature space",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    photos = sample_photos()
    out = Path(args.out)
    panels: list[viz.Panel] = []
    several_views: list[viz.Panel] = []  # AnyRes: two views per strategy (base tile, high-res grid), a picture apart
    for index, kind in enumerate(args.models):
        photo_spec = architecture(kind).photo
        assert photo_spec is not None  # --models choices
        photo = photos[photo_spec.sample]
        model = build_model(kind, MID)
        processor, inputs = photo_spec.inputs(model, photo)
        picture = viz.compare(model, inputs, [photo], list(SCHEDULES), processor=processor)
        views = viz.token_regions(model, inputs, images=[photo], processor=processor)[0].views
        (several_views if len(views) > 1 else panels).append(viz.Panel(f"{photo_spec.title} (RANDOM weights)", picture))
        if index == 0:
            name = PHOTO_NAMES[photo_spec.sample]
            title = f"{photo_spec.title}, RANDOM weights: projected tokens of {name}, kept (red) vs dropped"
            feature_space(model, inputs, SCHEDULES, title).savefig(out / "photo_feature_space.png", dpi=110)
    if several_views:
        viz.grid(several_views, height=600).save(out / "photo_kept_anyres.png")
    viz.grid(panels, columns=1, height=300).save(out / "photo_kept.png")
    print(f"-> {out}/photo_kept.png, {out}/photo_kept_anyres.png, {out}/photo_feature_space.png")


if __name__ == "__main__":
    main()
