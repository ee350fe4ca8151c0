"""The vLLM backend's schedule checks, counts and plumbing: no vLLM needed, so these run in every session."""

import json
from types import SimpleNamespace

import pytest
import torch
from crc32_twins import crc32_twin

import vtprune
from vtprune.errors import InputError, UnsupportedModelError
from vtprune.vllm import ARCHITECTURES, SCHEDULE_KEY, UnsupportedScheduleError, engine_args
from vtprune.vllm.plan import (
    ImageItem,
    PrunedRows,
    Remembered,
    Selections,
    decode_schedule,
    encode_schedule,
    image_digest,
    image_seed,
    make_plan,
    match_cls_rows,
    placeholder_ids,
    schedule_for,
    selection_key,
)


@pytest.mark.parametrize(
    "schedule, reason",
    [
        ("fastv@2:50%", "paged KV cache"),
        ("divprune:64+random_deep@2:50%", "paged KV cache"),
        ("zoo:64", "projector as a float32 function"),
        ("none", "decides its own count"),
    ],
)
def test_schedules_vllm_cannot_run_are_refused_with_the_reason(schedule, reason):
    with pytest.raises(UnsupportedScheduleError, match=reason.replace("[", r"\[")):
        make_plan(schedule)


def test_refusal_comes_before_any_engine_starts(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlavaForConditionalGeneration"]}))
    with pytest.raises(UnsupportedScheduleError, match="inside the decoder"):
        engine_args(str(tmp_path), "fastv@2:50%")
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MllamaForConditionalGeneration"]}))
    with pytest.raises(UnsupportedScheduleError, match="no pruning class for 'MllamaForConditionalGeneration'"):
        engine_args(str(tmp_path), "divprune:16")
    for refused in ("LlavaNextForConditionalGeneration", "LlavaOnevisionForConditionalGeneration"):
        (tmp_path / "config.json").write_text(json.dumps({"architectures": [refused]}))
        with pytest.raises(UnsupportedScheduleError, match=f"does not prune {refused}: its AnyRes images"):
            engine_args(str(tmp_path), "divprune:16")


def test_engine_args_select_the_pruning_class_and_carry_the_schedule(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen2VLForConditionalGeneration"]}))
    args = engine_args(str(tmp_path), "uniform:25%")
    assert args == {
        "model": str(tmp_path),
        "hf_overrides": {"architectures": ["VTPruneQwen2VLForConditionalGeneration"], SCHEDULE_KEY: "uniform:25%"},
    }
    assert "LlavaForConditionalGeneration" in ARCHITECTURES
    for qwen in ("Qwen2_5_VLForConditionalGeneration", "Qwen3VLForConditionalGeneration"):
        (tmp_path / "config.json").write_text(json.dumps({"architectures": [qwen]}))
        assert engine_args(str(tmp_path))["hf_overrides"]["architectures"] == [ARCHITECTURES[qwen].split(":")[1]]


@pytest.mark.parametrize(
    "schedule, grid, expected",
    [
        ("divprune:16", (1, 12, 12), 16),
        ("uniform:25%", (1, 12, 12), 36),
        ("random:0.1", (1, 12, 12), 14),  # round(14.4), as Budget.tokens
        ("matryoshka:16", (1, 12, 12), 16),
        ("matryoshka:20", (1, 12, 12), 16),  # M3 rounds to the nearest scale whose side divides the grid
        ("matryoshka:16", (1, 12, 9), 12),  # Qwen grids: partial edge windows
    ],
)
def test_the_count_follows_from_the_grid_alone_and_the_model_returns_exactly_it(schedule, grid, expected):
    n = grid[0] * grid[1] * grid[2]
    plan = make_plan(schedule)
    assert plan.tokens(n, grid) == expected
    for seed in range(3):
        kept, _ = plan.select(torch.randn(n, 8), grid, seed=seed)
        assert kept.numel() == expected


def test_a_budget_above_the_image_keeps_all_of_it():
    with pytest.warns(vtprune.schedule.BudgetWarning):
        assert make_plan("divprune:500").tokens(144, (1, 12, 12)) == 144


def test_selection_is_vtprunes_own():
    features = torch.randn(144, 16)
    kept, weights = make_plan("divprune:16").select(features, (1, 12, 12), seed=0)
    assert weights is None
    assert torch.equal(kept, vtprune.select("divprune", features, keep=16))
    kept, _ = make_plan("random:10").select(features, (1, 12, 12), seed=7)
    assert torch.equal(kept, vtprune.select("random", features, keep=10, seed=7))


def test_the_seed_is_the_pixels_own():
    pixels = torch.rand(3, 32, 32)
    assert image_seed(pixels) == image_seed(pixels.clone())
    assert image_seed(pixels) != image_seed(pixels.flip(-1))


def test_images_that_share_a_seed_have_their_own_keys():
    """A CRC32 is a seed, not an identity: two images whose pixels share one (crafted here; among 77,000 images two
    share one with even odds) draw alike, but their kept sets are remembered apart."""
    pixels = torch.rand(3, 32, 32)
    twin = crc32_twin(pixels)
    assert pixels.numpy().tobytes() != twin.numpy().tobytes() and image_seed(pixels) == image_seed(twin)
    question = torch.zeros(0, dtype=torch.long)
    keys = {ImageItem("divprune:16", image, question, None).key for image in (pixels, twin)}
    assert len(keys) == 2


def test_the_digest_reads_the_bytes_the_shape_the_dtype_and_the_grid():
    patches = torch.rand(16, 12)
    digest = image_digest(patches, torch.tensor([1, 4, 4]))
    assert digest == image_digest(patches.clone(), torch.tensor([1, 4, 4]))
    assert len({digest, image_digest(patches.reshape(8, 24), torch.tensor([1, 4, 4]))}) == 2  # same bytes
    assert len({digest, image_digest(patches, torch.tensor([1, 2, 8]))}) == 2  # the same patches, another grid
    assert len({digest, image_digest(patches.view(torch.int32), torch.tensor([1, 4, 4]))}) == 2  # same bytes
    assert len({digest, image_digest(patches, None)}) == 2
    assert image_digest(torch.ones(2, 2, dtype=torch.bfloat16)) != image_digest(torch.ones(2, 2))


def test_request_schedule_overrides_the_engines():
    class Config:
        vtprune_schedule = "divprune:16"

    assert schedule_for(Config(), {}) == "divprune:16"
    assert schedule_for(Config(), {SCHEDULE_KEY: "uniform:25%"}) == "uniform:25%"
    assert schedule_for(object(), {}) is None
    with pytest.raises(UnsupportedScheduleError, match="schedule string"):
        schedule_for(object(), {SCHEDULE_KEY: 16})


def test_an_engine_default_that_reads_the_cls_row_of_a_refused_llava_is_refused_before_the_engine(tmp_path):
    # Every request, down to vLLM's profiling run at engine start, would fail: engine_args says so first.
    config = {"architectures": ["LlavaForConditionalGeneration"], "vision_feature_layer": [-2, -1]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=r"'todre:16' reads .*vision_feature_layer=\[-2, -1\]"):
        engine_args(str(tmp_path), "todre:16")
    assert engine_args(str(tmp_path), "divprune:16")["hf_overrides"][SCHEDULE_KEY] == "divprune:16"
    assert SCHEDULE_KEY not in engine_args(str(tmp_path))["hf_overrides"]  # requests that ask are refused each
    config["vision_feature_layer"] = -2
    config["vision_config"] = None  # transformers' default tower: CLIP
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert engine_args(str(tmp_path), "todre:16")["hf_overrides"][SCHEDULE_KEY] == "todre:16"
    # A hub id (no local config.json) is left to the front-end's check, per request.
    hub = engine_args("llava-hf/llava-1.5-7b-hf", "todre:16", architecture="LlavaForConditionalGeneration")
    assert hub["hf_overrides"][SCHEDULE_KEY] == "todre:16"


def test_the_schedule_travels_as_a_tensor_and_comes_back():
    rows = encode_schedule("divprune:16(seed:3)", 2)
    assert rows.shape == (2, 128) and rows.dtype == torch.uint8
    assert [decode_schedule(row) for row in rows] == ["divprune:16(seed:3)"] * 2
    with pytest.raises(UnsupportedScheduleError, match="longer than"):
        encode_schedule("divprune:16" + "+" * 200, 1)


def test_remembered_selections_are_bounded():
    selections = Selections(capacity=2)
    images = [bytes([image]) for image in range(3)]
    for image in images:
        selections.put(("divprune:16", image, ()), (torch.arange(2), None))
    assert selections.get(("divprune:16", images[0], ())) is None
    assert selections.get(("divprune:16", images[2], ())) is not None
    assert selections.get(("uniform:25%", images[2], ())) is None
    assert selections.get(("divprune:16", images[2], (5,))) is None  # another question, another selection


def test_remembered_values_are_bounded_by_their_sizes():
    # Kept sets for positions are bounded by their tokens, summed: the newest stays even when larger than all.
    remembered = Remembered(capacity=10, size=len)
    for name, tokens in (("a", 4), ("b", 4), ("c", 4)):
        remembered.put(name, [0] * tokens)
    assert list(remembered.kept) == ["b", "c"] and remembered.total == 8
    remembered.put("b", [0] * 2)  # replaced: its old size no longer counts
    assert remembered.total == 6 and list(remembered.kept) == ["c", "b"]
    remembered.put("d", [0] * 12)
    assert list(remembered.kept) == ["d"] and remembered.total == 12


def test_a_remembered_selection_in_use_outlives_older_ones():
    # A kept set that positions were computed with may be needed again at the embedding step: using it keeps it.
    selections = Selections(capacity=2)
    keys = [("divprune:16", bytes([image]), ()) for image in range(3)]
    selections.put(keys[0], (torch.arange(2), None))
    selections.put(keys[1], (torch.arange(2), None))
    assert selections.get(keys[0]) is not None
    selections.put(keys[2], (torch.arange(2), None))
    assert selections.get(keys[1]) is None and selections.get(keys[0]) is not None


def test_pruned_rows_are_taken_once_and_bounded_by_rows():
    held = PrunedRows(capacity=10)
    keys = [("divprune:4", bytes([image]), ()) for image in range(4)]
    for index, key in enumerate(keys[:2]):
        held.put(key, (torch.arange(4), torch.full((4, 2), float(index))))
    assert held.total == 8 and torch.equal(held.kept_set(keys[0]), torch.arange(4))
    assert torch.equal(held.take(keys[1]), torch.full((4, 2), 1.0))
    assert held.take(keys[1]) is None and held.kept_set(keys[1]) is None  # taken: held no more
    assert held.total == 4
    held.put(keys[2], (torch.arange(4), torch.zeros(4, 2)))
    held.put(keys[3], (torch.arange(4), torch.zeros(4, 2)))  # 12 rows: the oldest image goes
    assert held.kept_set(keys[0]) is None and held.total == 8
    held.put(keys[0], (torch.arange(16), torch.zeros(16, 2)))  # larger than the capacity alone: the newest stays
    assert list(held.kept) == [keys[0]] and held.total == 16


def test_a_selection_is_keyed_by_schedule_pixels_grid_and_question():
    pixels, grid = torch.rand(4, 6), torch.tensor([1, 2, 2])
    key = selection_key("mmtok:4", pixels, torch.tensor([3, 5]), grid)
    assert key == ("mmtok:4", image_digest(pixels, grid), (3, 5))
    assert key == ImageItem("mmtok:4", pixels, torch.tensor([3, 5]), grid).key
    assert key != selection_key("mmtok:4", pixels, torch.tensor([3]), grid)


def test_mmtok_runs_on_the_question_words_and_the_projector_inputs():
    plan = make_plan("mmtok:16")
    assert plan.reads("text_embeds") and plan.reads("pre_features")
    assert not make_plan("divprune:16").reads("text_embeds")
    generator = torch.Generator().manual_seed(0)
    features, pre_features = torch.randn(144, 16, generator=generator), torch.randn(144, 24, generator=generator)
    questions = [torch.randn(3, 16, generator=generator) for _ in range(2)]
    chosen = [
        plan.select(features, (1, 12, 12), seed=0, text_embeds=question, pre_features=pre_features)[0]
        for question in questions
    ]
    for question, kept in zip(questions, chosen, strict=True):
        expected = vtprune.select("mmtok", features, keep=16, text_embeds=question, pre_features=pre_features)
        assert torch.equal(kept, expected)
    assert not torch.equal(chosen[0], chosen[1])  # the question decides part of the selection


def test_todre_ranks_with_the_cls_attention_it_is_given():
    generator = torch.Generator().manual_seed(1)
    features, cls_attention = torch.randn(144, 16, generator=generator), torch.rand(144, generator=generator)
    kept, _ = make_plan("todre:16").select(features, (1, 12, 12), seed=0, cls_attention=cls_attention)
    assert torch.equal(kept, vtprune.select("todre", features, keep=16, cls_attention=cls_attention))
    without, _ = make_plan("todre:16").select(features, (1, 12, 12), seed=0)  # no [CLS]: todre's own fallback
    assert torch.equal(without, vtprune.select("todre", features, keep=16))
    assert not torch.equal(kept, without)


def test_placeholder_ids_put_the_image_first_in_either_spelling():
    # vLLM's LLaVA config spells the image placeholder image_token_index; Qwen's name image and video tokens.
    llava = SimpleNamespace(image_token_index=32000, pad_token_id=0)
    qwen = SimpleNamespace(video_token_id=151656, image_token_id=151655)
    assert placeholder_ids(llava) == [32000]
    assert placeholder_ids(qwen) == [151655, 151656]


def test_cls_rows_go_to_the_images_whose_schedule_reads_them():
    rows = [torch.rand(4), torch.rand(9), torch.rand(4)]
    matched = match_cls_rows(rows, ["todre:2", "", "divprune:2"], [4, 9, 4])
    assert matched[0] is rows[0] and matched[1:] == [None, None]
    # A tower without [CLS] (None): ToDRE's declared fallback, its most isolated token as the pivot.
    assert match_cls_rows(None, ["todre:2"], [4]) == [None]


def test_cls_rows_that_do_not_belong_to_the_images_are_refused():
    # Precomputed embeddings pass no tower: no rows for the two images.
    with pytest.raises(InputError, match="precomputed embeddings"):
        match_cls_rows([], ["todre:2", "todre:2"], [4, 4])
    # vision_feature_select_strategy "full": the image's tokens are the [CLS] token and its 4 patches.
    with pytest.raises(InputError, match="'todre:2' reads the \\[CLS\\] attention to the image's 4 patches"):
        match_cls_rows([torch.rand(4)], ["todre:2"], [5])
    # A schedule that does not read the row does not care what it covers.
    assert match_cls_rows([torch.rand(4)], ["divprune:2"], [5]) == [None]
