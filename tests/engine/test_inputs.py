"""What the engine hands strategies that ask for extra inputs (question embeddings, pre-projector features)."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import vtprune
from vtprune.engine.question_words import QuestionTokens
from vtprune.testing import IMAGE


def probe(name: str, seen: list):
    @vtprune.register_strategy(name, overwrite=True)
    class Probe(vtprune.Strategy):
        needs = frozenset({"text_embeds", "pre_features"})

        def select(self, ctx):
            seen.append((ctx.text_embeds, ctx.pre_features, ctx.num_tokens))
            return torch.arange(ctx.keep)

    return name


@pytest.mark.parametrize(
    "kind, pre_width",
    [("llava", 16), ("llava_next", 16), ("qwen2_vl", 4 * 16), ("qwen2_5_vl", 4 * 16), ("qwen3_vl", 4 * 16)],
)
def test_question_embeddings_and_pre_projector_features(models, make_inputs, kind, pre_width):
    seen = []
    model = models(kind)
    inputs = make_inputs(model, kind, 3)
    with torch.no_grad(), vtprune.pruned(model, probe("test_input_probe", seen), keep=1):
        model(**inputs)
        from_forward = list(seen)
        seen.clear()
        model.generate(**inputs, max_new_tokens=1)
    assert len(seen) == len(from_forward)
    for (text, pre, n), (text_gen, pre_gen, _) in zip(from_forward, seen, strict=True):
        assert torch.equal(text, text_gen)
        if pre_width is None:
            assert pre is None and pre_gen is None
        else:
            assert pre.shape == (n, pre_width) and torch.equal(pre, pre_gen)
    # Row 0's question words: its real text tokens without specials (no tokenizer given).
    ids = inputs["input_ids"][0][inputs["attention_mask"][0].bool()]
    special = vtprune.adapters.adapter_for(model).special_token_ids()
    words = torch.tensor([i for i in ids.tolist() if i not in special])
    expected = model.get_input_embeddings()(words).float()
    assert torch.equal(from_forward[0][0], expected)


@pytest.mark.parametrize("kind", ["llava", "llava_next", "qwen2_5_vl", "qwen3_vl"])
def test_pre_features_are_what_the_projector_read(models, make_inputs, kind):
    """Through the model's own projector (a float32 copy), the pre-features give back the tokens the
    LLM receives — after AnyRes packing and Qwen2.5-VL's window reordering alike."""
    model = models(kind)
    inputs = make_inputs(model, kind, 3)
    seen = []
    adapter = vtprune.adapters.adapter_for(model)
    with torch.no_grad(), vtprune.pruned(model, probe("test_input_probe_projector", seen), keep=1):
        model(**inputs)
        encoded = adapter.encode(dict(inputs))["mm_encoder_outputs"]["image"].pooler_output
        newline = adapter.newline_embedding()
        assert len(encoded) == 3  # row 0's image and row 1's two; Qwen's row 2 is a video, seen after them
        for (_, pre, _), tokens in zip(seen[: len(encoded)], encoded, strict=True):
            real = torch.ones(len(tokens), dtype=torch.bool) if newline is None else ~(tokens == newline).all(-1)
            torch.testing.assert_close(adapter.projector()(pre)[real], tokens.float()[real], atol=1e-5, rtol=1e-5)


def test_stop_words_and_instructions_are_dropped_with_a_tokenizer():
    words = [
        "<pad>",
        "<s>",
        "<image>",
        "what",
        "colour",
        "is",
        "the",
        "circle",
        "?",
        "answer",
        "using",
        "a",
        "single",
        "word",
    ]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>")
    ids = torch.tensor(tokenizer("<s> what colour is the <image> circle ? answer using a single word")["input_ids"])
    chosen = QuestionTokens({words.index("<image>")}, tokenizer).select(ids)
    assert tokenizer.convert_ids_to_tokens(chosen.tolist()) == ["colour", "circle"]
    without = QuestionTokens({words.index("<image>")}).select(ids)
    assert IMAGE not in without.tolist() and len(without) == len(ids) - 1


@pytest.mark.parametrize("kind", ["llava", "qwen3_vl", "llava_next"])
def test_mmtok_in_the_model_selects_what_select_gives_on_the_same_inputs(models, make_inputs, kind):
    seen = []
    model = models(kind)
    inputs = make_inputs(model, kind, 3)
    with torch.no_grad(), vtprune.pruned(model, probe("test_input_probe_mmtok", seen), keep=1):
        model(**inputs)
    with torch.no_grad(), vtprune.pruned(model, "mmtok", keep_ratio=0.25) as handle:
        model.generate(**inputs, max_new_tokens=1)
        adapter = vtprune.adapters.adapter_for(model)
        encoded = adapter.encode(dict(inputs))["mm_encoder_outputs"]
    items = [
        (image, output)
        for modality, output in encoded.items()
        for image in handle.last_record.images
        if image.modality == modality
    ]
    per_modality_index: dict = {}
    for image, output in items:
        index = per_modality_index.setdefault(image.modality, 0)
        per_modality_index[image.modality] += 1
        features = output.pooler_output[index]
        text, pre, _ = seen[handle.last_record.images.index(image)]
        expected = vtprune.select("mmtok", features, keep_ratio=0.25, text_embeds=text, pre_features=pre)
        assert torch.equal(image.kept, expected)
