"""Gemma 3 specifics the generic tests do not reach."""

from vtprune.adapters import adapter_for


def test_begin_and_end_of_image_tokens_are_never_question_words(models):
    # Gemma 3 names its image delimiters boi/eoi (not vision_start/end); without a tokenizer to say they are
    # special, only the adapter keeps them out of the question words text-conditioned strategies read.
    model = models("gemma3")
    special = adapter_for(model).special_token_ids()
    assert {model.config.boi_token_index, model.config.eoi_token_index} <= special
