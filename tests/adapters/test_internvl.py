"""InternVL specifics the generic tests do not reach."""

import torch

import vtprune
from vtprune.testing import BOS, IMAGE, PAD, VISION_END, VISION_START, RowSpec, build_inputs


def test_image_delimiters_are_never_question_words_without_a_tokenizer(models):
    # InternVL's config names only the placeholder; <img> / </img> are the tokenizer's tokens. Without a tokenizer,
    # the adapter reads them from the prompt (they flank every run of placeholders), so text-conditioned strategies
    # see the question's tokens only.
    seen = []

    @vtprune.register_strategy("test_internvl_question_probe", overwrite=True)
    class Probe(vtprune.Strategy):
        needs = frozenset({"text_embeds"})

        def select(self, ctx):
            seen.append(ctx.text_embeds)
            return torch.arange(ctx.keep)

    model = models("internvl")
    rows = [RowSpec(images=[(1, 1)], text_before=3, text_after=4), RowSpec(images=[(1, 2), (1, 1)], text_before=5)]
    inputs = build_inputs(model, rows)
    embed = model.get_input_embeddings()
    with torch.no_grad(), vtprune.pruned(model, "test_internvl_question_probe", keep=2):
        model(**inputs)
        expected = []
        for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"].bool()):
            text = [i for i in ids[mask].tolist() if i not in (PAD, BOS, IMAGE, VISION_START, VISION_END)]
            assert ids[mask].tolist().count(VISION_START) >= 1, "the prompt must carry <img> delimiters"
            expected.append(embed(torch.tensor(text)))
    # One context per tile: row 0's one tile, then row 1's four (a 1 x 2 image's two tiles and thumbnail, one more).
    assert len(seen) == 5
    for got, row in zip(seen, [0, 1, 1, 1, 1], strict=True):
        assert got.shape == expected[row].shape  # no delimiter rows among the question words
        assert torch.equal(got, expected[row])
