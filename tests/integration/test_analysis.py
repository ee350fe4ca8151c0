"""The information-horizon analysis: leave-one-out removal equals masking, the horizon rules, score quality."""

import pytest
import torch
from conftest import refusal
from reference import kept_columns, masked_from_layer

import vtprune
from vtprune.analysis import (
    Horizon,
    LeaveOut,
    SampleInformation,
    horizon,
    score_quality,
    strategy_scores,
    token_information,
    uniformity,
)
from vtprune.errors import VTPruneError
from vtprune.record import ImageRecord, PruneRecord
from vtprune.schedule import Stage
from vtprune.testing import MODEL_KINDS, RowSpec, build_inputs


def two_items(kind: str) -> RowSpec:
    """One row with two visual items (two images, or an image and a video), so plans span items."""
    if kind.startswith("qwen"):
        return RowSpec(images=[(1, 2)], videos=1)
    if kind == "llava_onevision":
        return RowSpec(images=[(1, 1)], videos=1)
    return RowSpec(images=[(1, 1), (1, 1)])


def masked_distribution(model, inputs, items, layer, token):
    """Next-token log-probabilities at the last slot with ``token`` masked out of attention from ``layer`` on."""
    records, offset = [], 0
    for index, (modality, count) in enumerate(items):
        local = token - offset
        kept = torch.tensor([i for i in range(count) if i != local])
        earlier = sum(m == modality for m, _ in items[:index])
        records.append(ImageRecord(0, modality, earlier, count, kept_by_stage={f"layer {layer}": kept}))
        offset += count
    record = PruneRecord(records, torch.zeros(1, 1, dtype=torch.long), schedule="reference")
    with masked_from_layer(model, layer, kept_columns(inputs, record, f"layer {layer}")), torch.no_grad():
        return torch.log_softmax(model(**inputs).logits[0, -1].double(), -1)


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_removal_equals_masking_reference(models, kind):
    model = models(kind)
    inputs = build_inputs(model, [two_items(kind)], seed=1)
    layers = [0, 2]
    num_tokens = sum(count for count in build_counts(model, inputs))
    measured = torch.tensor([0, 1, 2, num_tokens - 3, num_tokens - 2, num_tokens - 1])  # in both items
    why = refusal(model, "random", layer=layers[0], keep_ratio=0.5)  # it removes tokens inside the decoder
    if why is not None:
        with pytest.raises(VTPruneError, match=why):
            token_information(model, inputs, layers=layers, tokens=measured, group_size=4)
        return
    (info,) = token_information(model, inputs, layers=layers, tokens=measured, group_size=4)
    assert len(info.items) == 2 and info.num_tokens == num_tokens and torch.equal(info.tokens, measured)
    with torch.no_grad():
        log_p = torch.log_softmax(model(**inputs).logits[0, -1].double(), -1)
    p = log_p.exp()
    for row, layer in enumerate(layers):
        expected_kl, expected_tv, expected_drop = [], [], []
        for token in measured.tolist():
            log_q = masked_distribution(model, inputs, info.items, layer, token)
            expected_kl.append(float((p * (log_p - log_q)).sum()))
            expected_tv.append(float(0.5 * (p - log_q.exp()).abs().sum()))
            expected_drop.append(float(p[info.answer] - log_q[info.answer].exp()))
        expected_tv = torch.tensor(expected_tv, dtype=torch.float32)
        # Tokens differ from each other by far more than the tolerance, so a removal on the wrong row would fail.
        assert float(expected_tv.max() - expected_tv.min()) > 100 * 1e-6
        torch.testing.assert_close(info.values["tv"][row], expected_tv, atol=1e-6, rtol=0)
        torch.testing.assert_close(
            info.values["kl"][row], torch.tensor(expected_kl, dtype=torch.float32), atol=1e-8, rtol=1e-3
        )
        torch.testing.assert_close(
            info.values["prob_drop"][row], torch.tensor(expected_drop, dtype=torch.float32), atol=1e-6, rtol=0
        )


def test_token_subsets_measure_the_same_tokens(models):
    model = models("llava")
    inputs = build_inputs(model, [RowSpec()], seed=2)
    (full,) = token_information(model, inputs, layers=[1])
    (subset,) = token_information(model, inputs, layers=[1], tokens=5, seed=3)
    (given,) = token_information(model, inputs, layers=[1], tokens=torch.tensor([7, 2]))
    assert subset.tokens.numel() == 5 and subset.tokens.unique().numel() == 5
    torch.testing.assert_close(subset.values["kl"], full.values["kl"][:, subset.tokens])
    assert given.tokens.tolist() == [2, 7]
    assert torch.isnan(given.full()[0]).sum() == full.num_tokens - 2


def test_bad_arguments_are_refused(models):
    model = models("llava")
    two_rows = build_inputs(model, [RowSpec(), RowSpec()])
    with pytest.raises(vtprune.VTPruneError, match="one sample per inputs"):
        token_information(model, two_rows)
    one = build_inputs(model, [RowSpec()])
    with pytest.raises(vtprune.VTPruneError, match="layers"):
        token_information(model, one, layers=[9])
    with pytest.raises(vtprune.VTPruneError, match="group_size"):
        token_information(model, one, group_size=0)
    assert not hasattr(model, "_vtprune_handle")


def test_a_plan_that_misses_the_images_is_refused(models):
    model = models("llava")
    inputs = build_inputs(model, [RowSpec(), RowSpec()])
    plan = LeaveOut({(0, "image", 0): 3})  # one image planned, the batch has two
    with (
        pytest.raises(vtprune.VTPruneError, match="planned for 1"),
        torch.no_grad(),
        vtprune.pruned(model, Stage(plan, layer=1)),
    ):
        model(**inputs)


def sample(values: list[list[float]]) -> SampleInformation:
    kl = torch.tensor(values)
    tokens = torch.arange(kl.shape[1])
    layers = list(range(kl.shape[0]))
    return SampleInformation(
        layers, tokens, kl.shape[1], [("image", kl.shape[1])], 0, {"kl": kl, "tv": kl, "prob_drop": kl}
    )


def test_uniformity_is_one_for_equal_shares_and_zero_for_one_token():
    assert float(uniformity(torch.tensor([2.0, 2.0, 2.0, 2.0]))) == pytest.approx(1.0)
    assert float(uniformity(torch.tensor([5.0, 0.0, 0.0, 0.0]))) == pytest.approx(0.0)


def test_the_horizon_is_where_information_stays_below_the_fraction(tmp_path):
    curves = sample(
        [
            [1.0, 0.0, 3.0, 0.0],
            [0.5, 0.5, 0.0, 0.0],
            [0.05, 0.0, 0.0, 0.0],
            [0.2, 0.0, 0.0, 0.0],
            [0.01, 0.01, 0.01, 0.01],
        ]
    )
    found = horizon([curves], num_layers=5)
    assert found.relative == pytest.approx([1.0, 0.25, 0.0125, 0.05, 0.01])
    assert found.layer == 2
    dip = horizon([curves], num_layers=5, fraction=0.02)  # layer 2 dips below 0.02, layer 3 rises again
    assert dip.layer == 4
    even = horizon([curves], num_layers=5, rule="uniform")
    assert even.uniformity[-1] == pytest.approx(1.0) and even.layer == 4
    assert horizon([curves], num_layers=5, fraction=0.001).layer is None
    found.save(tmp_path / "h.json")
    assert Horizon.load(tmp_path / "h.json") == found


def test_score_quality_ranks_a_perfect_and_a_reversed_strategy(models, monkeypatch):
    pytest.importorskip("sklearn")
    from vtprune.analysis import quality

    model = models("llava")
    inputs = [build_inputs(model, [RowSpec()], seed=4)]
    info = token_information(model, inputs, layers=[1, 3])
    kl = info[0].values["kl"]
    fake = {"oracle": {1: kl[0], 3: kl[1]}, "reversed": {1: -kl[0], 3: -kl[1]}}
    monkeypatch.setattr(quality, "strategy_scores", lambda model, inputs, name, layers, tokenizer: fake[name])
    result = score_quality(model, inputs, info, ["oracle", "reversed"], q=0.25)
    assert result.auc["oracle"] == pytest.approx([1.0, 1.0])
    assert result.auc["reversed"] == pytest.approx([0.0, 0.0])
    assert result.ndcg["oracle"] == pytest.approx([1.0, 1.0])
    assert all(0 < value < 1 for value in result.random_ndcg)


def test_score_quality_of_real_strategies_runs_per_layer(models):
    pytest.importorskip("sklearn")
    model = models("llava")
    inputs = [build_inputs(model, [RowSpec()], seed=5)]
    info = token_information(model, inputs, layers=[0, 2])
    result = score_quality(model, inputs, info, ["divprune", "fastv"])
    assert all(0 <= value <= 1 for value in result.auc["divprune"])
    scores = strategy_scores(model, inputs[0], "divprune", [0, 2])
    assert torch.equal(scores[0], scores[2])  # DivPrune scores once, before the LLM
    assert torch.equal(scores[0], vtprune.scores("divprune", _projected(model, inputs[0])))
    assert torch.isnan(torch.tensor(result.auc["fastv"][0]))  # FastV cannot act at layer 0
    assert 0 <= result.auc["fastv"][1] <= 1


def _projected(model, inputs):
    with torch.no_grad():
        return model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]


def build_counts(model, inputs):
    with torch.no_grad(), vtprune.pruned(model, "none") as handle:
        model(**inputs)
    return [image.num_tokens for image in handle.last_record.images]


def saved_horizon(path, layer, num_layers=4):
    Horizon(
        [0, 1, 2, 3], num_layers, "kl", [1.0] * 4, [0.0] * 4, [1.0] * 4, [0.1] * 4, "fraction", 0.1, 0.95, 1, layer
    ).save(path)
    return str(path)


def test_random_deep_acts_at_a_saved_horizon(models, make_inputs, tmp_path):
    model = models("llava")
    inputs = make_inputs(model, "llava", 1)
    path = saved_horizon(tmp_path / "h.json", 2)
    with torch.no_grad(), vtprune.pruned(model, f"divprune:75%+random_deep:50%(horizon:{path})") as handle:
        model(**inputs)
    assert list(handle.last_record.images[0].kept_by_stage) == ["input", "layer 2"]
    explicit = f"random_deep@3:50%(horizon:{path})"
    with (
        pytest.raises(vtprune.VTPruneError, match="placed at layer 3"),
        torch.no_grad(),
        vtprune.pruned(model, explicit),
    ):
        model(**inputs)
    with pytest.raises(vtprune.VTPruneError, match="5-layer decoder"):
        vtprune.prune(model, "random_deep", keep_ratio=0.5, horizon=saved_horizon(tmp_path / "deep.json", 2, 5))
    with pytest.raises(vtprune.VTPruneError, match="found no horizon"):
        vtprune.prune(model, "random_deep", keep_ratio=0.5, horizon=saved_horizon(tmp_path / "none.json", None))
    with pytest.raises(vtprune.VTPruneError, match="cannot read a saved horizon"):
        vtprune.prune(model, "random_deep", keep_ratio=0.5, horizon=str(tmp_path / "missing.json"))
    assert not hasattr(model, "_vtprune_handle")


def test_the_horizon_command_on_the_toy_llava(tmp_path, capsys):
    from vtprune.cli import main

    out, png = tmp_path / "h.json", tmp_path / "h.png"
    args = ["horizon", "--samples", "1", "--layers", "0", "2", "3", "--tokens", "16", "--group", "16"]
    main([*args, "--strategies", "divprune", "fastv", "--out", str(out), "--plot", str(png)])
    printed = capsys.readouterr().out
    assert "| layer | mean information | relative | uniformity | AUC divprune | AUC fastv | random |" in printed
    assert "suggested schedule: divprune:25%" in printed
    saved = Horizon.load(out)
    assert saved.layers == [0, 2, 3] and saved.num_layers == 4 and saved.samples == 1
    assert png.stat().st_size > 0
