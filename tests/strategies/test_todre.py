"""ToDRE: diversity from a [CLS] pivot before the LLM, and dropping all visual tokens deep in the decoder."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import final_keep, kept_logits, reference
from transformers import CLIPVisionConfig, Dinov2Config, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import vtprune
from vtprune.engine.attention import cls_attention, cls_attention_of, cross_modal_shares
from vtprune.errors import InputError, UnsupportedModelError
from vtprune.strategies import ToDRE, ToDRERelevance
from vtprune.strategies.base import TokenContext
from vtprune.strategies.diversity import cosine_distances, cosine_similarities


def features(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 40), d=st.integers(2, 12), seed=st.integers(0, 10_000), data=st.data())
def test_k_center_starts_at_the_pivot_and_goes_farthest(n, d, seed, data):
    keep = data.draw(st.integers(1, n))
    x = features(n, d, seed)
    pivot = data.draw(st.integers(0, n - 1))
    attention = torch.zeros(n)
    attention[pivot] = 1.0
    order = ToDRE().order(TokenContext(features=x, keep=keep, cls_attention=attention))
    assert order[0] == pivot and len(set(order.tolist())) == keep
    dist = cosine_distances(x)
    for step in range(1, keep):
        chosen = order[:step]
        to_set = dist[:, chosen].min(dim=1).values
        to_set[chosen] = -torch.inf
        assert order[step] == int(to_set.argmax())
    longer = ToDRE().order(TokenContext(features=x, keep=n, cls_attention=attention))
    assert torch.equal(longer[:keep], order)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 40), d=st.integers(2, 12), seed=st.integers(0, 10_000), data=st.data())
def test_max_sum_adds_the_least_similar_to_the_set(n, d, seed, data):
    keep = data.draw(st.integers(1, n))
    x = features(n, d, seed)
    attention = torch.rand(n, generator=torch.Generator().manual_seed(seed))
    order = ToDRE(method="max-sum").order(TokenContext(features=x, keep=keep, cls_attention=attention))
    assert order[0] == int(attention.argmax())
    similarity = cosine_similarities(x)
    for step in range(1, keep):
        chosen = order[:step]
        sums = similarity[:, chosen].sum(dim=1)
        sums[chosen] = torch.inf
        assert order[step] == int(sums.argmin())


def test_without_cls_the_pivot_is_the_most_isolated_token():
    x = features(30, 6, 1)
    order = ToDRE().order(TokenContext(features=x, keep=5))
    assert torch.equal(order, vtprune.strategies.DivPrune().order(TokenContext(features=x, keep=5)))
    with pytest.raises(ValueError, match="method"):
        ToDRE(method="greedy")


def test_relevance_keeps_all_or_nothing():
    x = features(8, 4, 0)
    below = TokenContext(features=x, keep=8, cross_shares=torch.tensor([0.05, 0.09]))
    mixed = TokenContext(features=x, keep=8, cross_shares=torch.tensor([0.05, 0.2]))
    assert ToDRERelevance().select(below).numel() == 0
    assert ToDRERelevance().select(mixed).tolist() == list(range(8))
    assert ToDRERelevance(tau=0.01).select(below).numel() == 8
    assert ToDRERelevance().default_layer(32) == 29  # checks layer 28 (floor(7L/8)), drops from 29


def test_cls_attention_equals_the_vision_towers_own_weights(models, make_inputs):
    model = models("llava", attn_implementation="eager")
    inputs = make_inputs(model, "llava", 3)
    attn = vtprune.adapters.adapter_for(model).cls_attention_layer()
    captured = {}

    def capture(module, args, kwargs, output):
        captured["hidden_states"] = kwargs["hidden_states"]
        captured["ours"] = cls_attention(module, kwargs["hidden_states"])
        captured["eager"] = output[1][:, :, 0, 1:].float().mean(dim=1)

    hook = attn.register_forward_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            model.model.vision_tower(inputs["pixel_values"], output_attentions=True)
    finally:
        hook.remove()
    torch.testing.assert_close(captured["ours"], captured["eager"], atol=1e-6, rtol=0)
    # vLLM's CLIP attention projects q, k and v in one fused matrix: its chunks (not contiguous) give the same row.
    hidden_states = captured["hidden_states"]
    fused = torch.cat([attn.q_proj(hidden_states), attn.k_proj(hidden_states), attn.v_proj(hidden_states)], dim=-1)
    query, keys, _ = fused.chunk(3, dim=-1)
    assert not keys.is_contiguous()
    from_fused = cls_attention_of(query[:, :1], keys, attn.num_heads, attn.scale)
    torch.testing.assert_close(from_fused, captured["eager"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["llava_next", "qwen3_vl"])
def test_cross_modal_shares_equal_eager_attention(models, make_inputs, kind):
    model = models(kind, attn_implementation="eager")
    inputs = make_inputs(model, kind, 3)
    layer = model.model.language_model.layers[2]
    captured = {}
    valid = inputs["attention_mask"].bool()
    visual = (inputs["input_ids"] == 2) | (inputs["input_ids"] == 3)

    def capture(module, args, kwargs, output):
        captured["ours"] = cross_modal_shares(
            module, kwargs["hidden_states"], kwargs["position_embeddings"], valid, visual
        )
        captured["weights"] = output[1].float().mean(dim=1)  # (B, L, L)

    hook = layer.self_attn.register_forward_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs, output_attentions=True)
    finally:
        hook.remove()
    probs = captured["weights"]
    text, vis = ~visual & valid, visual & valid
    text_to_visual = ((probs * vis[:, None]).sum(-1) * text).sum(-1) / text.sum(-1)
    visual_to_text = ((probs * text[:, None]).sum(-1) * vis).sum(-1) / vis.sum(-1).clamp(min=1)
    expected = torch.stack([text_to_visual, visual_to_text], dim=1)
    torch.testing.assert_close(captured["ours"], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["llava", "llava_onevision", "qwen2_vl", "qwen3_vl"])
def test_two_stage_todre_equals_masking_reference(models, make_inputs, kind):
    """tau 1.0 always drops: every visual token disappears from layer 2 on, for prefill and decoding."""
    model = models(kind)
    inputs = make_inputs(model, kind, 3)
    with torch.no_grad(), vtprune.pruned(model, "todre:50%+todre_relevance@2(tau:1.0)") as handle:
        pruned_logits = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    record = handle.last_record
    assert record.visual_tokens()["layer 2"] == 0
    for expected, got in kept_logits(reference(model, inputs, record), final_keep(inputs, record), pruned_logits):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    if kind != "qwen3_vl":  # the reference decodes without a cache, which Qwen3-VL's generate() lacks
        assert torch.equal(tokens, reference(model, inputs, record, generate_tokens=3))


def test_llava_pivot_comes_from_cls_attention_even_with_beams(models, make_inputs):
    model = models("llava")
    inputs = make_inputs(model, "llava", 3)
    with torch.no_grad(), vtprune.pruned(model, "todre", keep=4) as handle:
        model(**inputs)
        first = handle.last_record
        single = [image.kept.tolist() for image in first.images]
        cls = handle.capture.cls_attention
        model.generate(**inputs, max_new_tokens=2, num_beams=2)
        beams = handle.last_record
    for row in range(6):  # beam rows 2r and 2r+1 belong to sample r
        assert [im.kept.tolist() for im in beams.for_row(row)] == [im.kept.tolist() for im in first.for_row(row // 2)]
    # The pivot (the first pick) is the [CLS]'s favourite patch, so it is among the kept tokens.
    assert all(int(cls[i].argmax()) in kept for i, kept in enumerate(single))


#: A vision tower of 16 patches (16 px images, 4 px patches).
TOWER = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "image_size": 16, "patch_size": 4}


def tiny_llava(vision, **options) -> LlavaForConditionalGeneration:
    text = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, pad_token_id=0
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=2, **options)
    return LlavaForConditionalGeneration(config).eval()


def tiny_clip_llava(tower_layers: int, **options) -> LlavaForConditionalGeneration:
    return tiny_llava(CLIPVisionConfig(**TOWER, num_hidden_layers=tower_layers), **options)


def image_prompt(tokens: int) -> torch.Tensor:
    return torch.tensor([[7, 8] + [2] * tokens + [9]])


def test_features_read_before_any_vision_attention_fall_back_to_the_isolated_pivot():
    # A one-layer CLIP tower read at vision_feature_layer=-2 gives the patch embeddings: no [CLS]
    # attention precedes them, so ToDRE uses its documented no-[CLS] pivot instead of failing.
    model = tiny_clip_llava(1, vision_feature_layer=-2)
    with torch.no_grad(), vtprune.pruned(model, "todre", keep=4) as handle:
        model(input_ids=image_prompt(16), pixel_values=torch.randn(1, 3, 16, 16))
        assert handle.capture.cls_attention is None  # read before remove() clears it
    assert handle.last_record.images[0].kept.numel() == 4


@pytest.mark.parametrize("where", ["config", "call"])
def test_a_cls_token_among_the_image_tokens_is_refused_for_todre(where):
    # vision_feature_select_strategy "full" (in the config or passed to the call): the image's 17 tokens are the
    # [CLS] token and its 16 patches, which the [CLS] row ranks; the row does not rank the image's tokens.
    in_config = {"vision_feature_select_strategy": "full"} if where == "config" else {}
    in_call = {"vision_feature_select_strategy": "full"} if where == "call" else {}
    model = tiny_clip_llava(2, vision_feature_layer=-1, **in_config)
    inputs = {"input_ids": image_prompt(17), "pixel_values": torch.randn(1, 3, 16, 16), **in_call}
    with torch.no_grad(), vtprune.pruned(model, "todre", keep=4):
        with pytest.raises(InputError, match=r"'todre' reads the \[CLS\] attention to the image's 16 patches, but"):
            model(**inputs)
        with pytest.raises(InputError, match="has 17 tokens"):
            model.generate(**inputs, max_new_tokens=1)
    with torch.no_grad(), vtprune.pruned(model, "divprune", keep=4) as handle:  # it reads no [CLS] row
        model(**inputs)
    assert handle.last_record.images[0].kept.numel() == 4


@pytest.mark.parametrize(
    "model, message",
    [
        (lambda: tiny_clip_llava(3, vision_feature_layer=[-2, -1]), r"vision_feature_layer=\[-2, -1\]: the projector"),
        (lambda: tiny_llava(Dinov2Config(**TOWER, num_hidden_layers=2)), "this LLaVA's tower is 'dinov2'"),
    ],
    ids=["several-layers", "unknown-tower"],
)
def test_a_tower_whose_cls_row_vtprune_cannot_give_is_refused_at_prune(model, message):
    model = model()
    with pytest.raises(UnsupportedModelError, match=message):
        vtprune.prune(model, "todre", keep=4)
    assert not model._forward_pre_hooks  # nothing left installed
    vtprune.prune(model, "divprune", keep=4).remove()  # it reads no [CLS] row


def test_a_feature_layer_passed_to_the_call_is_refused_for_todre():
    # The [CLS] row is recorded at the config's layer (-2); a call that reads another would rank with the wrong row.
    model = tiny_clip_llava(3, vision_feature_layer=-2)
    inputs = {"input_ids": image_prompt(16), "pixel_values": torch.randn(1, 3, 16, 16)}
    with torch.no_grad(), vtprune.pruned(model, "todre", keep=4) as handle:
        with pytest.raises(InputError, match="vision_feature_layer=-1 was passed to the call"):
            model(**inputs, vision_feature_layer=-1)
        with pytest.raises(InputError, match="vision_feature_layer=-1 was passed to the call"):
            model.generate(**inputs, vision_feature_layer=-1, max_new_tokens=1)
        model(**inputs, vision_feature_layer=-2)  # the config's own layer
        assert handle.capture.cls_attention is not None
    with torch.no_grad(), vtprune.pruned(model, "divprune", keep=4):  # it reads no [CLS] row
        model(**inputs, vision_feature_layer=-1)


def test_a_positive_feature_layer_reads_the_cls_row_of_the_layer_it_names():
    # hidden_states[2] is the output of the tower's second layer (layers[1]), as hidden_states[-2] is of a 3-layer one.
    pixels = torch.randn(1, 3, 16, 16)
    rows = []
    for layer in (2, -2):
        torch.manual_seed(0)
        model = tiny_clip_llava(3, vision_feature_layer=layer)
        with torch.no_grad(), vtprune.pruned(model, "todre", keep=4) as handle:
            model(input_ids=image_prompt(16), pixel_values=pixels)
            rows.append(handle.capture.cls_attention)
    assert rows[0] is not None and rows[0].shape == (1, 16)
    torch.testing.assert_close(rows[0], rows[1], atol=0, rtol=0)


def test_precomputed_encoder_outputs_are_refused_for_todre_only(models, make_inputs):
    # Outputs encoded outside the wrapped model's call pass no tower: no [CLS] rows belong to them, not even those
    # an earlier call of other images left behind.
    model = models("llava")
    inputs, others = make_inputs(model, "llava", 3), make_inputs(model, "llava", 3, seed=1)
    with torch.no_grad():
        encoded = model._prepare_multimodal_encoder_kwargs_for_generation(dict(inputs))
    with torch.no_grad(), vtprune.pruned(model, "todre", keep=4) as handle:
        model(**others)  # the rows of other images
        assert handle.capture.cls_attention is not None
        with pytest.raises(InputError, match="precomputed embeddings"):
            model(**encoded)
        with pytest.raises(InputError, match="precomputed embeddings"):
            model.generate(**encoded, max_new_tokens=1)
    with torch.no_grad(), vtprune.pruned(model, "divprune", keep=4) as handle:
        model(**encoded)
    assert [image.kept.numel() for image in handle.last_record.images] == [4, 4, 4]


@pytest.mark.parametrize("kind", ["llava_next", "qwen2_vl", "internvl"])
def test_declared_fallbacks_rank_from_the_isolated_pivot(models, make_inputs, kind):
    """AnyRes tiles (NeXT), a tower without [CLS] (Qwen) and pixel-shuffled patches (InternVL) record no [CLS] row:
    ToDRE's pivot is the most isolated token, for pixels and for precomputed outputs alike."""
    model = models(kind)
    inputs = make_inputs(model, kind, 3)
    with torch.no_grad():
        encoded = model._prepare_multimodal_encoder_kwargs_for_generation(dict(inputs))
    kept = []
    for call_inputs in (inputs, encoded):
        with torch.no_grad(), vtprune.pruned(model, "todre", keep=4) as handle:
            model(**call_inputs)
            assert handle.capture.cls_attention is None
        kept.append([image.kept for image in handle.last_record.images])
    assert len(kept[0]) >= 3
    assert all(torch.equal(a, b) for a, b in zip(*kept, strict=True))
