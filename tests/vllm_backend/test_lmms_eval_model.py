"""``--model vtprune_vllm``: lmms-eval's ``vllm`` model gets vtprune's overrides, or a refusal before any engine starts.

lmms-eval's ``VLLM.__init__`` (which starts the engine) is replaced by a recorder: these tests need neither vLLM nor
an engine, so they run in every session.
"""

import json
from types import SimpleNamespace

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


def test_a_sweep_changes_the_schedule_per_request_and_checks_it_first(engine_kwargs):
    lm = VTPruneVLLM(model=str(DEFAULT_PATH))
    assert engine_kwargs[0]["hf_overrides"] == {"architectures": ["VTPruneLlavaForConditionalGeneration"]}
    lm.image_tokens = [144]
    lm.set_schedule("uniform:25%")
    assert (lm.request_schedule, lm.image_tokens) == ("uniform:25%", [])
    with pytest.raises(UnsupportedScheduleError, match="paged KV cache"):
        lm.set_schedule("fastv@2:50%")
    assert lm.request_schedule == "uniform:25%"


@pytest.mark.parametrize(
    "runtime, world_size, match", [("tgi", "1", "runtime must be one of"), ("vllm", "2", "runs in one process")]
)
def test_sweep_runtimes_are_checked_before_any_engine_starts(
    engine_kwargs, monkeypatch, tmp_path, runtime, world_size, match
):
    from vtprune.harness.sweep import run_sweep

    monkeypatch.setenv("WORLD_SIZE", world_size)
    with pytest.raises(ValueError, match=match):
        run_sweep(str(DEFAULT_PATH), ["vtprune_shapes"], ["uniform:25%"], tmp_path, runtime=runtime)
    assert engine_kwargs == []


def test_the_sweep_command_passes_the_runtime(monkeypatch, tmp_path):
    import vtprune.harness.sweep
    from vtprune.cli import main

    received = []

    def recorded_sweep(*args, **kwargs):
        received.append(kwargs)
        return []  # no runs: the command prints nothing

    monkeypatch.setattr(vtprune.harness.sweep, "run_sweep", recorded_sweep)
    main(["sweep", "--runtime", "vllm", "--schedules", "uniform:25%", "--output", str(tmp_path)])
    assert received[0]["runtime"] == "vllm"


def test_a_request_schedule_joins_the_callers_processor_kwargs(engine_kwargs, monkeypatch):
    sent = []

    class Output:
        prompt_token_ids = [5, 32000, 32000, 6]

    class Client:
        llm_engine = SimpleNamespace(model_config=SimpleNamespace(hf_config=SimpleNamespace(image_token_index=32000)))

        def chat(self, *args, **kwargs):
            sent.append(kwargs)
            return [Output()]

    monkeypatch.setattr(
        VLLM, "generate_until", lambda self, requests: self.client.chat([], mm_processor_kwargs={"max_pixels": 7})
    )
    lm = VTPruneVLLM(model=str(DEFAULT_PATH))
    lm.client = Client()
    lm.set_schedule("uniform:25%")
    lm.generate_until([])
    assert sent == [{"mm_processor_kwargs": {"max_pixels": 7, "vtprune_schedule": "uniform:25%"}}]
    assert lm.image_tokens == [2] and "chat" not in vars(lm.client)
