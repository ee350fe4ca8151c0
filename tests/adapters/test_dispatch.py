"""Big-model placement: vtprune's hooks compose with accelerate's (device_map="auto" with offloading)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlavaForConditionalGeneration

import vtprune
from vtprune.toyvlm import DEFAULT_PATH, load_toy_model, make_split
from vtprune.toyvlm.model import prompt_inputs


@pytest.mark.parametrize("schedule", ["divprune:8", "fastv@2:8", "divprune:16+random_deep:50%"])
def test_a_model_split_over_cpu_and_disk_prunes_like_the_whole_model(tmp_path, schedule):
    # Too little memory for the whole model: accelerate keeps the vision side on the CPU, offloads the decoder
    # to disk and moves its weights in with its own hooks on every forward, as for a model too big for one GPU.
    model, processor = load_toy_model()
    split = LlavaForConditionalGeneration.from_pretrained(
        DEFAULT_PATH, device_map="auto", max_memory={"cpu": "2MB"}, offload_folder=tmp_path
    ).eval()
    assert {"cpu", "disk"} <= set(split.hf_device_map.values())
    samples = make_split(3, 4)
    inputs = prompt_inputs(processor, [s.image for s in samples], [s.question for s in samples])
    with torch.no_grad():
        with vtprune.pruned(model, schedule) as whole:
            expected = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        with vtprune.pruned(split, schedule) as handle:
            got = split.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(got, expected)
    assert [i.kept.tolist() for i in handle.last_record.images] == [i.kept.tolist() for i in whole.last_record.images]
