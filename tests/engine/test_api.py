"""The public API: schedules, select() on tensors, records, registry, seeding."""

import pytest
import torch

import vtprune
from vtprune import Budget, Schedule, Stage
from vtprune.strategies import DivPrune, FastV, RandomPruning
from vtprune.testing import RowSpec, build_inputs, build_model


def test_schedule_strings_round_trip():
    schedule = vtprune.parse_schedule("divprune:64 + fastv@2:50% + random@16:0.25")
    assert [type(stage.strategy) for stage in schedule.stages] == [DivPrune, FastV, RandomPruning]
    assert [stage.layer for stage in schedule.stages] == [None, 2, 16]
    assert schedule.stages[0].budget == Budget(keep=64)
    assert schedule.stages[1].budget == Budget(keep_ratio=0.5)
    assert str(schedule) == "divprune:64+fastv@2:0.5+random@16:0.25"
    assert str(vtprune.parse_schedule(str(schedule))) == str(schedule)


def test_schedule_string_options_reach_the_strategy():
    @vtprune.register_strategy("test_with_options", overwrite=True)
    class WithOptions(vtprune.Strategy):
        def __init__(self, alpha: float = 0.5, metric: str = "cos", exact: bool = False) -> None:
            self.alpha, self.metric, self.exact = alpha, metric, exact

    stage = vtprune.parse_schedule("test_with_options:8(alpha:0.25;metric:l2;exact:true)").stages[0]
    assert (stage.strategy.alpha, stage.strategy.metric, stage.strategy.exact) == (0.25, "l2", True)
    with pytest.raises(TypeError, match="does not take these options"):
        vtprune.parse_schedule("divprune:8(alpha:1)")


def test_stage_objects_and_schedule_order():
    schedule = Schedule([Stage(FastV(), layer=3, budget=Budget(keep=2)), vtprune.make_stage("divprune", keep=8)])
    assert schedule.input_stage.strategy.name == "divprune"
    assert [stage.layer for stage in schedule.decoder_stages] == [3]


def test_budget_rounds_like_divprune_and_never_reaches_zero():
    assert Budget(keep_ratio=0.098).tokens(576) == 56  # DivPrune's reference default
    assert Budget(keep_ratio=0.01).tokens(10) == 1
    assert Budget(keep_ratio=1.0).tokens(7) == 7


def test_select_on_plain_tensors_is_what_the_hooks_run(models, make_inputs):
    model = models("llava")
    inputs = make_inputs(model, "llava", 1)
    with torch.no_grad():
        features = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]
        with vtprune.pruned(model, "divprune", keep=5) as handle:
            model(**inputs)
    direct = vtprune.select("divprune", features, keep=5)
    assert torch.equal(direct, handle.last_record.images[0].kept)
    assert direct.tolist() == sorted(set(direct.tolist()))


def test_select_passes_inputs_and_options():
    features = torch.randn(16, 8)
    attention = torch.arange(16.0)
    assert vtprune.select("fastv", features, keep=3, attention=attention).tolist() == [13, 14, 15]
    assert vtprune.select("uniform", features, keep=4, grid=(1, 4, 4)).tolist() == [5, 7, 13, 15]
    newline = torch.zeros(16, dtype=torch.bool)
    newline[[3, 7, 11, 15]] = True
    kept = vtprune.select("divprune", features, keep_ratio=0.5, newline=newline, newlines="drop")
    assert len(kept) == 6 and not newline[kept].any()


def test_record_describes_each_image_and_layer(models, make_inputs):
    model = models("llava_next")
    inputs = make_inputs(model, "llava_next", 3)
    with torch.no_grad(), vtprune.pruned(model, "divprune:50%+fastv@2:50%") as handle:
        model(**inputs)
    record = handle.last_record
    assert [(im.row, im.modality, im.index) for im in record.images] == [
        (0, "image", 0),
        (1, "image", 0),
        (1, "image", 1),
    ]
    for image in record.images:
        after_input, after_layer = image.kept_by_stage["input"], image.kept_by_stage["layer 2"]
        assert after_input.numel() == round(image.num_tokens / 2)
        assert set(after_layer.tolist()) <= set(after_input.tolist())
        assert torch.equal(image.kept, after_layer)
    lengths = record.layer_lengths
    assert lengths.shape == (3, len(model.model.language_model.layers))
    valid = inputs["attention_mask"].sum(dim=1)
    dropped_input = torch.tensor(
        [sum(im.num_tokens - im.kept_by_stage["input"].numel() for im in record.for_row(r)) for r in range(3)]
    )
    assert torch.equal(lengths[:, 0], valid - dropped_input)
    assert (lengths[:, 2] < lengths[:, 1]).tolist() == [True, True, False]  # the text-only row loses nothing
    totals = record.visual_tokens()
    assert totals["before"] > totals["input"] > totals["layer 2"]


def test_a_profile_shows_vtprune_ranges_in_the_prefill_and_none_in_decoding_steps(models, make_inputs):
    # eval/bench_prefill.py --profile (and a user's own profile) reads vtprune's share from these ranges; decoding
    # steps open none, since the layer hooks run on every layer there and a range costs microseconds.
    model = models("llava")
    inputs = make_inputs(model, "llava", 2)

    def ranges(**kwargs) -> list[str]:
        with torch.profiler.profile() as profile:
            model.generate(**inputs, do_sample=False, pad_token_id=0, **kwargs)
        return [event.name for event in profile.events() if event.name.startswith("vtprune.")]

    with torch.no_grad(), vtprune.pruned(model, "divprune:50%+fastv@2:50%"):
        prefill, two_steps = ranges(max_new_tokens=1), ranges(max_new_tokens=3)
    # The input stage's selection, layer 2's scoring and its selection, each inside a hook's range.
    assert prefill.count("vtprune.selection_seconds") == 3 and prefill.count("vtprune.hook_seconds") >= 3
    # Each decoding step adds the input hook's range only (whether it decodes is known inside it), none from the
    # layer hooks.
    assert sorted(two_steps) == sorted(prefill + ["vtprune.hook_seconds"] * 2)


def test_random_draws_depend_on_the_sample_not_the_batch(models):
    model = models("qwen2_vl")
    rows = [RowSpec(images=[(2, 3)], text_before=1), RowSpec(images=[(3, 3)], text_before=4)]
    alone = build_inputs(model, rows[:1])
    both = build_inputs(model, rows)  # the first sample is now left-padded
    assert not both["attention_mask"][0].all()
    with torch.no_grad(), vtprune.pruned(model, "random", keep=4, seed=7) as handle:
        model(**alone)
        first = handle.last_record.images[0].kept
        model(**both)
        assert torch.equal(handle.last_record.images[0].kept, first)
    with torch.no_grad(), vtprune.pruned(model, "random", keep=4, seed=8) as handle:
        model(**alone)
        assert not torch.equal(handle.last_record.images[0].kept, first)


@pytest.mark.parametrize("kind", ["llava", "qwen2_vl", "qwen3_vl"])
def test_strategies_see_the_same_grid_in_forward_and_generate(models, make_inputs, kind):
    seen = []

    @vtprune.register_strategy("test_grid_probe", overwrite=True)
    class GridProbe(vtprune.Strategy):
        def select(self, ctx):
            seen.append(ctx.grid)
            return torch.arange(ctx.keep)

    model = models(kind)
    inputs = make_inputs(model, kind, 3)
    with torch.no_grad(), vtprune.pruned(model, "test_grid_probe", keep=1):
        model(**inputs)
        from_forward = list(seen)
        seen.clear()
        model.generate(**inputs, max_new_tokens=1)
    assert len(from_forward) >= 3 and seen == from_forward  # every image of the three rows was probed
    assert all(grid is not None for grid in seen)
    if kind.startswith("qwen"):  # merged grids of the test images: (2, 2), (2, 3), (2, 2), then a 2-frame video
        assert from_forward[:3] == [(1, 2, 2), (1, 2, 3), (1, 2, 2)]
        assert from_forward[3] == (2, 2, 2)


def test_newline_tokens_are_found_and_can_be_dropped(models, make_inputs):
    model = models("llava_next")
    inputs = make_inputs(model, "llava_next", 1)
    with torch.no_grad():
        features = model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
        newline = (features.pooler_output[0] == model.model.image_newline).all(dim=-1)
        assert newline.any()
        with vtprune.pruned(model, "divprune", keep_ratio=0.5, newlines="drop") as handle:
            model(**inputs)
    kept = handle.last_record.images[0].kept
    assert not newline[kept].any()
    assert kept.numel() == round(int((~newline).sum()) / 2)


def test_user_strategies_register_and_run(models, make_inputs):
    @vtprune.register_strategy("test_first_k", overwrite=True)
    class FirstK(vtprune.Strategy):
        """Keeps the first k tokens."""

        def select(self, ctx):
            return torch.arange(ctx.keep)

    assert "test_first_k" in vtprune.list_strategies()
    model = models("llava")
    with torch.no_grad(), vtprune.pruned(model, "test_first_k", keep=3) as handle:
        model(**make_inputs(model, "llava", 1))
    assert handle.last_record.images[0].kept.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="already registered"):
        vtprune.register_strategy("divprune")(FirstK)


def test_require_record_refuses_before_the_first_prefill(models, make_inputs):
    model = models("llava")
    with torch.no_grad(), vtprune.pruned(model, "divprune", keep=3) as handle:
        assert handle.last_record is None
        with pytest.raises(vtprune.NoRecordError, match="run a forward or generate"):
            handle.require_record()
        model(**make_inputs(model, "llava", 1))
        assert handle.require_record() is handle.last_record
        assert handle.require_record().images[0].kept.numel() == 3


def test_text_only_batches_pass_through(models):
    model = models("qwen2_5_vl")
    inputs = build_inputs(model, [RowSpec(images=[], text_before=3)])
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=3)
        with vtprune.pruned(model, "divprune", keep=2) as handle:
            assert torch.equal(model.generate(**inputs, max_new_tokens=3), expected)
    assert handle.last_record.images == []


def test_random_deep_defaults_to_half_the_depth_and_stacks(models, make_inputs):
    model = models("qwen2_5_vl")
    inputs = make_inputs(model, "qwen2_5_vl", 3)
    with torch.no_grad(), vtprune.pruned(model, "divprune:75%+random_deep:50%") as handle:
        model.generate(**inputs, max_new_tokens=2)
    assert [stage.layer for stage in handle.schedule.stages] == [None, 2]  # 4 layers: half is layer 2
    totals = handle.last_record.visual_tokens()
    assert totals["before"] > totals["input"] > totals["layer 2"]
    with vtprune.pruned(model, "random_deep@3:50%") as handle:
        assert handle.schedule.stages[0].layer == 3


def test_select_nested_gives_every_budget_from_one_pass():
    features = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    sets = vtprune.select_nested("divprune", features, [4, 16, 32])
    for k, kept in sets.items():
        assert torch.equal(kept, vtprune.select("divprune", features, keep=k))
    assert set(sets[4].tolist()) <= set(sets[16].tolist()) <= set(sets[32].tolist())
    with pytest.raises(TypeError, match="not greedy"):
        vtprune.select_nested("random", features, [4])
    with pytest.raises(vtprune.BudgetError):
        vtprune.select_nested("divprune", features, [0, 65])


def test_hidden_states_under_a_decoder_stage_have_the_lengths_the_record_gives(models, make_inputs):
    model = models("llava")
    inputs = make_inputs(model, "llava", 3)
    with torch.no_grad(), vtprune.pruned(model, "fastv@2:50%") as handle:
        hidden = model(**inputs, output_hidden_states=True).hidden_states
    lengths = handle.last_record.layer_lengths  # (B, layers): real tokens entering each layer
    full = inputs["input_ids"].shape[1]
    assert len(hidden) == lengths.shape[1] + 1 == 5
    # hidden[i] is what enters layer i (hidden[-1]: the last layer's output): full length up to layer K = 2 ...
    assert [h.shape[1] for h in hidden[:3]] == [full] * 3
    # ... then the packed rows, as long as the longest row entering that layer (the last output: the last layer's).
    assert hidden[3].shape[1] == int(lengths[:, 3].max()) < full
    assert hidden[4].shape[1] == int(lengths[:, 3].max())
    dropped = [sum(im.num_tokens - im.kept.numel() for im in handle.last_record.for_row(row)) for row in range(3)]
    assert (lengths[:, 2] == lengths[:, 1] - torch.tensor(dropped)).all() and dropped[0] > 0


def test_arguments_that_do_not_fit_the_call_are_refused_with_a_vtprune_error():
    # Still TypeErrors (the wrong kind of argument for the call), and VTPruneErrors that say what to do.
    with pytest.raises(vtprune.OptionError, match=r"\['keep'\] cannot be combined with a schedule"):
        vtprune.prune(build_model("llava"), "mmtok:3+random_deep@1:50%", keep=4)
    with pytest.raises(vtprune.OptionError, match="not greedy"):
        vtprune.select_nested("random", torch.randn(8, 4), [2])
