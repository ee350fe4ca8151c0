"""Gemma 3 specifics the generic tests do not reach."""

import pytest
import torch

import vtprune
from vtprune.adapters import adapter_for
from vtprune.errors import LayerError
from vtprune.testing import RowSpec, build_inputs


def test_begin_and_end_of_image_tokens_are_never_question_words(models):
    # Gemma 3 names its image delimiters boi/eoi (not vision_start/end); without a tokenizer to say they are
    # special, only the adapter keeps them out of the question words text-conditioned strategies read.
    model = models("gemma3")
    special = adapter_for(model).special_token_ids()
    assert {model.config.boi_token_index, model.config.eoi_token_index} <= special


def test_a_sequence_longer_than_the_sliding_window_is_refused_not_misread(models):
    # The local layers count slots of the packed sequence: past the window, a pruned model's reach back over more
    # original tokens than the unpruned one's (the masking reference), so vtprune refuses instead of differing.
    model = models("gemma3")
    inputs = build_inputs(model, [RowSpec(images=[(1, 1)], text_before=3, text_after=6)])
    length = inputs["input_ids"].shape[1]
    text_config = model.config.get_text_config()
    assert "sliding_attention" in text_config.layer_types, "the test model must have local layers"
    window = text_config.sliding_window
    try:
        text_config.sliding_window = length - 1
        with torch.no_grad(), vtprune.pruned(model, "divprune:40%"), pytest.raises(LayerError, match="sliding window"):
            model(**inputs)
        text_config.sliding_window = length  # the prompt fits; the first decoded token does not
        with torch.no_grad(), vtprune.pruned(model, "divprune:40%"):
            model(**inputs)  # the prefill alone is exact
            with pytest.raises(LayerError, match="max_new_tokens"):
                model.generate(**inputs, max_new_tokens=3, do_sample=False)
        with torch.no_grad(), vtprune.pruned(model, "none"):
            model.generate(**inputs, max_new_tokens=3, do_sample=False)  # nothing packed: nothing to refuse
    finally:
        text_config.sliding_window = window
    assert not model._forward_pre_hooks
