"""Matryoshka pooling inside the models: the LLM receives M3's pooled tokens at their windows' places."""

import pytest
import torch

import vtprune
from vtprune.pooling import pool_grid
from vtprune.strategies import Matryoshka
from vtprune.strategies.base import TokenContext
from vtprune.synthetic import IMAGE, RowSpec, build_inputs


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


@pytest.mark.parametrize("kind", ["llava_next", "llava_onevision"])
def test_anyres_has_no_grid_to_pool(models, make_inputs, kind):
    model = models(kind)
    with vtprune.pruned(model, "matryoshka:4"), pytest.raises(ValueError, match="AnyRes"):
        model(**make_inputs(model, kind, 1))
