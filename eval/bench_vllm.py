"""Serving speed, side by side in one run: stock vLLM, vLLM with vtprune's pruning class per schedule, and HF
generate() with and without vtprune, on the same prompts and images.

Run it in an environment with vLLM (on CPU: the ``.nox/vllm`` environment that ``nox -s vllm`` builds; vtprune's
transformers path runs there too). On CPU it measures the shipped toys (toy LLaVA, toy Qwen2-VL, 144 image tokens
each, 192-pixel images); with ``--device cuda`` it writes random-weight checkpoints with LLaVA-1.5-7B and
Qwen2.5-VL-7B shapes (576 image tokens per image; the toy's tokenizer) into ``--workdir`` and measures those in
bfloat16.

Per family: a stock vLLM engine is timed alone first (``--no-stock`` skips it), then one engine with the pruning
class and the HF model are held together and timed in interleaved rounds: every round runs each configuration (HF
unpruned, HF per schedule, the pruning class with no schedule, and per schedule, given per request) once, in
turn. Per configuration and round:

- requests/s and output tokens/s: ``--requests`` requests of ``--tokens`` output tokens each (EOS ignored, so every
  configuration writes the same number of tokens); vLLM gets them as one batch (continuous batching), HF generate()
  one at a time (batch 1, processor included, as vLLM's front-end is);
- TTFT: one request alone with one output token, wall time from submitting to the token (processor included).

Printed: the median over rounds of each. vLLM's multimodal processor cache and prefix caching are off, so no round
reuses an earlier round's images.

    python eval/bench_vllm.py --quick                     # CPU, toys, both families (13 min on 2 cores at load ~11)
    python eval/bench_vllm.py --families llava --rounds 5
    python eval/bench_vllm.py --device cuda --workdir /tmp/bench_vllm   # random weights, 7B shapes
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SCHEDULES = ["divprune:16", "uniform:25%"]
CUDA_SCHEDULES = ["divprune:64", "uniform:25%"]
FAMILIES = ("llava", "qwen2_vl")


@dataclasses.dataclass
class Request:
    prompt: str
    image: Image.Image


@dataclasses.dataclass
class Family:
    name: str
    path: Path  # the pruning class's checkpoint
    stock_path: Path  # the same weights as stock vLLM loads them
    requests: list[Request]


def toy_families(names: list[str], workdir: Path, n: int) -> list[Family]:
    from transformers import AutoProcessor

    from vtprune.toyvlm import build_prompt, make_split
    from vtprune.toyvlm.model import DEFAULT_PATH, QWEN2_VL_PATH, save_for_stock_vllm

    samples = make_split(0, n)
    families = []
    for name in names:
        path = DEFAULT_PATH if name == "llava" else QWEN2_VL_PATH
        stock = save_for_stock_vllm(workdir / "stock_llava") if name == "llava" else path
        processor = AutoProcessor.from_pretrained(path)
        requests = [Request(build_prompt(s.question, processor), s.image) for s in samples]
        families.append(Family(name, path, stock, requests))
    return families


def cuda_families(names: list[str], workdir: Path, n: int) -> list[Family]:
    """Random-weight checkpoints with 7B shapes (LLaVA-1.5-7B; Qwen2.5-VL-7B for "qwen2_vl"), random-pixel images."""
    from transformers import AutoProcessor

    from vtprune.toyvlm import build_prompt, make_split

    families = []
    for name in names:
        path = workdir / f"{name}_7b"
        if not (path / "config.json").exists():
            random_7b_checkpoint(name, path)
        processor = AutoProcessor.from_pretrained(path)
        size = 336 if name == "llava" else 672  # 576 image tokens either way
        rng = np.random.default_rng(0)
        requests = [
            Request(
                build_prompt(s.question, processor),
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)),
            )
            for s in make_split(0, n)
        ]
        families.append(Family(name, path, path, requests))
    return families


def random_7b_checkpoint(name: str, folder: Path, device: str = "cuda") -> None:
    """LLaVA-1.5-7B (CLIP-L/336 + Vicuna-7B) or Qwen2.5-VL-7B shapes, random bfloat16 weights, the toy's tokenizer."""
    from transformers import AutoModelForImageTextToText, LlavaConfig, Qwen2_5_VLConfig

    from vtprune.toyvlm.model import DEFAULT_PATH, QWEN2_VL_PATH

    toy = DEFAULT_PATH if name == "llava" else QWEN2_VL_PATH
    shutil.copytree(toy, folder, ignore=shutil.ignore_patterns("model.safetensors", "config.json", "clip_text"))
    toy_config = json.loads((toy / "config.json").read_text())
    processor = json.loads((folder / "processor_config.json").read_text())
    if name == "llava":
        vision = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16}
        vision.update(image_size=336, patch_size=14, projection_dim=768)
        text = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32}
        text.update(num_attention_heads=32, num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096)
        config = LlavaConfig(
            vision_config=dict(vision, model_type="clip_vision_model"),
            text_config=text,
            image_token_index=toy_config["image_token_index"],
            vision_feature_layer=-2,
        )
        processor["image_processor"].update(crop_size={"height": 336, "width": 336}, size={"shortest_edge": 336})
        processor["patch_size"] = 14
    else:
        vision = {"depth": 32, "hidden_size": 1280, "num_heads": 16, "intermediate_size": 3420, "out_hidden_size": 3584}
        vision.update(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112)
        vision.update(fullatt_block_indexes=[7, 15, 23, 31], in_channels=3)
        text = {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28}
        text.update(num_key_value_heads=4, vocab_size=152064, max_position_embeddings=4096, rms_norm_eps=1e-6)
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}
        ids = {key: toy_config[key] for key in ("image_token_id", "video_token_id", "vision_start_token_id")}
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
        processor["processor_class"] = "Qwen2_5_VLProcessor"
        processor["image_processor"].update(patch_size=14, max_pixels=672 * 672, min_pixels=56 * 56)
    (folder / "processor_config.json").write_text(json.dumps(processor, indent=2))
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):  # on the GPU: initialising 7B parameters on the CPU takes minutes
            model = AutoModelForImageTextToText.from_config(config)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()


def median(values: list[float]) -> float:
    return statistics.median(values)


class Timings:
    """Per configuration: per-round (requests/s, output tokens/s) and TTFT samples."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, list[float]]] = {}

    def add(self, label: str, key: str, value: float) -> None:
        self.rows.setdefault(label, {"req/s": [], "tok/s": [], "ttft": []})[key].append(value)

    def print(self, family: str) -> None:
        print(f"\n{family}")
        print(f"{'configuration':<34} {'requests/s':>11} {'output tok/s':>13} {'TTFT ms (median)':>17}")
        for label, row in self.rows.items():
            print(
                f"{label:<34} {median(row['req/s']):>11.2f} {median(row['tok/s']):>13.1f} "
                f"{1000 * median(row['ttft']):>17.0f}"
            )


def vllm_engine(model_args: dict, args: argparse.Namespace):
    from vllm import LLM

    settings = {"max_model_len": args.max_model_len, "seed": 0, "limit_mm_per_prompt": {"image": 1}}
    settings.update(enable_prefix_caching=False, mm_processor_cache_gb=0)
    if args.device == "cpu":
        settings.update(enforce_eager=True, dtype="float32")
    else:
        settings.update(dtype="bfloat16", gpu_memory_utilization=args.gpu_memory_utilization)
    return LLM(**model_args, **settings)


def shutdown(llm) -> None:
    # An in-process engine core tears down vLLM's process-global state when it shuts down: do it now, not later
    # from the garbage collector while the next engine runs.
    llm.llm_engine.engine_core.shutdown()
    gc.collect()


def vllm_round(llm, requests: list[Request], schedule: str | None, tokens: int) -> tuple[float, int]:
    """(seconds, output tokens) for ``requests`` submitted as one batch."""
    from vllm import SamplingParams

    from vtprune.vllm import SCHEDULE_KEY

    prompts = [
        {
            "prompt": r.prompt,
            "multi_modal_data": {"image": r.image},
            **({} if schedule is None else {"mm_processor_kwargs": {SCHEDULE_KEY: schedule}}),
        }
        for r in requests
    ]
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return seconds, sum(len(o.outputs[0].token_ids) for o in outputs)


def hf_round(model, processor, requests: list[Request], schedule: str | None, tokens: int) -> tuple[float, int]:
    """(seconds, output tokens) for ``requests`` through generate(), one at a time."""
    import vtprune

    written = 0
    start = time.perf_counter()
    for r in requests:
        inputs = processor(images=[r.image], text=[r.prompt], return_tensors="pt").to(model.device)
        kwargs = {"max_new_tokens": tokens, "min_new_tokens": tokens, "do_sample": False}
        with torch.inference_mode():
            if schedule is None:
                out = model.generate(**inputs, **kwargs)
            else:
                with vtprune.pruned(model, schedule):
                    out = model.generate(**inputs, **kwargs)
        written += out.shape[1] - inputs["input_ids"].shape[1]
    synchronize(model.device)
    return time.perf_counter() - start, written


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(timings: Timings, label: str, run: Callable[[list[Request], int], tuple[float, int]], args, requests):
    """One round of one configuration: a batch for throughput, then ``--ttft-requests`` single requests."""
    seconds, written = run(requests, args.tokens)
    assert written == len(requests) * args.tokens, f"{label}: {written} tokens written"
    timings.add(label, "req/s", len(requests) / seconds)
    timings.add(label, "tok/s", written / seconds)
    for r in requests[: args.ttft_requests]:
        timings.add(label, "ttft", run([r], 1)[0])


def bench_family(family: Family, args: argparse.Namespace) -> Timings:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import vtprune.vllm

    timings = Timings()
    if args.stock:
        llm = vllm_engine({"model": str(family.stock_path)}, args)
        vllm_run = lambda rs, n: vllm_round(llm, rs, None, n)
        measure(timings, "vLLM stock (warm-up)", vllm_run, args, family.requests[:2])
        timings.rows.pop("vLLM stock (warm-up)")
        for _ in range(args.rounds):
            measure(timings, "vLLM stock", vllm_run, args, family.requests)
        shutdown(llm)
        del llm
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    model = AutoModelForImageTextToText.from_pretrained(family.path, dtype=dtype).to(args.device).eval()
    processor = AutoProcessor.from_pretrained(family.path)
    llm = vllm_engine(vtprune.vllm.engine_args(str(family.path)), args)
    configurations: list[tuple[str, Callable]] = [
        ("HF generate", lambda rs, n: hf_round(model, processor, rs, None, n))
    ]
    configurations += [
        (f"HF generate + vtprune {s}", lambda rs, n, s=s: hf_round(model, processor, rs, s, n)) for s in args.schedules
    ]
    configurations.append(("vLLM + vtprune class, no schedule", lambda rs, n: vllm_round(llm, rs, None, n)))
    configurations += [(f"vLLM + vtprune {s}", lambda rs, n, s=s: vllm_round(llm, rs, s, n)) for s in args.schedules]
    for label, run in configurations:  # warm-up, not recorded
        run(family.requests[:1], 2)
    for _ in range(args.rounds):
        for label, run in configurations:
            measure(timings, label, run, args, family.requests)
    shutdown(llm)
    return timings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument(
        "--schedules", nargs="+", default=None, help=f"default {SCHEDULES} (cuda: {CUDA_SCHEDULES})".replace("%", "%%")
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--requests", type=int, default=16, help="requests per round (one batch for vLLM)")
    parser.add_argument("--tokens", type=int, default=16, help="output tokens per request")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ttft-requests", type=int, default=4, help="single requests timed for TTFT per round")
    parser.add_argument("--no-stock", dest="stock", action="store_false", help="skip the stock vLLM engine")
    parser.add_argument("--quick", action="store_true", help="8 requests, 8 tokens, 3 rounds, 2 TTFT requests")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.45, help="cuda: each engine's share")
    parser.add_argument("--workdir", type=Path, default=None, help="checkpoints written here (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.tokens, args.rounds, args.ttft_requests = 8, 8, 3, 2
    if args.schedules is None:
        args.schedules = SCHEDULES if args.device == "cpu" else CUDA_SCHEDULES
    if args.max_model_len is None:
        args.max_model_len = 512 if args.device == "cpu" else 2048
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from vtprune.vllm import engine_args

    for schedule in args.schedules:  # refused schedules fail here, before any engine starts
        engine_args("unused", schedule, architecture="LlavaForConditionalGeneration")
    if args.device == "cpu":
        # The toys need a few MiB of KV cache; one process starts faster on few cores and lets HF and vLLM share it.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import vllm

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_vllm_"))
    workdir.mkdir(parents=True, exist_ok=True)
    build = toy_families if args.device == "cpu" else cuda_families
    families = build(args.families, workdir, args.requests)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"vLLM {vllm.__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, load average {load:.1f} at start; {args.requests} requests x {args.tokens} "
        f"tokens per round, {args.rounds} rounds, medians"
    )
    for family in families:
        bench_family(family, args).print(f"{family.name} ({family.path.name})")


if __name__ == "__main__":  # vLLM spawns workers: the engine must not start on import
    main()
