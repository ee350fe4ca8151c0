"""vLLM with vtprune's pruning classes on the shipped toys, against vtprune's transformers path on the same weights.

One fixture per family: a stock vLLM engine answers the unpruned requests, is shut down, then one pruning
engine answers every schedule, each given per request (``mm_processor_kwargs``). The reference is vtprune's
transformers path in this same environment (LLaVA with ``renumber=True``: vLLM numbers kept tokens
contiguously; Qwen2-VL with original M-RoPE positions, as the pruning class keeps them).
"""

import copy
import dataclasses
import gc
import importlib
import os
import shutil
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from crc32_twins import crc32_twin
from PIL import Image
from transformers import (
    AutoProcessor,
    Dinov2Config,
    LlavaConfig,
    LlavaForConditionalGeneration,
    SiglipVisionConfig,
)

# Skipped where vLLM is absent (the main session); noxfile.py's vllm session sets VTPRUNE_REQUIRE_VLLM, so a
# broken vLLM install fails there instead of passing as skipped.
vllm = importlib.import_module("vllm") if os.environ.get("VTPRUNE_REQUIRE_VLLM") else pytest.importorskip("vllm")

import vtprune
from vtprune.engine.question_words import QuestionTokens
from vtprune.errors import UnsupportedModelError
from vtprune.toyvlm import build_prompt, load_toy_model, make_split
from vtprune.toyvlm.model import DEFAULT_PATH, QWEN2_VL_PATH, image_placeholder, save_for_stock_vllm
from vtprune.vllm import SCHEDULE_KEY, UnsupportedScheduleError, engine_args
from vtprune.vllm.plan import ImageItem, Selections, cls_refusal, image_digest, image_seed
from vtprune.vllm.pruning import PruningModel

SAMPLES = make_split(0, 8)
#: Schedules whose kept sets the transformers path reproduces (random is seeded differently there).
COMPARED = ("uniform:25%", "matryoshka:16")
#: Not in COMPARED: the toys' identical cells are exact duplicate tokens, so DivPrune's greedy meets exact ties, and
#: which duplicate wins follows the features' last bits, which vLLM's kernels and transformers' do not share. On the
#: toys its kept sets are compared with vtprune's selection run on vLLM's own features; across the runtimes it is
#: compared on NOISE, images of random pixels, whose tokens are all distinct (no ties).
DIVPRUNE = "divprune:16"
NOISE = [
    dataclasses.replace(
        sample,
        image=Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*sample.image.size, 3), dtype=np.uint8)),
    )
    for seed, sample in enumerate(SAMPLES[:3])
]
RANDOM = "random:10"
#: mmtok reads the question: one noise image (no ties) asked two different questions, sent in one batch.
MMTOK = "mmtok:16"
ASKED_TWICE = [dataclasses.replace(NOISE[0], question=SAMPLES[index].question) for index in (0, 2)]
#: ToDRE reads the CLIP tower's [CLS] attention (LLaVA; Qwen's tower has none: its fallback on both paths).
TODRE = "todre:16"
NEW_TOKENS = 3
#: vLLM's CPU kernels against transformers' SDPA, float32: the prototype measured < 1e-4.
LOGPROB_TOLERANCE = 1e-4


@contextmanager
def engine(**kwargs):
    from vllm import LLM

    llm = LLM(
        **kwargs, max_model_len=512, enforce_eager=True, dtype="float32", seed=0, limit_mm_per_prompt={"image": 1}
    )
    try:
        yield llm
    finally:
        # Shut the in-process engine core down now (it tears down vLLM's process-global distributed state);
        # left to the garbage collector, it would do so later, in the middle of the next engine's life.
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def generate(llm, processor, schedule=None, samples=SAMPLES):
    """(answers, first-token ids, first-token log-probs) for ``samples``, in one batch; ``schedule`` may be a list
    (one per sample)."""
    schedules = schedule if isinstance(schedule, list) else [schedule] * len(samples)
    requests = [
        {
            "prompt": build_prompt(s.question, processor),
            "multi_modal_data": {"image": s.image},
            **({} if each is None else {"mm_processor_kwargs": {SCHEDULE_KEY: each}}),
        }
        for s, each in zip(samples, schedules)
    ]
    outputs = llm.generate(requests, vllm.SamplingParams(max_tokens=NEW_TOKENS, temperature=0, logprobs=1))
    answers = [o.outputs[0].text.strip() for o in outputs]
    first = [o.outputs[0].token_ids[0] for o in outputs]
    logprobs = [o.outputs[0].logprobs[0][t].logprob for o, t in zip(outputs, first)]
    return answers, first, logprobs


def transformers_path(model, processor, schedule, renumber, samples=SAMPLES, tokenizer=None):
    """Per sample: (answer, first-token id, its log-prob, kept indices or None) from vtprune's hooks."""
    rows = []
    for s in samples:
        inputs = processor(images=[s.image], text=[build_prompt(s.question, processor)], return_tensors="pt")
        kwargs = {"max_new_tokens": NEW_TOKENS, "do_sample": False, "output_scores": True}
        if schedule is None:
            out, kept = model.generate(**inputs, **kwargs, return_dict_in_generate=True), None
        else:
            with vtprune.pruned(model, schedule, renumber=renumber, tokenizer=tokenizer) as handle:
                out = model.generate(**inputs, **kwargs, return_dict_in_generate=True)
            kept = handle.last_record.images[0].kept.tolist()
        new = out.sequences[0, inputs["input_ids"].shape[1] :]
        first = int(new[0])
        logprob = float(torch.log_softmax(out.scores[0][0].float(), -1)[first])
        rows.append((processor.decode(new, skip_special_tokens=True).strip(), first, logprob, kept))
    return rows


def model_images(processor, family, samples):
    """Each sample's image as vLLM's model receives it: Qwen2-VL normalises on the device in vLLM
    (mm_device_do_normalize), so its processor runs without rescale and normalisation there."""
    raw = {"do_rescale": False, "do_normalize": False} if family == "qwen2_vl" else {}
    return [processor.image_processor(images=[s.image], return_tensors="pt", **raw) for s in samples]


def pixels_of(family, image):
    """(pixels, patch grid or None) of one processed image as the pruning class receives them (LLaVA's pixels are
    (1, 3, H, W) per image, without a grid; Qwen's (patches, C) are the image's own rows already)."""
    if family == "llava":
        return image["pixel_values"][0], None
    return image["pixel_values"], image["image_grid_thw"][0]


def pixel_keys(family, images):
    """The digest the pruning class files each image's selection under (of its pixels, and of Qwen's patch grid)."""
    return [image_digest(*pixels_of(family, image)) for image in images]


@torch.inference_mode()
def unpruned_features(model, family, image):
    """One image's projected tokens as vLLM's model computes them, alone (the LLaVA class returns them unpruned
    when no schedule comes with the image; Qwen's selects on its vision tower's output for one image)."""
    if family == "llava":
        return model.embed_multimodal(pixel_values=image["pixel_values"])[0].cpu()
    return model.visual(image["pixel_values"].to(model.visual.dtype), grid_thw=image["image_grid_thw"]).cpu()


def count_encoded_images(model):
    """From now on, count in ``model.encoded_images`` the images the model's vision tower encodes (Qwen's tower takes
    all images' patches in one flat tensor, with one grid_thw row per image; LLaVA's one image per row)."""
    model.encoded_images = 0
    tower = model.visual if hasattr(model, "visual") else model.vision_tower

    def count(module, args, kwargs, output):
        grid = kwargs.get("grid_thw")
        model.encoded_images += len(args[0]) if grid is None else len(grid)

    tower.register_forward_hook(count, with_kwargs=True)


def encoded_images(model):
    """(images encoded since count_encoded_images, rows the Qwen class still holds for an embedding step)."""
    return model.encoded_images, model.vtprune_pruned_rows.total if hasattr(model, "vtprune_pruned_rows") else 0


@pytest.fixture(scope="module", params=["llava", "qwen2_vl"])
def toy(request, tmp_path_factory):
    """Everything the tests compare, for one family: stock vLLM, the pruning class per schedule, the reference."""
    family = request.param
    path = DEFAULT_PATH if family == "llava" else QWEN2_VL_PATH
    model, _ = load_toy_model(path)
    # The processor vLLM's front-end builds for the checkpoint (its default image backend), not the toy loader's
    # pinned one, so that both paths see the same pixels.
    processor = AutoProcessor.from_pretrained(path)
    stock_path = save_for_stock_vllm(tmp_path_factory.mktemp("stock") / "toy") if family == "llava" else path
    with engine(model=str(stock_path)) as llm:
        stock = generate(llm, processor)
    results, kept = {}, {}
    with engine(**engine_args(str(path))) as llm:
        # First, while no image is in vLLM's caches: one encoder batch with and without a schedule.
        mixed = [DIVPRUNE, None] * (len(SAMPLES) // 2)
        results["mixed"] = generate(llm, processor, mixed)
        for schedule in (None, "divprune:144", DIVPRUNE) + COMPARED + (RANDOM,):
            results[schedule] = generate(llm, processor, schedule)
        llm.apply_model(count_encoded_images)
        results["noise"] = generate(llm, processor, DIVPRUNE, NOISE)  # new images: in none of vLLM's caches
        encoded = llm.apply_model(encoded_images)[0]
        results["mmtok"] = generate(llm, processor, MMTOK, ASKED_TWICE)
        results["todre"] = generate(llm, processor, TODRE, NOISE)
        cls_rows = llm.apply_model(lambda m: len(m.vtprune_cls_rows))[0]
        kept = llm.apply_model(lambda m: dict(m.vtprune_selections.kept))[0]
        with pytest.raises(UnsupportedScheduleError, match="inside the decoder") as refused:
            generate(llm, processor, "fastv@2:50%")
        images = model_images(processor, family, SAMPLES)
        features = llm.apply_model(lambda m: [unpruned_features(m, family, image) for image in images])[0]
    renumber = family == "llava"
    reference = {schedule: transformers_path(model, processor, schedule, renumber) for schedule in (None,) + COMPARED}
    reference["noise"] = transformers_path(model, processor, DIVPRUNE, renumber, NOISE)
    reference["mmtok"] = transformers_path(model, processor, MMTOK, renumber, ASKED_TWICE, tokenizer=processor)
    reference["todre"] = transformers_path(model, processor, TODRE, renumber, NOISE)
    return {
        "family": family,
        "path": path,
        "cls_rows": cls_rows,
        "stock": stock,
        "results": results,
        "kept": kept,
        "reference": reference,
        "keys": pixel_keys(family, images),
        "seeds": [image_seed(pixels_of(family, image)[0]) for image in images],
        "noise_keys": pixel_keys(family, model_images(processor, family, NOISE)),
        "refused": str(refused.value),
        "mixed": mixed,
        "features": features,
        "encoded": encoded,
    }


def test_keep_all_equals_stock_vllm(toy):
    stock_answers, stock_first, stock_logprobs = toy["stock"]
    for schedule in (None, "divprune:144"):
        answers, first, logprobs = toy["results"][schedule]
        assert answers == stock_answers and first == stock_first
        assert logprobs == pytest.approx(stock_logprobs, abs=1e-6)


def test_stock_vllm_matches_the_unpruned_transformers_path(toy):
    answers, first, logprobs = toy["stock"]
    reference = toy["reference"][None]
    assert answers == [row[0] for row in reference]
    assert first == [row[1] for row in reference]
    assert logprobs == pytest.approx([row[2] for row in reference], abs=LOGPROB_TOLERANCE)


@pytest.mark.parametrize("schedule", COMPARED)
def test_kept_sets_answers_and_logprobs_equal_the_transformers_path(toy, schedule):
    answers, first, logprobs = toy["results"][schedule]
    reference = toy["reference"][schedule]
    assert len(reference) == len(SAMPLES)
    for key, row in zip(toy["keys"], reference):
        kept, _ = toy["kept"][(schedule, key, ())]
        assert kept.tolist() == row[3]
    assert answers == [row[0] for row in reference]
    assert first == [row[1] for row in reference]
    assert logprobs == pytest.approx([row[2] for row in reference], abs=LOGPROB_TOLERANCE)
    # Pruning changes what the model sees: at least one first-token log-prob moves (the test can fail).
    assert logprobs != pytest.approx(toy["stock"][2], abs=1e-3)


def test_divprune_keeps_what_vtprunes_selection_keeps_on_vllms_features(toy):
    for key, features in zip(toy["keys"], toy["features"], strict=True):
        assert features.shape[0] == 144
        kept, _ = toy["kept"][(DIVPRUNE, key, ())]
        assert kept.tolist() == vtprune.select("divprune", features, keep=16).tolist()


def test_divprune_without_ties_keeps_and_answers_as_the_transformers_path(toy):
    answers, first, logprobs = toy["results"]["noise"]
    reference = toy["reference"]["noise"]
    assert len(reference) == len(NOISE) == len(toy["noise_keys"])
    for key, row in zip(toy["noise_keys"], reference):
        kept, _ = toy["kept"][(DIVPRUNE, key, ())]
        assert kept.tolist() == row[3]
    assert answers == [row[0] for row in reference]
    assert first == [row[1] for row in reference]
    assert logprobs == pytest.approx([row[2] for row in reference], abs=LOGPROB_TOLERANCE)


def test_each_new_pruned_image_passes_the_vision_tower_once(toy):
    """Qwen2-VL's class selects when vLLM computes the M-RoPE positions, before the embedding step: the rows it
    reduced there are the ones the embedding step returns, without encoding the image again; once taken, it holds
    them no more."""
    encoded, held = toy["encoded"]
    assert encoded == len(NOISE)
    assert held == 0


def test_a_pruned_image_in_the_prefix_cache_keeps_its_positions():
    """vLLM strips the data of an image the prefix cache covers, all but the grid that positions are computed from:
    the same request again must get the positions, answers and log-probs it got the first time (it got the
    unpruned image's positions for the pruned run before)."""
    sample = SAMPLES[0]
    processor = AutoProcessor.from_pretrained(QWEN2_VL_PATH)
    # The image first and text after it (the toy's own prompt asks first), so that whole cache blocks cover it.
    prompt = f"{image_placeholder(processor)} {' '.join([sample.question] * 12)} answer :"
    request = {
        "prompt": prompt,
        "multi_modal_data": {"image": sample.image},
        "mm_processor_kwargs": {SCHEDULE_KEY: "uniform:25%"},
    }
    params = vllm.SamplingParams(max_tokens=NEW_TOKENS, temperature=0, logprobs=1)
    with engine(**engine_args(str(QWEN2_VL_PATH)), enable_prefix_caching=True, block_size=32) as llm:
        first, again = (llm.generate([request], params)[0] for _ in range(2))
        remembered = llm.apply_model(lambda m: len(m.vtprune_positioned.kept))[0]
    assert first.num_cached_tokens == 0 and again.num_cached_tokens >= 64 and remembered == 1
    assert again.outputs[0].token_ids == first.outputs[0].token_ids

    def logprobs(output):
        return [output.outputs[0].logprobs[i][token].logprob for i, token in enumerate(output.outputs[0].token_ids)]

    assert logprobs(again) == pytest.approx(logprobs(first), abs=1e-5)


def test_random_is_seeded_by_the_pixels(toy):
    for key, seed in zip(toy["keys"], toy["seeds"], strict=True):
        kept, _ = toy["kept"][(RANDOM, key, ())]
        assert torch.equal(kept, vtprune.select("random", torch.zeros(144, 1), keep=10, seed=seed))
    draws = {tuple(toy["kept"][(RANDOM, key, ())][0].tolist()) for key in toy["keys"]}
    assert len(draws) > 1  # different images, different draws


def test_images_that_share_a_seed_keep_their_own_selections():
    """Two different images whose pixels share a CRC32, the seed of their draws (crafted here; among 77,000 images two
    share one with even odds): each keeps what DivPrune keeps on its own tokens, not the other's remembered set."""
    pixels = torch.rand(3, 12, 12)
    twin = crc32_twin(pixels)
    assert image_seed(pixels) == image_seed(twin)
    model = SimpleNamespace(vtprune_selections=Selections(), _vtprune_selection_features=lambda rows: rows)
    generator = torch.Generator().manual_seed(0)
    chosen = []
    for image in (pixels, twin):
        features = torch.rand(144, 8, generator=generator)
        item = ImageItem(DIVPRUNE, image, torch.zeros(0, dtype=torch.long), None)
        kept, _ = PruningModel._vtprune_choose(model, item, features, (1, 12, 12))
        assert kept.tolist() == vtprune.select("divprune", features, keep=16).tolist()
        chosen.append(kept.tolist())
    assert chosen[0] != chosen[1] and len(model.vtprune_selections.kept) == 2


def test_mmtok_selects_per_question_as_the_transformers_path(toy):
    """One image, two questions, one batch: vLLM's caches keep the two apart (the question words enter the image's
    hash), and each selection is the transformers path's for its question."""
    answers, first, logprobs = toy["results"]["mmtok"]
    reference = toy["reference"]["mmtok"]
    processor = AutoProcessor.from_pretrained(toy["path"])
    words = QuestionTokens(processor.tokenizer.all_special_ids, processor.tokenizer)
    image = toy["noise_keys"][0]
    chosen = []
    for sample, row in zip(ASKED_TWICE, reference, strict=True):
        ids = processor.tokenizer(build_prompt(sample.question, processor))["input_ids"]
        question = tuple(words.select(torch.tensor(ids)).tolist())
        assert len(question) >= 2
        kept, _ = toy["kept"][(MMTOK, image, question)]
        assert kept.tolist() == row[3]
        chosen.append(row[3])
    assert chosen[0] != chosen[1]
    assert answers == [row[0] for row in reference]
    assert first == [row[1] for row in reference]
    assert logprobs == pytest.approx([row[2] for row in reference], abs=LOGPROB_TOLERANCE)


def test_todre_without_a_cls_attention_keeps_and_answers_as_the_transformers_path(toy):
    """Neither toy has a [CLS] attention to read (Qwen2-VL's tower has no [CLS]; the toy LLaVA's projector reads
    the output of CLIP layer -2, which with its one layer is the patch embeddings): ToDRE's fallback on both paths.
    The [CLS] case: test_todre_reads_the_cls_attention_as_the_transformers_path."""
    assert toy["cls_rows"] == 0
    answers, first, logprobs = toy["results"]["todre"]
    reference = toy["reference"]["todre"]
    assert len(reference) == len(NOISE)
    for key, row in zip(toy["noise_keys"], reference, strict=True):
        kept, _ = toy["kept"][(TODRE, key, ())]
        assert kept.tolist() == row[3]
    assert answers == [row[0] for row in reference]
    assert first == [row[1] for row in reference]
    assert logprobs == pytest.approx([row[2] for row in reference], abs=LOGPROB_TOLERANCE)


def test_decoder_stage_schedules_are_refused_per_request(toy):
    assert "paged KV cache" in toy["refused"]


def test_requests_with_and_without_a_schedule_batch_together(toy):
    for index, schedule in enumerate(toy["mixed"]):
        alone = toy["results"][schedule]
        assert [part[index] for part in toy["results"]["mixed"][:2]] == [part[index] for part in alone[:2]]
    assert None in toy["mixed"] and DIVPRUNE in toy["mixed"]


def deeper_clip_toy(folder, feature_layer=-2):
    """The toy LLaVA with a 3-layer CLIP tower (its trained layer, then two random ones): the projector reads layer
    1's output (``feature_layer`` -2, or 2 counted from the embeddings), so ToDRE has a [CLS] attention to read.
    Layer 1's query and key weights are scaled up so that its [CLS] row is far from uniform (no near-ties between
    the two runtimes' rounding)."""
    shutil.copytree(DEFAULT_PATH, folder)
    toy, _ = load_toy_model(DEFAULT_PATH)
    config = copy.deepcopy(toy.config)
    config.vision_config.num_hidden_layers = 3
    config.vision_feature_layer = feature_layer
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(toy.state_dict(), strict=False)
    assert not unexpected and missing and all(".layers.1." in name or ".layers.2." in name for name in missing)
    tower = model.model.vision_tower
    attention = getattr(tower, "vision_model", tower).encoder.layers[1].self_attn
    with torch.no_grad():
        attention.q_proj.weight.mul_(20)
        attention.k_proj.weight.mul_(20)
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("feature_layer", [-2, 2])
def test_todre_reads_the_cls_attention_as_the_transformers_path(tmp_path, feature_layer):
    """vLLM's CLIP attention returns no weights: the pruning class recomputes the [CLS] row from the layer's own
    projections, one row per image of the batch; kept sets, answers and log-probs equal the transformers path's,
    with the projector's layer counted from the end or from the embeddings (vLLM builds the tower up to it)."""
    folder = deeper_clip_toy(tmp_path / "toy", feature_layer)
    model, _ = load_toy_model(folder)
    processor = AutoProcessor.from_pretrained(folder)
    samples = NOISE[:2]
    with engine(**engine_args(str(folder))) as llm:
        answers, first, logprobs = generate(llm, processor, TODRE, samples)
        kept, cls_rows = llm.apply_model(lambda m: (dict(m.vtprune_selections.kept), len(m.vtprune_cls_rows)))[0]
    assert cls_rows == len(samples)
    reference = transformers_path(model, processor, TODRE, True, samples)
    keys = pixel_keys("llava", model_images(processor, "llava", samples))
    for key, row in zip(keys, reference, strict=True):
        assert kept[(TODRE, key, ())][0].tolist() == row[3]
    assert answers == [row[0] for row in reference]
    assert first == [row[1] for row in reference]
    assert logprobs == pytest.approx([row[2] for row in reference], abs=LOGPROB_TOLERANCE)


def test_todre_on_a_llava_whose_cls_row_cannot_rank_its_tokens_is_refused_per_request():
    """Several feature layers side by side (vLLM's LLaVA builds the tower up to the deepest, and the toy's
    projector takes its output): no one layer's [CLS] row ranks the tokens, so a request whose schedule reads it
    fails at generate(), as the transformers path fails at prune(); the engine serves the others."""
    args = engine_args(str(DEFAULT_PATH))
    args["hf_overrides"]["vision_feature_layer"] = [-2, -1]
    processor = AutoProcessor.from_pretrained(DEFAULT_PATH)
    with engine(**args) as llm:
        with pytest.raises(UnsupportedModelError, match=r"'todre:16' reads .*vision_feature_layer=\[-2, -1\]: several"):
            generate(llm, processor, TODRE, SAMPLES[:1])
        answers, _, _ = generate(llm, processor, DIVPRUNE, SAMPLES[:1])
        kept = llm.apply_model(lambda m: dict(m.vtprune_selections.kept))[0]
    assert len(answers) == 1
    assert [len(indices) for indices, _ in kept.values()] == [16]


def test_which_llavas_the_vllm_class_refuses_to_rank_with_a_cls_row():
    toy, _ = load_toy_model(DEFAULT_PATH)
    assert cls_refusal(toy.config) is None  # CLIP, one feature layer: its row (the toy's: no layer, the fallback)
    several = copy.deepcopy(toy.config)
    several.vision_feature_layer = [-2, -1]
    assert "vLLM's LLaVA projects only the deepest" in cls_refusal(several)
    unknown = LlavaConfig(vision_config=Dinov2Config(), text_config=toy.config.text_config)
    assert "this LLaVA's tower is 'dinov2'" in cls_refusal(unknown)
    siglip = LlavaConfig(vision_config=SiglipVisionConfig(), text_config=toy.config.text_config)
    siglip.vision_feature_layer = [-2, -1]
    assert cls_refusal(siglip) is None  # no [CLS] token: ToDRE's declared fallback
