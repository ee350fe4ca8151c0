"""``--model vtprune_vllm``: lmms-eval's ``vllm`` model gets vtprune's overrides, or a refusal before any engine starts.

lmms-eval's ``VLLM.__init__`` (which starts the engine) is replaced by a recorder: these tests need neither vLLM nor
an engine, so they run in every session.
"""

import json

import pytest

pytest.importorskip("lmms_eval")
from lmms_eval.models.simple.vllm import VLLM

from vtprune.errors import OptionError
from vtprune.harness.vllm_lmm import VTPruneVLLM
from vtprune.toyvlm.model import DEFAULT_PATH
from vtprune.vllm import UnsupportedScheduleError


@pytest.fixture
def engine_kwargs(monkeypatch):
    received = []
    monkeypatch.setattr(VLLM, "__init__", lambda self, **kwargs: received.append(kwargs))
    return received


def test_schedule_becomes_the_engines_hf_overrides(engine_kwargs):
    VTPruneVLLM(model=str(DEFAULT_PATH), schedule="divprune:16", max_model_len=512)
    (kwargs,) = engine_kwargs
    assert kwargs == {
        "model": str(DEFAULT_PATH),
        "max_model_len": 512,
        "hf_overrides": {"architectures": ["VTPruneLlavaForConditionalGeneration"], "vtprune_schedule": "divprune:16"},
    }


def test_other_hf_overrides_pass_through_from_json(engine_kwargs):
    VTPruneVLLM(
        model="org/qwen", architecture="Qwen2VLForConditionalGeneration", hf_overrides=json.dumps({"max_pixels": 9})
    )
    assert engine_kwargs[0]["hf_overrides"] == {
        "max_pixels": 9,
        "architectures": ["VTPruneQwen2VLForConditionalGeneration"],
    }


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"schedule": "fastv@2:50%"}, UnsupportedScheduleError, "paged KV cache"),
        ({"hf_overrides": {"vtprune_schedule": "uniform:25%"}}, OptionError, "schedule=..."),
    ],
)
def test_refused_before_the_engine_starts(engine_kwargs, kwargs, error, match):
    with pytest.raises(error, match=match):
        VTPruneVLLM(model=str(DEFAULT_PATH), **kwargs)
    assert engine_kwargs == []
