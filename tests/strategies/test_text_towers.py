"""CLIP text towers (``text_tower=``): tiny random-weight transformers and open_clip models, built offline."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

import vtprune
from vtprune.errors import TextTowerError
from vtprune.strategies import CDPruner, Strategy
from vtprune.strategies.registry import make_strategy
from vtprune.strategies.text_towers import load_text_tower
from vtprune.toyvlm import DEFAULT_PATH, load_toy_model, make_split, object_patch_mask
from vtprune.toyvlm.data import TEST_SEED
from vtprune.toyvlm.model import QWEN2_VL_PATH, prompt_inputs

TOY_VISION_WIDTH = 64  # the shipped toy LLaVA's CLIP tower: what its projector reads (layer -2, no CLS)
MIN_TOP1 = 0.8  # share of questions whose most relevant patch belongs to an object the question asks about

_spec = importlib.util.spec_from_file_location(
    "train_toy_text_tower", Path(__file__).parents[2] / "eval" / "train_toy_text_tower.py"
)
training = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(training)


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory) -> Path:
    """A random-weight transformers CLIP with a character-level BPE tokenizer, saved like a hub checkpoint."""
    folder = tmp_path_factory.mktemp("clip")
    tokenizer = training.char_tokenizer(folder)  # the shipped toy towers' tokenizer
    eos = tokenizer.eos_token_id
    text = {"vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
    text.update(num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=eos, pad_token_id=eos)
    vision = {"hidden_size": TOY_VISION_WIDTH, "intermediate_size": 32, "num_hidden_layers": 1}
    vision.update(num_attention_heads=2, image_size=16, patch_size=8)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_with_a_text_tower_a_strategy_needs_the_instruction_and_the_projector_inputs(hf_clip):
    for name in ("cdpruner", "trim"):
        assert make_strategy(name, text_tower=str(hf_clip)).needs == frozenset({"instruction", "pre_features"})


@pytest.fixture(scope="module")
def toy():
    return load_toy_model()


@pytest.fixture(scope="module")
def open_clip_tiny(tmp_path_factory) -> tuple[str, Path]:
    """(model name, checkpoint path) of a tiny open_clip ViT registered through ``add_model_config``."""
    import open_clip  # the "clip" extra, which the "dev" install brings

    folder = tmp_path_factory.mktemp("open_clip")
    name = "vtprune-test-tiny-vit"
    config = {
        "embed_dim": 8,
        "vision_cfg": {"image_size": 16, "layers": 1, "width": TOY_VISION_WIDTH, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
    }
    (folder / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder / f"{name}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None)
    checkpoint = folder / "tiny.pt"
    torch.save(model.state_dict(), checkpoint)
    return name, checkpoint


def test_transformers_tower_is_clips_own_text_and_image_projection(hf_clip):
    tower = load_text_tower(str(hf_clip))
    clip = CLIPModel.from_pretrained(hf_clip).eval()
    tokenizer = CLIPTokenizer.from_pretrained(hf_clip)
    with torch.no_grad():
        expected = clip.get_text_features(**tokenizer(["colour circle"], return_tensors="pt"))
        torch.testing.assert_close(tower.encode_text("colour circle"), expected.pooler_output, atol=1e-5, rtol=1e-5)
        patches = torch.randn(5, TOY_VISION_WIDTH)
        projected = clip.visual_projection(clip.vision_model.post_layernorm(patches))
        torch.testing.assert_close(tower.encode_image(patches), projected)
    assert tower.encode_text(" ".join(["circle"] * 30)).shape == (3, 8)  # 180 tokens: segments of 75
    assert tower.encode_text("").shape == (0, 8)


def test_open_clip_tower_from_a_config_and_from_a_checkpoint_path(open_clip_tiny):
    import open_clip

    name, checkpoint = open_clip_tiny
    tower = load_text_tower(f"open_clip:{name}/{checkpoint}")
    model = open_clip.create_model(name, pretrained=str(checkpoint)).eval()
    tokens = open_clip.get_tokenizer(name)(["colour circle"])
    with torch.no_grad():
        torch.testing.assert_close(tower.encode_text("colour circle"), model.encode_text(tokens))
        patches = torch.randn(4, TOY_VISION_WIDTH)
        torch.testing.assert_close(tower.encode_image(patches), model.visual.ln_post(patches) @ model.visual.proj)
    assert tower.encode_text(" ".join(["circle"] * 80)).shape[0] == 2  # 80 words: segments of 75 tokens
    random_weights = load_text_tower(f"open_clip:{name}")
    assert not torch.equal(random_weights.encode_text("circle"), tower.encode_text("circle"))


@pytest.mark.parametrize("spec", ["", "open_clip:", "/no/such/clip/folder"])
def test_bad_specs_are_refused_by_name(spec):
    with pytest.raises(TextTowerError, match="text_tower"):
        load_text_tower(spec)


def test_width_mismatch_is_refused(hf_clip):
    with pytest.raises(TextTowerError, match="64-wide"):
        load_text_tower(str(hf_clip)).encode_image(torch.randn(3, 16))


SEEN: list[tuple] = []


class Probe(Strategy):
    """Keeps the first token and records the inputs a text-tower strategy reads."""

    needs = frozenset({"instruction", "pre_features"})

    def select(self, ctx):
        SEEN.append((ctx.features, ctx.instruction, ctx.pre_features))
        return torch.arange(ctx.keep)


@pytest.mark.parametrize("tower", ["hf", "open_clip"])
def test_in_the_toy_llava_the_tower_reads_the_question_and_selects_as_select(request, toy, tower):
    spec = str(request.getfixturevalue("hf_clip"))
    if tower == "open_clip":
        name, checkpoint = request.getfixturevalue("open_clip_tiny")
        spec = f"open_clip:{name}/{checkpoint}"
    model, processor = toy
    samples = make_split(0, 2)
    inputs = prompt_inputs(processor, [s.image for s in samples], [s.question for s in samples])
    SEEN.clear()
    vtprune.register_strategy("test_text_tower_probe", overwrite=True)(Probe)
    with torch.no_grad():
        with vtprune.pruned(model, "test_text_tower_probe", keep=1, tokenizer=processor):
            model(**inputs)
        with vtprune.pruned(model, "cdpruner", keep=16, text_tower=spec, tokenizer=processor) as handle:
            model(**inputs)
    strategy = handle.schedule.input_stage.strategy
    assert isinstance(strategy, CDPruner) and len(strategy.space._towers) == 1  # loaded once for both images
    assert len(SEEN) == len(samples)
    for sample, image, (features, instruction, pre) in zip(samples, handle.last_record.images, SEEN):
        words = [w for w in sample.question.split() if w in instruction.split()]
        assert words and instruction == " ".join(words)  # the question's content words, in order
        expected = vtprune.select(
            "cdpruner", features, keep=16, instruction=instruction, pre_features=pre, text_tower=spec
        )
        assert torch.equal(image.kept, expected)


def test_a_text_tower_without_a_tokenizer_says_to_pass_one(toy, hf_clip):
    model, processor = toy
    sample = make_split(0, 1)[0]
    inputs = prompt_inputs(processor, [sample.image], [sample.question])
    with (
        vtprune.pruned(model, "trim", keep=8, text_tower=str(hf_clip)),
        pytest.raises(TextTowerError, match="tokenizer"),
    ):
        model(**inputs)


@pytest.mark.parametrize("path", [DEFAULT_PATH, QWEN2_VL_PATH], ids=["llava", "qwen2_vl"])
def test_the_shipped_toy_towers_point_at_the_objects_a_question_asks_about(path):
    # eval/train_toy_text_tower.py trained them; a random-weight tower's most relevant patch is an asked-about
    # object's for about 46 % of these questions (the objects stand out from the plain background).
    model, processor = load_toy_model(path)
    spec = str(Path(path) / "clip_text")
    samples = [s for s in make_split(TEST_SEED, 60) if any(object_patch_mask(s, relevant_only=True))]
    inputs = prompt_inputs(processor, [s.image for s in samples], [s.question for s in samples])
    SEEN.clear()
    vtprune.register_strategy("test_text_tower_probe", overwrite=True)(Probe)
    with torch.no_grad(), vtprune.pruned(model, "test_text_tower_probe", keep=1, tokenizer=processor):
        model(**inputs)
    assert len(SEEN) == len(samples) >= 40
    strategy = CDPruner(text_tower=spec)
    hits = 0
    for sample, (features, instruction, pre) in zip(samples, SEEN):
        ctx = vtprune.TokenContext(features=features, keep=1, instruction=instruction, pre_features=pre)
        hits += object_patch_mask(sample, relevant_only=True)[int(strategy.relevance(ctx).argmax())]
    assert hits / len(samples) >= MIN_TOP1
