"""vtprune.viz: every token maps to the region it was computed from, for every family; drawings render headless.

Ground truth comes from the model itself: a copy of each tiny model whose vision encoder outputs, for
every visual token, the mean colour of the pixels that token read (patch embedding = channel mean,
vision blocks and position embeddings zeroed, projector / merger replaced by "take the colour"). The
model's own code then orders, unpads, downscales, pools and merges the tokens. The pictures are colour
gradients (red along x, green along y, blue per image or frame), so a token's colour says where on which
picture its pixels were: it must lie at the centre of the box ``token_regions`` gives that token.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from transformers import (
    CLIPImageProcessorPil,
    LlavaImageProcessorPil,
    LlavaNextImageProcessorPil,
    LlavaOnevisionImageProcessorPil,
    Qwen2VLImageProcessorPil,
)

import vtprune
from vtprune import viz
from vtprune.testing import MODEL_KINDS, RowSpec, build_inputs, gradient

QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


class TakeColour(nn.Module):
    """Stands in for a projector / merger: the mean colour channels of the ``rows`` rows it merges, widened."""

    def __init__(self, width: int, rows: int = 1) -> None:
        super().__init__()
        self.width, self.rows = width, rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        colour = x[..., :3] if self.rows == 1 else x.reshape(-1, self.rows, x.shape[-1])[..., :3].mean(1)
        return nn.functional.pad(colour, (0, self.width - 3))


def colour_probe(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose visual tokens are the mean (normalised) colour of the pixels each one read."""
    probe = copy.deepcopy(model)
    inner, hidden = probe.model, probe.config.text_config.hidden_size
    if hasattr(inner, "vision_tower"):  # CLIP tower + projector (LLaVA family)
        tower = inner.vision_tower
        patch = tower.embeddings.patch_embedding
        tower.embeddings.class_embedding.data.zero_()
        tower.embeddings.position_embedding.weight.data.zero_()
        tower.pre_layrnorm = nn.Identity()
        blocks = tower.encoder.layers
        inner.multi_modal_projector = TakeColour(hidden)
    else:  # Qwen vision transformer + merger
        visual = inner.visual
        patch = visual.patch_embed.proj
        if hasattr(visual, "pos_embed"):
            visual.pos_embed.weight.data.zero_()
        blocks = visual.blocks
        visual.merger = TakeColour(hidden, rows=probe.config.vision_config.spatial_merge_size**2)
    pass_colours(patch, blocks)
    return probe


class ShuffledColour(nn.Module):
    """Stands in for InternVL's projector: the mean colour channels of the patches pixel-shuffled into a token."""

    def __init__(self, width: int, patches: int = 4) -> None:
        super().__init__()
        self.width, self.patches = width, patches

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        colour = x.reshape(*x.shape[:-1], self.patches, -1)[..., :3].mean(-2)
        return nn.functional.pad(colour, (0, self.width - 3))


def square_colour_probe(model: nn.Module) -> nn.Module:
    """``colour_probe`` for the square-grid families: InternVL (pixel shuffle, then the stand-in projector) and
    Gemma 3 (the model's own average pooling, its norm and projection made colour-preserving)."""
    probe = copy.deepcopy(model)
    inner, hidden = probe.model, probe.config.text_config.hidden_size
    tower = inner.vision_tower
    embeddings = tower.embeddings
    if hasattr(embeddings, "cls_token"):  # InternVL
        embeddings.cls_token.data.zero_()
        embeddings.position_embeddings.data.zero_()
        patch, blocks = embeddings.patch_embeddings.projection, tower.encoder.layer
        inner.multi_modal_projector = ShuffledColour(hidden)
    else:  # Gemma 3's SigLIP
        embeddings.position_embedding.weight.data.zero_()
        tower.post_layernorm = nn.Identity()
        patch, blocks = embeddings.patch_embedding, tower.encoder.layers
        projector = inner.multi_modal_projector
        projector.mm_soft_emb_norm = nn.Identity()
        projector.mm_input_projection_weight.data = torch.eye(*projector.mm_input_projection_weight.shape)
    pass_colours(patch, blocks)
    return probe


def pass_colours(patch: nn.Module, blocks: nn.ModuleList) -> None:
    """Patch embedding = the patch's mean colour channels, and every residual branch of ``blocks`` zeroed, so each
    patch keeps its own embedding through the tower."""
    with torch.no_grad():
        patch.weight.zero_()
        for c in range(3):
            patch.weight[c, c] = 1 / patch.weight[c, c].numel()
        if patch.bias is not None:
            patch.bias.zero_()
        for block in blocks:
            for name, module in block.named_modules():
                if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in {
                    "out_proj",
                    "fc2",
                    "proj",
                    "down_proj",
                    "linear_fc2",
                    "projection_layer",
                }:
                    module.weight.zero_()
                    if module.bias is not None:
                        module.bias.zero_()


def token_colours(probe: nn.Module, inputs: dict, modality: str, image_processor) -> list[torch.Tensor]:
    """(N, 3) colour in 0..255 of every token of every item, as the probe model produces them."""
    names = {
        "image": ("pixel_values", "image_sizes", "batch_num_images", "image_grid_thw"),
        "video": ("pixel_values_videos", "video_grid_thw"),
    }[modality]
    kwargs = {name: inputs[name] for name in names if name in inputs}
    method = probe.model.get_image_features if modality == "image" else probe.model.get_video_features
    with torch.no_grad():
        output = method(**kwargs).pooler_output
    mean, std = torch.tensor(image_processor.image_mean), torch.tensor(image_processor.image_std)
    return [(tokens[:, :3].float() * std + mean) * 255 for tokens in output]


def assert_regions_match(regions: viz.ItemRegions, colours: torch.Tensor, blues: list[float], min_checked: float = 0.9):
    """Each token's colour (where its pixels were, and on which picture) is at the centre of its box."""
    assert colours.shape[0] == regions.num_tokens
    height, width = regions.size
    frames = regions.frames()
    checked = 0
    for view in regions.views:
        boxes = view.boxes
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        full = area >= 0.999 * area.max()  # boxes cut by the picture's edge include padding pixels
        colour = colours[view.tokens].double()
        at = torch.stack([colour[:, 0] * width / 255, colour[:, 1] * height / 255], -1)
        centre = torch.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], -1)
        size = torch.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], -1)
        error = (at - centre).abs()
        assert bool((error[full] <= 0.15 * size[full] + 0.6).all()), f"{view.label}: max error {error[full].max()}"
        blue = torch.tensor([blues[f] for f in frames[view.tokens].tolist()], dtype=torch.float64)
        assert bool(((colour[:, 2] - blue)[full].abs() < 4).all()), f"{view.label}: tokens from the wrong picture"
        checked += int(full.sum())
    assert checked >= min_checked * (regions.num_tokens - regions.newlines.numel())


# --- the mapping is exact, per family -----------------------------------------------------------------


@pytest.mark.parametrize("pad", [False, True])
def test_llava_tokens_map_to_their_patches(models, pad):
    model = models("llava")
    settings = {"size": {"shortest_edge": 16}, "crop_size": {"height": 16, "width": 16}}
    processor = LlavaImageProcessorPil(do_pad=True, **settings) if pad else CLIPImageProcessorPil(**settings)
    images = [gradient(32, 48, 60), gradient(16, 16, 180), gradient(40, 24, 120)]
    inputs = processor(images=images, return_tensors="pt")
    regions = viz.token_regions(model, inputs, images=images, processor=processor)
    colours = token_colours(colour_probe(model), inputs, "image", processor)
    assert [r.size for r in regions] == [(32, 48), (16, 16), (40, 24)]
    for item, colour, blue in zip(regions, colours, (60, 180, 120), strict=True):
        # Padding to a square shows the whole image (padded tokens have empty boxes); the centre crop cuts it.
        assert_regions_match(item, colour, [blue], min_checked=0.5 if pad else 0.9)
    crop_x = regions[0].boxes()[:, 0::2]
    assert (float(crop_x.min()), float(crop_x.max())) == ((0.0, 48.0) if pad else (8.0, 40.0))


def test_llava_next_base_tile_high_res_grid_and_newlines(models):
    model = models("llava_next")
    processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 16},
        crop_size={"height": 16, "width": 16},
        image_grid_pinpoints=model.config.image_grid_pinpoints,
    )
    images = [gradient(16, 32, 60), gradient(32, 24, 180)]  # the second is padded at the sides, then unpadded
    inputs = processor(images=images, return_tensors="pt")
    regions = viz.token_regions(model, inputs)
    colours = token_colours(colour_probe(model), inputs, "image", processor)
    for item, colour, blue in zip(regions, colours, (60, 180), strict=True):
        assert [v.label for v in item.views] == ["base tile", "high-res"]
        assert_regions_match(item, colour, [blue])
        # Newline tokens carry the learned vector, not a colour, and have no box.
        assert torch.equal(colour[item.newlines], token_newline(model, processor).expand(item.newlines.numel(), 3))
        assert torch.isnan(item.boxes()[item.newlines]).all()
    assert regions[0].newlines.numel() == 4 and regions[0].views[1].tokens.numel() == 4 * 8  # 4 rows of 8
    assert regions[1].newlines.numel() == 8 and regions[1].views[1].tokens.numel() == 8 * 6  # unpadded to 6 wide


def test_onevision_tiles_multi_image_rows_and_video(models):
    model = models("llava_onevision")
    processor = LlavaOnevisionImageProcessorPil(
        size={"height": 16, "width": 16}, image_grid_pinpoints=model.config.image_grid_pinpoints
    )
    # Row 2 has two images: each is padded to a square (by one cell at each side) and not tiled.
    images = [[gradient(16, 32, 60)], [gradient(32, 16, 180), gradient(24, 12, 120)]]
    inputs = processor(images=images, return_tensors="pt")
    assert inputs["batch_num_images"].tolist() == [1, 2]
    frames = [gradient(16, 16, 30 + 50 * f) for f in range(4)]
    inputs["pixel_values_videos"] = processor(images=frames, return_tensors="pt")["pixel_values"][None, :, 0]
    regions = viz.token_regions(model, inputs, videos=[frames])
    probe = colour_probe(model)
    image_colours = token_colours(probe, inputs, "image", processor)
    assert [len(r.views) for r in regions[:3]] == [2, 1, 1] and regions[3].modality == "video"
    images_only = regions[:3]  # the video (regions[3]) is checked below
    for item, colour, blue, shown in zip(images_only, image_colours, (60, 180, 120), (0.9, 0.5, 0.5), strict=True):
        assert_regions_match(item, colour, [blue], min_checked=shown)
    (video_colours,) = token_colours(probe, inputs, "video", processor)
    video = regions[3]
    assert [v.label for v in video.views] == [f"frame {f}" for f in range(4)] and video.newlines.tolist() == [16]
    assert_regions_match(video, video_colours, [30 + 50 * f for f in range(4)])  # pooled 2x2: 8 px boxes


def test_onevision_downscaled_grid_follows_the_model(models):
    # anyres_max_9: a grid larger than 9 tiles' worth is bilinearly resized; each token stands for an s x s block.
    model = copy.deepcopy(models("llava_onevision"))
    model.config.image_grid_pinpoints = [[64, 64]]
    processor = LlavaOnevisionImageProcessorPil(size={"height": 16, "width": 16}, image_grid_pinpoints=[[64, 64]])
    images = [gradient(64, 64, 90)]
    inputs = processor(images=images, return_tensors="pt")
    (regions,) = viz.token_regions(model, inputs)
    (colours,) = token_colours(colour_probe(model), inputs, "image", processor)
    high_res = regions.views[1]
    assert high_res.tokens.numel() == 12 * 12  # 16 x 16 cells downscaled by ratio sqrt(256 / 144)
    widths = high_res.boxes[:, 2] - high_res.boxes[:, 0]
    assert torch.allclose(widths, torch.full_like(widths, 64 / 12), atol=1e-6)  # every token a 5.33 px block
    assert_regions_match(regions, colours, [90])


@pytest.mark.parametrize("kind", QWEN)
def test_qwen_merged_tokens_images_and_video(models, kind):
    model = models(kind)
    vision = model.config.vision_config
    factor = vision.patch_size * vision.spatial_merge_size
    processor = Qwen2VLImageProcessorPil(
        patch_size=vision.patch_size,
        merge_size=vision.spatial_merge_size,
        temporal_patch_size=vision.temporal_patch_size,
        size={"shortest_edge": factor * factor, "longest_edge": 64 * 64 * 16},
    )
    images = [gradient(24, 40, 60), gradient(30, 50, 180)]  # the second is smart-resized to 32 x 48
    inputs = processor(images=images, return_tensors="pt")
    frames = [gradient(16, 24, 30 + 50 * f) for f in range(4)]
    inputs.update(qwen_video(frames, processor))
    regions = viz.token_regions(model, inputs, images=images, videos=[frames])
    probe = colour_probe(model)
    assert len(regions) == 3  # two images, then the video (checked below)
    image_colours = token_colours(probe, inputs, "image", processor)
    for item, colour, blue in zip(regions[:2], image_colours, (60, 180), strict=True):
        assert_regions_match(item, colour, [blue])
    assert regions[1].size == (30, 50) and regions[1].num_tokens == 4 * 6
    (video_colours,) = token_colours(probe, inputs, "video", processor)
    video = regions[2]
    assert [v.label for v in video.views] == ["frames 0-1", "frames 2-3"]
    # A token covers two frames: its blue is their mean.
    assert_regions_match(video, video_colours, [55, 55, 155, 155])


def token_newline(model: nn.Module, image_processor) -> torch.Tensor:
    """The newline vector's first channels, read as a colour the way ``token_colours`` reads tokens."""
    mean, std = torch.tensor(image_processor.image_mean), torch.tensor(image_processor.image_std)
    return (model.model.image_newline[:3].detach().float() * std + mean) * 255


def qwen_video(frames: list[Image.Image], processor) -> dict:
    """``pixel_values_videos`` laid out as Qwen's video processor does (it needs torchvision, not installed here)."""
    video = torch.stack([torch.from_numpy(np.array(f)).permute(2, 0, 1).float() / 255 for f in frames])
    mean, std = torch.tensor(processor.image_mean)[:, None, None], torch.tensor(processor.image_std)[:, None, None]
    video = (video - mean) / std
    p, m, t = processor.patch_size, processor.merge_size, processor.temporal_patch_size
    frames_, channels, height, width = video.shape
    grid = (frames_ // t, height // p, width // p)
    patches = video.view(grid[0], t, channels, grid[1] // m, m, p, grid[2] // m, m, p)
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(grid[0] * grid[1] * grid[2], -1)
    return {"pixel_values_videos": patches, "video_grid_thw": torch.tensor([grid])}


# --- per-token scores ------------------------------------------------------------------------------


def test_scores_rank_like_the_selection():
    torch.manual_seed(0)
    projector = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16))
    pre = torch.randn(40, 8)
    with torch.no_grad():
        features = projector(pre)
    inputs = {"text_embeds": torch.randn(5, 16), "pre_features": pre, "projector": projector}
    for name in ("divprune", "todre", "mmtok"):
        # Greedy gains never grow along the pick order, so the k best scores are the k picks.
        scores = vtprune.scores(name, features, **inputs)
        kept = vtprune.select(name, features, keep=10, **inputs)
        assert scores.shape == (40,) and torch.isfinite(scores).all()
        assert set(scores.topk(10).indices.tolist()) == set(kept.tolist()), name
    zoo = vtprune.scores("zoo", features, directions=8, **inputs)
    assert float(zoo.min()) == 0.0 and float(zoo.max()) == 1.0
    assert int(zoo.argmax()) in vtprune.select("zoo", features, keep=5, directions=8, **inputs).tolist()
    attention = torch.rand(40)
    assert torch.equal(vtprune.scores("fastv", features, attention=attention), attention)
    for name in ("random", "uniform", "none"):
        assert vtprune.scores(name, features) is None
    newline = torch.zeros(40, dtype=torch.bool)
    newline[[9, 19]] = True
    dropped = vtprune.scores("divprune", features, newline=newline, newlines="drop")
    assert torch.isnan(dropped[[9, 19]]).all() and torch.isfinite(dropped[~newline]).all()


def test_record_scores_leave_the_selection_alone(models, make_inputs):
    model = models("llava_next")
    inputs = make_inputs(model, "llava_next", 3)
    schedule = "divprune:50%+fastv@2:50%"
    records = []
    for record_scores in (False, True):
        with torch.no_grad(), vtprune.pruned(model, schedule, record_scores=record_scores) as handle:
            model(**inputs)
        records.append(handle.last_record)
    plain, scored = records
    assert len(plain.images) == 3  # the probes below ran: row 0's image and row 1's two (row 2 is text only)
    for a, b in zip(plain.images, scored.images, strict=True):
        assert a.kept_by_stage.keys() == b.kept_by_stage.keys()
        assert all(torch.equal(a.kept_by_stage[s], b.kept_by_stage[s]) for s in a.kept_by_stage)
        assert not a.scores_by_stage and list(b.scores_by_stage) == ["input", "layer 2"]
        first, second = b.scores_by_stage["input"], b.scores_by_stage["layer 2"]
        kept = b.kept_by_stage["input"]
        assert torch.isfinite(first).all() and set(first.topk(kept.numel()).indices.tolist()) == set(kept.tolist())
        # Inside the decoder the strategy only saw what the input stage kept.
        assert torch.isfinite(second).nonzero()[:, 0].tolist() == kept.tolist()
        best = kept[second[kept].topk(b.kept_by_stage["layer 2"].numel()).indices]
        assert set(best.tolist()) == set(b.kept_by_stage["layer 2"].tolist())


# --- drawings ---------------------------------------------------------------------------------------


def assert_drawn(panel_image: Image.Image, picture: Image.Image, view: viz.View, kept: torch.Tensor):
    """Kept boxes show the picture's own pixels; every other pixel is dimmed (hatching only darkens)."""
    drawn, original = np.asarray(panel_image).astype(int), np.asarray(picture.convert("RGB")).astype(int)
    assert drawn.shape == original.shape
    mask = np.zeros(original.shape[:2], dtype=bool)
    for x0, y0, x1, y1 in view.boxes[torch.isin(view.tokens, kept)].round().long().tolist():
        mask[y0:y1, x0:x1] = True
    assert mask.any() and not mask.all()
    assert (drawn[mask] == original[mask]).all()
    assert (drawn[~mask] <= np.floor(original[~mask] * viz.draw.DIM) + 1).all()
    assert (drawn[~mask] < original[~mask]).any()


@pytest.mark.parametrize(("kind", "original"), [("internvl", None), ("gemma3", (24, 40)), ("gemma3", (40, 24))])
def test_square_grid_tokens_map_to_their_patches(models, kind, original):
    """InternVL tiles and Gemma 3 images: token (r, c) of the raster covers its 2 x 2 patches (pixel shuffle) or
    pooled block; Gemma 3's boxes stretch back onto the original picture the processor resized."""
    model = models(kind)
    side = model.config.vision_config.image_size
    side = side if isinstance(side, int) else side[0]
    pictures = [gradient(*(original or (side, side)), blue) for blue in (60, 180)]
    resized = [np.asarray(picture.resize((side, side), Image.BILINEAR)) for picture in pictures]
    inputs = {"pixel_values": torch.stack([torch.from_numpy(r).permute(2, 0, 1).float() / 127.5 - 1 for r in resized])}
    processor = SimpleNamespace(image_mean=[0.5] * 3, image_std=[0.5] * 3)  # the normalisation just used
    colours = token_colours(square_colour_probe(model), inputs, "image", processor)
    regions = viz.token_regions(model, inputs, images=pictures if original else None)
    assert len(regions) == len(colours) == 2
    for item, colour, blue in zip(regions, colours, (60, 180), strict=True):
        assert item.size == (original or (side, side))
        assert_regions_match(item, colour, [blue])


def test_more_square_images_than_pictures_is_refused_by_name(models):
    """Gemma 3's pan-and-scan crops are extra square images: sizes of the pictures alone cannot be matched to them."""
    model = models("gemma3")
    side = model.config.vision_config.image_size
    inputs = {"pixel_values": torch.zeros(3, 3, side, side)}
    with pytest.raises(vtprune.VTPruneError, match="images"):
        viz.token_regions(model, inputs, images=[gradient(24, 40, 60)])


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_every_family_draws_its_kept_tokens(models, make_inputs, kind):
    """Every family of the registry maps a pruned batch's tokens to regions: boxes inside their picture, none
    overlapping another of its view, and a panel per view that shows the kept boxes and dims the rest."""
    model = models(kind)
    inputs = make_inputs(model, kind, 3)
    with torch.no_grad(), vtprune.pruned(model, "random:50%") as handle:
        model(**inputs)
    regions = viz.token_regions(model, inputs)
    pairs = viz.match_records(handle.last_record, regions, inputs["input_ids"].shape[0])
    assert len(pairs) == len(handle.last_record.images) > 0
    pictures = {
        (r.modality, r.index): gradient(*r.size, 60) if r.modality == "image" else [gradient(*r.size, 180)] * 8
        for r in regions
    }
    images = [pictures[("image", i)] for i in range(sum(r.modality == "image" for r in regions))]
    videos = [pictures[("video", i)] for i in range(sum(r.modality == "video" for r in regions))]
    drawn = 0
    for item, region in pairs:
        height, width = region.size
        for view in region.views:
            x0, y0, x1, y1 = view.boxes.unbind(-1)
            assert bool(((x0 >= 0) & (y0 >= 0) & (x1 <= width) & (y1 <= height) & (x1 > x0) & (y1 > y0)).all())
            overlap_w = (torch.minimum(x1[:, None], x1[None]) - torch.maximum(x0[:, None], x0[None])).clamp(min=0)
            overlap_h = (torch.minimum(y1[:, None], y1[None]) - torch.maximum(y0[:, None], y0[None])).clamp(min=0)
            overlap = (overlap_w * overlap_h).fill_diagonal_(0)
            assert float(overlap.max()) < 1e-6, f"{kind} {view.label}: boxes overlap"
        for view, panel in zip(region.views, viz.kept_panels([(item, region)], images, videos), strict=True):
            kept = torch.isin(view.tokens, item.kept)
            if kept.any() and not kept.all():
                picture = pictures[(region.modality, region.index)]
                assert_drawn(panel.image, picture if region.modality == "image" else picture[0], view, item.kept)
                drawn += 1
    assert drawn > 0


def test_show_kept_anyres_batch(models):
    model = models("llava_next")
    processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 16},
        crop_size={"height": 16, "width": 16},
        image_grid_pinpoints=model.config.image_grid_pinpoints,
    )
    images = [gradient(16, 32, 60), gradient(32, 16, 180)]
    inputs = build_inputs(model, [RowSpec(images=[(1, 2)]), RowSpec(images=[(2, 1)], text_before=1)])
    inputs.update(processor(images=images, return_tensors="pt"))  # same shapes: real pixels instead of noise
    with torch.no_grad(), vtprune.pruned(model, "divprune:25%") as handle:
        model(**inputs)
    pairs = viz.match_records(handle.last_record, viz.token_regions(model, inputs), batch_size=2)
    panels = viz.kept_panels(pairs, images, None)
    assert [p.title.split("\n")[0] for p in panels] == [
        "row 0 image 0 · base tile",
        "row 0 image 0 · high-res",
        "row 1 image 0 · base tile",
        "row 1 image 0 · high-res",
    ]
    assert "newlines" in panels[1].title and "newlines" not in panels[0].title
    for (item, regions), views in zip(pairs, (panels[:2], panels[2:]), strict=True):
        for view, panel in zip(regions.views, views, strict=True):
            assert_drawn(panel.image, images[regions.index], view, item.kept)
    sheet = viz.show_kept(handle.last_record, inputs, images, model=model)
    assert sheet.mode == "RGB" and sheet.height > 2 * 192 and sheet.width > 2 * 192


def test_show_kept_qwen_image_and_video_with_heat_map(models):
    model = models("qwen2_vl")
    vision = model.config.vision_config
    processor = Qwen2VLImageProcessorPil(
        patch_size=vision.patch_size,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": 64, "longest_edge": 4096},
    )
    images, frames = [gradient(16, 24, 60)], [gradient(16, 16, 30 + 50 * f) for f in range(4)]
    inputs = build_inputs(model, [RowSpec(images=[(2, 3)], videos=1)])
    inputs.update(processor(images=images, return_tensors="pt"))
    inputs.update(qwen_video(frames, processor))
    with torch.no_grad(), vtprune.pruned(model, "divprune:50%", record_scores=True) as handle:
        model(**inputs)
    pairs = viz.match_records(handle.last_record, viz.token_regions(model, inputs, images=images, videos=[frames]), 1)
    panels = viz.kept_panels(pairs, images, [frames])
    assert [p.title.split("\n")[0] for p in panels] == [
        "row 0 image 0 · image",
        "row 0 video 0 · frames 0-1",
        "row 0 video 0 · frames 2-3",
    ]
    (image, image_regions), (video, video_regions) = pairs
    assert_drawn(panels[0].image, images[0], image_regions.views[0], image.kept)
    for view, panel in zip(video_regions.views, panels[1:], strict=True):
        assert_drawn(panel.image, frames[view.frame], view, video.kept)
    heat = viz.score_panels(pairs, images, [frames])
    assert len(heat) == 3 and heat[0].scale is not None
    # The best-scored token is painted with the top colour of the map.
    view = image_regions.views[0]
    scores = image.scores_by_stage["input"][view.tokens]
    x0, y0, x1, y1 = view.boxes[int(scores.argmax())].round().long().tolist()
    top = viz.draw.colormap(torch.ones(1))[0]
    drawn = np.asarray(heat[0].image)[y0:y1, x0:x1].astype(float)
    expected = 0.3 * np.asarray(images[0])[y0:y1, x0:x1] + 0.7 * top
    assert np.abs(drawn - expected).max() <= 1
    sheet = viz.show_scores(handle.last_record, inputs, images, model=model, videos=[frames])
    assert sheet.height > 192


def test_per_layer_columns_and_compare(models):
    model = models("llava")
    processor = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    images = [gradient(16, 16, 60)]
    inputs = build_inputs(model, [RowSpec(images=[(1, 1)])])
    inputs.update(processor(images=images, return_tensors="pt"))
    with torch.no_grad(), vtprune.pruned(model, "divprune:50%+fastv@2:50%") as handle:
        model(**inputs)
    pairs = viz.match_records(handle.last_record, viz.token_regions(model, inputs, images=images), 1)
    panels = viz.kept_panels(pairs, images, None, stages="all")
    assert [p.title.split("\n")[1] for p in panels] == ["input: kept 8/16", "layer 2: kept 4/16"]
    for panel, stage in zip(panels, ("input", "layer 2"), strict=True):
        assert_drawn(panel.image, images[0], pairs[0][1].views[0], pairs[0][0].kept_by_stage[stage])
    with pytest.raises(ValueError, match="not in the record"):
        viz.kept_panels(pairs, images, None, stages=["layer 5"])
    sheet = viz.compare(model, inputs, images, ["divprune:25%", "uniform:25%", "random:50%"], processor=processor)
    single = viz.show_kept(handle.last_record, inputs, images, model=model, processor=processor)
    assert sheet.width > 2.5 * single.width and sheet.height == single.height + 16  # + the schedule line
    import matplotlib  # the viz extra (in the dev install); everything else here needs PIL only

    matplotlib.use("Agg")
    figure = viz.figure(panels, columns=2)
    assert len([ax for ax in figure.axes if ax.images]) == 2
    figure.clear()


def test_beam_expanded_rows_map_to_their_images(models):
    model = models("llava")
    processor = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    images = [gradient(16, 16, 60), gradient(16, 16, 120), gradient(16, 16, 180)]
    inputs = build_inputs(model, [RowSpec(images=[(1, 1)]), RowSpec(images=[(1, 1), (1, 1)], text_before=1)])
    inputs.update(processor(images=images, return_tensors="pt"))
    with torch.no_grad(), vtprune.pruned(model, "divprune:25%") as handle:
        model.generate(**inputs, max_new_tokens=2, num_beams=2, do_sample=False)
    pairs = viz.match_records(handle.last_record, viz.token_regions(model, inputs, images=images), 2)
    assert [(item.row, regions.index) for item, regions in pairs] == [(0, 0), (1, 0), (2, 1), (2, 2), (3, 1), (3, 2)]
    with pytest.raises(vtprune.VTPruneError, match="no matching region"):
        viz.match_records(handle.last_record, viz.token_regions(model, inputs, images=images)[:1], 2)


def test_cli_viz_writes_a_png(tmp_path, capsys):
    from vtprune.cli import main
    from vtprune.toyvlm.model import build_model as build_toy
    from vtprune.toyvlm.model import build_processor

    processor = build_processor()
    model = build_toy(processor, sizes={"vision_hidden": 16, "text_hidden": 32, "text_layers": 2, "heads": 2})
    model.save_pretrained(tmp_path / "toy")
    processor.save_pretrained(tmp_path / "toy")
    gradient(96, 128, 90).save(tmp_path / "input.png")
    main(
        [
            "viz",
            "--model",
            str(tmp_path / "toy"),
            "--out",
            str(tmp_path / "generated.png"),
            "--schedule",
            "divprune:25%",
        ]
    )
    main(
        [
            "viz",
            "--model",
            str(tmp_path / "toy"),
            "--image",
            str(tmp_path / "input.png"),
            "--question",
            "what colour ?",
            "--schedule",
            "divprune:25%+fastv@1:50%",
            "--out",
            str(tmp_path / "kept.png"),
            "--heatmap",
            str(tmp_path / "heat.png"),
        ]
    )
    output = capsys.readouterr().out
    assert "36/144" in output and "18/144" in output
    for name in ("generated.png", "kept.png", "heat.png"):
        with Image.open(tmp_path / name) as picture:
            assert picture.format == "PNG" and picture.width > 192
    with Image.open(tmp_path / "kept.png") as picture, Image.open(tmp_path / "generated.png") as single:
        assert picture.width > 1.5 * single.width  # two stages: two columns


@pytest.mark.parametrize("content", [None, b"not an image"], ids=["missing", "unreadable"])
def test_cli_viz_names_an_image_it_cannot_read(tmp_path, content):
    from vtprune.cli import main

    image = tmp_path / "photo.png"
    if content is not None:
        image.write_bytes(content)
    with pytest.raises(SystemExit, match=f"vtprune viz: cannot read --image {image}"):
        main(["viz", "--image", str(image), "--out", str(tmp_path / "kept.png")])


def test_panels_are_framed_and_colour_bars_say_what_the_score_is():
    from vtprune.viz.draw import FRAME, Panel
    from vtprune.viz.show import score_meaning

    white = Image.new("RGB", (12, 12), "white")  # a kept cell on the edge is as white as the page
    label = score_meaning("divprune")
    assert label == "divprune: cosine distance to the tokens picked before" and score_meaning("random") == "score"
    sheet = viz.grid([Panel("kept", white), Panel("heat", white, scale=(0.0, 1.0), scale_label=label)], height=12)
    pixels = np.asarray(sheet)
    framed = np.all(pixels == FRAME, axis=-1)
    assert framed.sum() >= 2 * 4 * 12  # a frame of at least one pixel around each picture
    assert sheet.width >= viz.draw._text_width(label, viz.draw._font(10))  # the label is not cut off


def test_photo_patches_come_row_by_row_from_the_centre_square():
    from vtprune.viz.photos import photo_patches

    side, patch = 3, 4
    square = np.zeros((side * patch, side * patch, 3), dtype=np.uint8)
    for row in range(side):
        for column in range(side):  # each patch one flat colour that names its grid cell
            square[row * patch : (row + 1) * patch, column * patch : (column + 1) * patch] = (10 * row, 10 * column, 7)
    wide = np.full((side * patch, side * patch + 6, 3), 255, dtype=np.uint8)  # white margins left and right
    wide[:, 3:-3] = square
    patches = photo_patches(Image.fromarray(wide), count=8, patch=patch)  # 8 of the 3 x 3 grid
    assert patches.shape == (8, 3 * patch * patch)
    expected = torch.tensor([[10 * (i // side), 10 * (i % side), 7] for i in range(8)]) / 255
    assert torch.allclose(patches.view(8, patch * patch, 3), expected[:, None, :].expand(8, patch * patch, 3))
