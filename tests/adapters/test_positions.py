"""Kept tokens get exactly the positions the model itself gives them, for every input the model accepts.

The model's own positions are read where its text model receives them (unwrapped forward); vtprune's
where the same text model receives the pruned sequence. Caller-supplied arguments of the position
function (Qwen2.5-VL's ``second_per_grid_ts``, explicit ``position_ids``) must reach both alike.
"""

import pytest
import torch
from reference import final_keep

import vtprune
from vtprune.testing import MODEL_KINDS


def text_model_positions(model, inputs: dict) -> torch.Tensor:
    """The position ids the text model receives for ``inputs`` ((B, L) or (rows, B, L))."""
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["position_ids"]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    assert len(seen) == 1, "the text model ran once"
    positions = seen[0]
    if positions is None:  # the 1-D text models' own default
        positions = torch.arange(inputs["input_ids"].shape[1])[None]
    return positions.expand(*positions.shape[:-2], inputs["input_ids"].shape[0], positions.shape[-1])


def assert_kept_positions_are_the_models(model, inputs: dict, schedule: str) -> None:
    own = text_model_positions(model, inputs)
    with vtprune.pruned(model, schedule) as handle:
        got = text_model_positions(model, inputs)
    keep = final_keep(inputs, handle.last_record)
    assert got.shape[-1] < own.shape[-1], "the input stage must shorten the sequence"
    for row in range(keep.shape[0]):
        n = int(keep[row].sum())
        torch.testing.assert_close(got[..., row, -n:], own[..., row, keep[row]], atol=0, rtol=0)


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_kept_positions_equal_the_models_own(models, make_inputs, kind):
    model = models(kind)
    assert_kept_positions_are_the_models(model, make_inputs(model, kind, 3), "random:50%")


@pytest.mark.parametrize("seconds", [0.5, 2.0, 3.0])
def test_qwen2_5_video_seconds_per_grid_reach_the_positions(models, make_inputs, seconds):
    model = models("qwen2_5_vl")
    inputs = make_inputs(model, "qwen2_5_vl", 3)
    inputs["second_per_grid_ts"] = torch.tensor([seconds] * len(inputs["video_grid_thw"]))
    assert_kept_positions_are_the_models(model, inputs, "random:50%")


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_caller_position_ids_are_kept(models, make_inputs, kind):
    model = models(kind)
    inputs = make_inputs(model, kind, 3)
    own = text_model_positions(model, inputs)
    inputs["position_ids"] = own + 5  # any ids the caller chooses are the model's positions
    assert_kept_positions_are_the_models(model, inputs, "random:50%")
