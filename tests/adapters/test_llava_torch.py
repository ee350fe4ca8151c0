"""The original LLaVA codebase (llava-torch) as a backend: the same weights in both formats prune alike.

The shipped toy LLaVA and a random-weight LLaVA-NeXT are converted to llava-torch's format at test time
(``save_as_llava_torch``); vtprune on llava's own ``LlavaLlamaForCausalLM`` must keep the same tokens and give
the same logits and generations as vtprune on the transformers model.
"""

import importlib
import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from transformers import LlavaForConditionalGeneration
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

import vtprune
from vtprune.adapters import adapter_for
from vtprune.adapters.llava_torch import IMAGE_TOKEN_INDEX, LlavaTorchAdapter, fix_cache_keyword
from vtprune.adapters.llava_torch_format import load_llava_torch, save_as_llava_torch
from vtprune.errors import InputError, LayerError, UnsupportedModelError
from vtprune.testing import RowSpec, build_inputs, build_model

# Skipped where llava-torch is absent; noxfile.py's tests session installs it and sets VTPRUNE_REQUIRE_LLAVA_TORCH, so
# a broken install fails there instead of skipping.
LLAVA = "llava.model.language_model.llava_llama"
_ = importlib.import_module(LLAVA) if os.environ.get("VTPRUNE_REQUIRE_LLAVA_TORCH") else pytest.importorskip(LLAVA)

TOY = "vtprune/assets/toy_llava"
GEN = {"max_new_tokens": 4, "do_sample": False}
#: Strategies whose draws are seeded from the row's token ids: the placeholder ids differ between the two
#: formats (llava's -200 against the config's image token), so their draws differ by design.
SEEDED = ("random", "random_deep", "zoo")
#: A schedule per strategy and stage (todre_relevance and random_deep act inside the decoder).
SCHEDULES = [
    "cdpruner:30",
    "divprune:30",
    "fastv@2:30",
    "matryoshka:36",
    "mmtok:30",
    "todre:30",
    "todre:30+todre_relevance@2(tau:1.0)",
    "trim:30",
    "uniform:36",
    "divprune:60+fastv@2:50%",
    "divprune@1:40%",
]


@pytest.fixture(scope="module")
def toy_pair(tmp_path_factory):
    """The toy LLaVA in transformers' format and, converted, in llava-torch's (float32 both)."""
    model = LlavaForConditionalGeneration.from_pretrained(TOY, dtype=torch.float32).eval()
    folder = save_as_llava_torch(model, tmp_path_factory.mktemp("toy_llava_torch"))
    return model, load_llava_torch(folder)


@pytest.fixture(scope="module")
def next_pair(tmp_path_factory):
    """A random-weight LLaVA-NeXT and its llava-torch form (AnyRes, spatial_unpad)."""
    model = build_model("llava_next")
    folder = save_as_llava_torch(model, tmp_path_factory.mktemp("next_llava_torch"))
    return model, load_llava_torch(folder)


def toy_inputs(rows: list[list[int]]) -> dict:
    """transformers inputs for the toy, left-padded: each row's images are given by a count in ``rows``'s
    entries: ``[text ids..., -1 (an image), text ids...]``."""
    tokens = 144  # (192 / 16)^2 patches per image
    sequences = [[t for token in row for t in ([3] * tokens if token < 0 else [token])] for row in rows]
    images = sum(token < 0 for row in rows for token in row)
    pixels = torch.randn(images, 3, 192, 192, generator=torch.Generator().manual_seed(0))
    return {**left_pad(sequences), "pixel_values": pixels}


def left_pad(sequences: list[list[int]]) -> dict:
    length = max(map(len, sequences))
    ids = torch.zeros(len(sequences), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, sequence in enumerate(sequences):
        ids[row, length - len(sequence) :] = torch.tensor(sequence)
        mask[row, length - len(sequence) :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def as_llava_torch(model, inputs: dict) -> dict:
    """The same prompt for llava-torch: one IMAGE_TOKEN_INDEX per image, images as llava's processor gives them."""
    pixels = inputs["pixel_values"]
    if "image_sizes" in inputs:  # AnyRes: one tensor of its own tiles per image, sizes as (width, height)
        sizes = inputs["image_sizes"]
        counts = [len(f) for f in model.model.get_image_features(pixels, sizes).pooler_output]
        side, pinpoints = model.config.vision_config.image_size, model.config.image_grid_pinpoints
        images = [pixels[i, : image_size_to_num_patches(s, pinpoints, side)] for i, s in enumerate(sizes.tolist())]
        extra = {"images": images, "image_sizes": [(w, h) for h, w in sizes.tolist()]}
    else:
        counts = [(model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2] * len(pixels)
        extra = {"images": pixels}
    remaining = iter(counts)
    sequences = []
    for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"].bool()):
        sequence, skip = [], 0
        for token in ids[mask].tolist():
            if skip:
                skip -= 1
            elif token == model.config.image_token_id:
                sequence.append(IMAGE_TOKEN_INDEX)
                skip = next(remaining) - 1
            else:
                sequence.append(token)
        sequences.append(sequence)
    return {**left_pad(sequences), **extra}


def run(model, inputs: dict, schedule: str | None = None, generate: dict | None = None):
    """(logits, kept sets, generated tokens if ``generate`` options are given) of ``model`` on ``inputs``,
    pruned by ``schedule`` if given."""
    llava_torch = isinstance(adapter_for(model), LlavaTorchAdapter)
    tokens = None
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # llava passes past_key_values, deprecated in 5.24
        handle = vtprune.prune(model, schedule) if schedule else None
        fix = fix_cache_keyword(model) if llava_torch and not handle else None  # prune() installs its own
        try:
            logits = model(**inputs).logits
            kept = [image.kept for image in handle.last_record.images] if handle else None
            if generate is not None and llava_torch:  # llava's generate() names its ids `inputs`, returns new ones
                rest = {key: value for key, value in inputs.items() if key != "input_ids"}
                tokens = model.generate(inputs["input_ids"], **rest, **GEN, **generate)
            elif generate is not None:
                tokens = model.generate(**inputs, **GEN, **generate)[:, inputs["input_ids"].shape[1] :]
        finally:
            if handle:
                handle.remove()
            if fix:
                fix.remove()
    return logits, kept, tokens


ROWS = [[5, 6, 7, -1, 8, 9], [10, 11, 12, 13, 14, -1, 15, -1, 16]]  # two rows, left padding, two images in one


@pytest.fixture(scope="module")
def toy_baseline(toy_pair):
    """The unwrapped llava-torch toy's logits and generated tokens on ROWS."""
    model, llava = toy_pair
    logits, _, tokens = run(llava, as_llava_torch(model, toy_inputs(ROWS)), generate={})
    return logits, tokens


def test_conversion_gives_the_same_model(toy_pair, toy_baseline, next_pair):
    model, _ = toy_pair
    logits, _, tokens = run(model, toy_inputs(ROWS), generate={})
    assert torch.equal(logits, toy_baseline[0])
    assert torch.equal(tokens, toy_baseline[1])
    model, llava = next_pair
    inputs = build_inputs(model, [RowSpec(images=[(1, 2)]), RowSpec(images=[(2, 1), (1, 1)], text_before=5)])
    assert torch.equal(run(model, inputs)[0], run(llava, as_llava_torch(model, inputs))[0])


@pytest.mark.parametrize("schedule", ["none", "divprune:100%+random@2:100%"])
def test_keep_all_is_bit_identical_and_remove_restores(toy_pair, toy_baseline, schedule):
    model, llava = toy_pair
    inputs = as_llava_torch(model, toy_inputs(ROWS))
    logits, kept, tokens = run(llava, inputs, schedule, generate={})
    assert torch.equal(logits, toy_baseline[0])
    assert torch.equal(tokens, toy_baseline[1])
    assert len(kept) == 3 and all(k is None or k.numel() == 144 for k in kept)
    assert "prepare_inputs_labels_for_multimodal" not in vars(llava)  # the class's method again
    assert not llava._forward_pre_hooks and not llava._forward_hooks
    assert torch.equal(run(llava, inputs)[0], toy_baseline[0])


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_every_strategy_equals_the_transformers_model(toy_pair, schedule):
    model, llava = toy_pair
    inputs = toy_inputs(ROWS)
    logits, kept, _ = run(model, inputs, schedule)
    llava_logits, llava_kept, _ = run(llava, as_llava_torch(model, inputs), schedule)
    assert len(kept) == len(llava_kept) == 3
    assert sum(k.numel() for k in kept) < 3 * 144, "the schedule must prune"
    assert all(torch.equal(a, b) for a, b in zip(kept, llava_kept))
    assert logits.shape == llava_logits.shape
    torch.testing.assert_close(llava_logits, logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("schedule", ["mmtok:30", "divprune:60+fastv@2:50%"])
def test_generate_with_beams_and_renumbered_positions(toy_pair, schedule):
    model, llava = toy_pair
    inputs = toy_inputs(ROWS)
    llava_inputs = as_llava_torch(model, inputs)
    beams = {"num_beams": 2, "num_return_sequences": 2}
    _, kept, tokens = run(model, inputs, schedule, generate=beams)
    _, llava_kept, llava_tokens = run(llava, llava_inputs, schedule, generate=beams)
    assert all(torch.equal(a, b) for a, b in zip(kept, llava_kept))
    assert tokens.shape[0] == 4
    assert torch.equal(tokens, llava_tokens)
    with torch.no_grad(), vtprune.pruned(model, schedule, renumber=True):
        logits = model(**inputs).logits
        tokens = model.generate(**inputs, **GEN)[:, inputs["input_ids"].shape[1] :]
    with torch.no_grad(), vtprune.pruned(llava, schedule, renumber=True):
        llava_logits = llava(**llava_inputs).logits
        llava_tokens = llava.generate(llava_inputs.pop("input_ids"), **llava_inputs, **GEN)
    torch.testing.assert_close(llava_logits, logits, atol=1e-5, rtol=0)
    assert torch.equal(tokens, llava_tokens)


@pytest.mark.parametrize("schedule", ["mmtok:40%", "divprune:50%+fastv@2:50%"])
def test_anyres_equals_the_transformers_model(next_pair, schedule):
    model, llava = next_pair
    inputs = build_inputs(model, [RowSpec(images=[(1, 2)]), RowSpec(images=[(2, 1), (1, 1)], text_before=5)])
    logits, kept, tokens = run(model, inputs, schedule, generate={})
    llava_logits, llava_kept, llava_tokens = run(llava, as_llava_torch(model, inputs), schedule, generate={})
    assert len(kept) == len(llava_kept) == 3
    assert all(torch.equal(a, b) for a, b in zip(kept, llava_kept))
    torch.testing.assert_close(llava_logits, logits, atol=1e-5, rtol=0)
    assert torch.equal(tokens, llava_tokens)


@pytest.fixture(scope="module")
def flat_pair(tmp_path_factory):
    """A random-weight LLaVA-1.5 with a two-layer tower (the toy's has one: no [CLS] attention to read)."""
    model = build_model("llava")
    return model, load_llava_torch(save_as_llava_torch(model, tmp_path_factory.mktemp("flat_llava_torch")))


def test_strategy_inputs_of_the_vision_side_are_the_same(flat_pair):
    """todre's [CLS] attention and zoo's projector inputs, read on llava's tower and projector; the seeded draws
    (random, random_deep, zoo) are the same although the formats mark visual slots with different ids."""
    model, llava = flat_pair
    inputs = build_inputs(model, [RowSpec(images=[(1, 1)]), RowSpec(images=[(1, 1), (1, 1)], text_before=5)])
    llava_inputs = as_llava_torch(model, inputs)
    with torch.no_grad(), vtprune.pruned(model, "todre:5") as handle:
        model(**inputs)
        cls = handle.capture.cls_attention
    with torch.no_grad(), vtprune.pruned(llava, "todre:5") as handle:
        llava(**llava_inputs)
        llava_cls = handle.capture.cls_attention
    assert cls is not None and cls.shape == (3, 16)
    torch.testing.assert_close(llava_cls, cls, atol=1e-6, rtol=0)
    for schedule in ("zoo:5", "random:5", "random_deep@2:50%"):
        logits, kept, _ = run(model, inputs, schedule)
        llava_logits, llava_kept, _ = run(llava, llava_inputs, schedule)
        assert all(torch.equal(a, b) for a, b in zip(kept, llava_kept)), schedule
        torch.testing.assert_close(llava_logits, logits, atol=1e-5, rtol=0)


def test_todre_refuses_a_cls_token_among_the_image_tokens(flat_pair):
    """mm_vision_select_feature 'cls_patch': each image's 17 tokens are the [CLS] token and its 16 patches, which the
    [CLS] row ranks; ToDRE refuses instead of taking its no-[CLS] fallback."""
    model, llava = flat_pair
    inputs = as_llava_torch(model, build_inputs(model, [RowSpec(images=[(1, 1)])]))
    tower = llava.get_vision_tower()
    tower.select_feature = "cls_patch"  # what the tower's forward reads (llava's config only builds it)
    try:
        refused = pytest.raises(InputError, match="16 patches, but the image has 17 tokens")
        with torch.no_grad(), vtprune.pruned(llava, "todre:5"), refused:
            llava(**inputs)
        _, kept, _ = run(llava, inputs, "divprune:5")  # it reads no [CLS] row
    finally:
        tower.select_feature = "patch"
    assert [k.numel() for k in kept] == [5]


def test_todre_on_flattened_anyres_tiles_falls_back_to_the_isolated_pivot(next_pair):
    """AnyRes images flattened tile after tile (mm_patch_merge_type 'flat'): a tower pass per tile, not per image, so
    ToDRE takes its declared fallback, as for packed AnyRes images."""
    model, llava = next_pair
    inputs = as_llava_torch(model, build_inputs(model, [RowSpec(images=[(1, 2)]), RowSpec(images=[(1, 1)])]))
    llava.config.mm_patch_merge_type = "flat"
    try:
        with torch.no_grad(), vtprune.pruned(llava, "todre:5") as handle:
            llava(**inputs)
            assert handle.capture.cls_attention is None
    finally:
        llava.config.mm_patch_merge_type = "spatial_unpad"
    assert [image.kept.numel() for image in handle.last_record.images] == [5, 5]


@pytest.mark.parametrize("dtype", [torch.bfloat16])  # float16 alike (slow on CPU)
def test_half_precision_keep_all_is_bit_identical_and_prunes(flat_pair, dtype):
    model, llava = flat_pair
    llava = load_llava_torch(llava.config._name_or_path, dtype=dtype)
    inputs = as_llava_torch(model, build_inputs(model, [RowSpec(), RowSpec(images=[(1, 1), (1, 1)], text_before=5)]))
    inputs["images"] = inputs["images"].to(dtype)
    logits, _, tokens = run(llava, inputs, generate={})
    same_logits, _, same_tokens = run(llava, inputs, "divprune:100%+fastv@2:100%", generate={})
    assert logits.dtype == dtype
    assert torch.equal(logits, same_logits)
    assert torch.equal(tokens, same_tokens)
    pruned_logits, kept, _ = run(llava, inputs, "mmtok:5+fastv@2:50%", generate={})
    assert [k.numel() for k in kept] == [3, 3, 3]
    assert pruned_logits.shape[1] < logits.shape[1] and bool(pruned_logits.isfinite().all())


def test_a_mistral_decode_past_the_sliding_window_is_refused(flat_pair, tmp_path):
    """llava-torch takes the packed prefill as its own sequence (no input layout left to map generate()'s mask
    through), so the refusal must count the original tokens there too: a prompt within the window prunes, the
    decoded token that takes the original sequence past it is refused (the transformers path: test_gemma3.py)."""
    from llava.model.language_model.llava_mistral import LlavaMistralForCausalLM

    model, llava = flat_pair
    folder = Path(llava.config._name_or_path)
    for name in ("model.safetensors", "generation_config.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    inputs = as_llava_torch(model, build_inputs(model, [RowSpec(images=[(1, 1)], text_before=3, text_after=6)]))
    length = inputs["input_ids"].shape[1] - 1 + 16  # the image's placeholder stands for its 16 tokens
    config = json.loads((folder / "config.json").read_text())
    config.update(architectures=["LlavaMistralForCausalLM"], model_type="llava_mistral", sliding_window=length)
    (tmp_path / "config.json").write_text(json.dumps(config))
    mistral = LlavaMistralForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    mistral.get_vision_tower().load_model()
    assert adapter_for(mistral).sliding_window == length
    rest = {key: value for key, value in inputs.items() if key != "input_ids"}
    with torch.no_grad(), warnings.catch_warnings(), vtprune.pruned(mistral, "divprune:40%") as handle:
        warnings.simplefilter("ignore", FutureWarning)  # llava passes past_key_values, deprecated in 5.24
        mistral(**inputs)  # the prompt fits the window: exact
        assert handle.last_record.images[0].kept.numel() == 6
        with pytest.raises(LayerError, match="max_new_tokens"):
            mistral.generate(inputs["input_ids"], **rest, max_new_tokens=3, do_sample=False)
        mistral.config.sliding_window = length - 1
        with pytest.raises(LayerError, match=f"reached {length} tokens"):
            mistral(**inputs)
    assert not mistral._forward_pre_hooks


def test_labels_use_cache_false_and_adjacent_images(toy_pair):
    model, llava = toy_pair
    rows = [[5, 6, -1, -1, 7, 8], [9, -1, 10, 11]]  # <image><image> with nothing between: one spliced run
    inputs = toy_inputs(rows)
    llava_inputs = as_llava_torch(model, inputs)
    labels = (
        inputs["input_ids"].masked_fill(inputs["input_ids"] == 3, -100).masked_fill(inputs["attention_mask"] == 0, -100)
    )
    llava_labels = llava_inputs["input_ids"].masked_fill(llava_inputs["attention_mask"] == 0, -100)
    with torch.no_grad(), vtprune.pruned(model, "divprune:20") as handle:
        expected = model(**inputs, labels=labels, use_cache=False)
        kept = [image.kept for image in handle.last_record.images]
    with torch.no_grad(), vtprune.pruned(llava, "divprune:20") as handle:
        got = llava(**llava_inputs, labels=llava_labels, use_cache=False)
        llava_kept = [image.kept for image in handle.last_record.images]
    assert len(kept) == len(llava_kept) == 3
    assert all(torch.equal(a, b) for a, b in zip(kept, llava_kept))
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-5, rtol=0)
    assert got.past_key_values is None


def test_right_padding_is_refused(toy_pair, monkeypatch):
    model, llava = toy_pair
    inputs = as_llava_torch(model, toy_inputs(ROWS))
    monkeypatch.setattr(llava.config, "tokenizer_padding_side", "right")
    with torch.no_grad(), vtprune.pruned(llava, "divprune:30"), pytest.raises(InputError, match="padding_side"):
        llava(**inputs)
    assert "prepare_inputs_labels_for_multimodal" not in vars(llava)


def test_mpt_is_refused_by_name(toy_pair):
    from llava.model.language_model.llava_mpt import LlavaMptConfig, LlavaMptForCausalLM

    tower = toy_pair[1].config.mm_vision_tower
    projector = {"mm_hidden_size": 64, "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2}
    config = LlavaMptConfig(d_model=32, n_heads=2, n_layers=1, vocab_size=64, mm_vision_tower=tower, **projector)
    with pytest.raises(UnsupportedModelError, match="MPT"):
        vtprune.prune(LlavaMptForCausalLM(config), "divprune:10")


def test_lmms_eval_llava_wrapper_is_the_backbone_and_a_sweep_runs(tmp_path, monkeypatch):
    """`--model vtprune` on a llava-torch folder runs lmms-eval's own `llava` wrapper (llava's builder, float16, its
    prompts), pruned; its baseline scores what that wrapper scores alone (given the cache-keyword fix on 5.24)."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.models.simple import llava as lmms_llava
    from lmms_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    from vtprune.harness.sweep import run_sweep

    toy = LlavaForConditionalGeneration.from_pretrained(TOY, dtype=torch.float32)
    folder = save_as_llava_torch(toy, tmp_path / "toy-llava", tokenizer=AutoTokenizer.from_pretrained(TOY))
    tasks = str(Path(__file__).resolve().parents[2] / "eval" / "tasks")
    runs = run_sweep(
        str(folder), ["vtprune_shapes"], ["divprune:16"], tmp_path / "sweep", include_path=tasks, limit=4,
        progress=False, timing_rounds=1, timing_calls=1,
    )  # fmt: skip
    baseline, pruned = (json.loads((tmp_path / "sweep" / "sweep.json").read_text())["runs"][i] for i in (0, 1))
    assert [run.schedule for run in runs] == ["none", "divprune:16"]
    assert baseline["visual_tokens_kept"] == baseline["visual_tokens_before"] == 144
    assert pruned["visual_tokens_kept"] == 16 and pruned["failed_generations"] == 0
    assert all(len(sample["kept"][0]) == 16 for sample in pruned["samples"])

    load = lmms_llava.load_pretrained_model

    def load_with_fix(*args, **kwargs):
        tokenizer, model, processor, length = load(*args, **kwargs)
        fix_cache_keyword(model)  # the plain wrapper fails every sample on transformers 5.24 without it
        return tokenizer, model, processor, length

    monkeypatch.setattr(lmms_llava, "load_pretrained_model", load_with_fix)
    plain = simple_evaluate(
        model="llava",
        model_args=f"pretrained={folder},device_map=auto",
        tasks=["vtprune_shapes"],
        task_manager=TaskManager(include_path=tasks),
        limit=4,
        bootstrap_iters=0,
        device="cpu",
    )
    assert plain["results"]["vtprune_shapes"]["accuracy,none"] == baseline["score"]


def test_toy_accuracy_benchmark_scores_alike_on_both_backends(toy_pair):
    """eval/bench_accuracy.py's rows (`--backend llava-torch`): the same predictions, hence the same accuracy."""
    from vtprune.toyvlm import load_toy_model
    from vtprune.toyvlm.benchmark import run_benchmark
    from vtprune.toyvlm.data import TEST_SEED
    from vtprune.toyvlm.model import predict
    from vtprune.toyvlm.tasks import TASKS

    model, llava = toy_pair
    processor = load_toy_model(TOY)[1]
    samples = TASKS["shapes"].make_split(TEST_SEED, 10)
    strategies = ["divprune", "fastv", "mmtok", "random"]
    rows = run_benchmark(model, processor, samples, strategies, budgets=[7], batch_size=5, oracles=False)
    llava_rows = run_benchmark(llava, processor, samples, strategies, budgets=[7], batch_size=5, oracles=False)
    assert [row.name for row in llava_rows] == ["unpruned", "divprune:7", "fastv@2:7", "mmtok:7", "random:7"]
    assert [(row.name, row.kept, row.accuracy) for row in llava_rows] == [
        (row.name, row.kept, row.accuracy) for row in rows
    ]
    assert llava_rows[0].accuracy["overall"] > llava_rows[-1].accuracy["overall"]  # pruning changes answers
    kept = []  # accuracy is coarse: the seeded draw itself must be the same
    for toy in (model, llava):
        with vtprune.pruned(toy, "random:7", tokenizer=processor) as handle:
            predict(toy, processor, samples[:5])
            kept.append([image.kept for image in handle.last_record.images])
    assert len(kept[0]) == 5 and all(torch.equal(a, b) for a, b in zip(*kept))
