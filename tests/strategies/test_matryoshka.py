"""Matryoshka pooling inside the models: the LLM receives M3's pooled tokens at their windows' places."""

import pytest
import torch

import vtprune
from vtprune.strategies import Matryoshka
from vtprune.strategies.base import TokenContext
from vtprune.strategies.pooling import pool_grid
from vtprune.testing import IMAGE, RowSpec, build_inputs
from vtprune.vocabulary.grids import Segment


def llm_inputs(model, inputs, schedule):
    """The embeddings and position ids the text model receives under ``schedule``."""
    seen = {}

    def capture(module, args, kwargs):
        seen.update(embeds=kwargs["inputs_embeds"], positions=kwargs["position_ids"], mask=kwargs["attention_mask"])

    hook = model.model.language_model.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad(), vtprune.pruned(model, schedule) as handle:
            model(**inputs)
    finally:
        hook.remove()
    return seen, handle.last_record


def test_llava_gets_m3_pooled_tokens_at_window_positions(models):
    model = models("llava")  # a 4 x 4 grid of 16 tokens per image
    inputs = build_inputs(model, [RowSpec(images=[(1, 1)]), RowSpec(images=[(1, 1)], text_before=2)])
    seen, record = llm_inputs(model, inputs, "matryoshka:4")
    with torch.no_grad():
        tokens = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    assert len(record.images) == 2  # the probes below ran
    for row, image in enumerate(record.images):
        assert image.kept.tolist() == [0, 2, 8, 10]  # top-left tokens of the 2 x 2 windows
        expected, _ = pool_grid(tokens[row], (4, 4), 4)
        slots = (seen["mask"][row] == 1).nonzero()[:, 0]
        columns = (inputs["input_ids"][row] == IMAGE).nonzero()[:, 0]
        after = inputs["input_ids"].shape[1] - 1 - int(columns[-1])  # text tokens after the image
        got = seen["embeds"][row][slots][-len(expected) - after : -after]
        torch.testing.assert_close(got, expected)
        positions = seen["positions"][row][slots][-len(expected) - after : -after]
        assert positions.tolist() == columns[image.kept].tolist()  # arange positions of the top-left tokens


def test_qwen_dynamic_grids_pool_with_partial_windows(models):
    model = models("qwen3_vl")
    inputs = build_inputs(model, [RowSpec(images=[(3, 5)])])  # merged grid 3 x 5, no square M3 scale
    seen, record = llm_inputs(model, inputs, "matryoshka:4")
    assert record.images[0].kept.tolist() == [0, 2, 4, 10, 12, 14]  # window 2: rows {0, 2} x cols {0, 2, 4}
    features = torch.randn(15, 3)
    places, weights = Matryoshka().merge(TokenContext(features=features, keep=4, grid=(1, 3, 5)))
    pooled = weights @ features
    torch.testing.assert_close(pooled[0], features[[0, 1, 5, 6]].mean(0))  # a full 2 x 2 window
    torch.testing.assert_close(pooled[2], features[[4, 9]].mean(0))  # right edge: one column
    torch.testing.assert_close(pooled[5], features[14])  # bottom-right corner: one token
    positions = seen["positions"]  # M-RoPE (3, B, L): each pooled token has its top-left token's (t, h, w)
    assert positions.shape[0] == 3


def test_budgets_round_to_m3_scales_and_full_budget_is_identity(models):
    features = torch.randn(576, 8)
    ctx = TokenContext(features=features, keep=100, grid=(1, 24, 24))
    assert Matryoshka().merge(ctx)[0].numel() == 64  # nearest valid scale to 100 (8 x 8, window 3)
    assert (
        Matryoshka(scales=(576, 144, 36, 9, 1))
        .merge(TokenContext(features=features, keep=20, grid=(1, 24, 24)))[0]
        .numel()
        == 9
    )
    model = models("llava")
    inputs = build_inputs(model, [RowSpec(images=[(1, 1)])])
    with torch.no_grad():
        expected = model(**inputs).logits
        with vtprune.pruned(model, "matryoshka", keep_ratio=1.0):
            assert torch.equal(model(**inputs).logits, expected)


def test_anyres_pools_each_crop_and_keeps_one_newline_per_pooled_row():
    features = torch.randn(16 + 3 * 6, 3)  # a 4 x 4 base tile, then 3 rows of 5 tokens each ending in a newline
    segments = (Segment(0, (1, 4, 4)), Segment(16, (1, 3, 5), row_newlines=True))
    places, weights = Matryoshka().merge(TokenContext(features=features, keep=4, segments=segments))
    # base pooled 2 x 2 windows; high-res rows {0, 1} and {2} x cols {0-1, 2-3, 4}, each pooled row ending in
    # the newline of its last source row (27 ends row 1, 33 ends row 2); the newline of row 0 (21) is gone.
    assert places.tolist() == [0, 2, 8, 10, 16, 18, 20, 27, 28, 30, 32, 33]
    pooled = weights @ features
    torch.testing.assert_close(pooled[4], features[[16, 17, 22, 23]].mean(0))
    torch.testing.assert_close(pooled[7], features[27])  # a newline passes through unchanged
    torch.testing.assert_close(weights.sum(1), torch.ones(len(places)))


@pytest.mark.parametrize("kind", ["llava_next", "llava_onevision"])
def test_anyres_models_get_the_segments_from_their_newlines(models, make_inputs, kind):
    model = models(kind)
    inputs = make_inputs(model, kind, 3)
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=2)
        with vtprune.pruned(model, "matryoshka:100%"):
            assert torch.equal(model.generate(**inputs, max_new_tokens=2), expected)
        with vtprune.pruned(model, "matryoshka:4") as handle:
            model.generate(**inputs, max_new_tokens=2)
    assert handle.last_record.images  # the probes below ran
    for image in handle.last_record.images:
        assert image.kept.numel() < image.num_tokens


def test_anyres_segments_match_the_models_packing(models, make_inputs):
    model = models("llava_next")
    inputs = make_inputs(model, "llava_next", 3)  # row 1 has a wide image: base tile + 2 tiles side by side
    seen = []

    @vtprune.register_strategy("test_segments_probe", overwrite=True)
    class Probe(vtprune.Strategy):
        def select(self, ctx):
            seen.append((ctx.segments, ctx.num_tokens))
            return torch.arange(ctx.keep)

    with torch.no_grad(), vtprune.pruned(model, "test_segments_probe", keep=1):
        model(**inputs)
    for segments, n in seen:
        base, high = segments
        assert base == Segment(0, (1, 4, 4)) and high.start == 16 and high.row_newlines
        _, rows, width = high.grid
        assert n == 16 + rows * (width + 1)
    # The wide image (row 1's first) unpads to a wider high-res grid than the square ones.
    widths = [segments[1].grid[2] for segments, _ in seen]
    assert widths[1] > widths[0] == widths[2]
