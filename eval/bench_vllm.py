"""Serving speed, side by side in one run: stock vLLM, vLLM with vtprune's pruning class per schedule, and HF
generate() with and without vtprune, on the same prompts and images.

Run it in an environment with vLLM (on CPU: the ``.nox/vllm`` environment that ``nox -s vllm`` builds; vtprune's
transformers path runs there too). On CPU it measures the shipped toys (toy LLaVA, toy Qwen2-VL, 144 image tokens
each, 192-pixel images); with ``--device cuda`` it writes random-weight checkpoints with LLaVA-1.5-7B and
Qwen2.5-VL-7B shapes (576 image tokens per image; the toy's tokenizer) into ``--workdir`` and measures those in
bfloat16.

Per family, two phases, each with its engines in their own worker processes that this script drives, all started
and warmed up before the first round: first vLLM (stock vLLM, and the pruning class with no schedule and with each
schedule, given per request: two engines), then HF generate() (unpruned and per schedule: one model). Every round
measures each configuration of the phase once, one at a time (the order reversed every other round); so stock and
the pruning class are measured the same way, and HF never shares a process or the cores' time with a vLLM engine
being measured. Per configuration and round:

- requests/s and output tokens/s: ``--requests`` requests of ``--tokens`` output tokens each (EOS ignored, so every
  configuration writes the same number of tokens); vLLM gets them as one batch (continuous batching), HF generate()
  one at a time (batch 1, processor included, as vLLM's front-end is);
- TTFT: one request alone with one output token, wall time from submitting to the token (processor included).

Printed: the median over rounds of each, and requests/s and TTFT as ratios to stock vLLM (vLLM rows) or to
unpruned HF generate() (HF rows); ``uptime`` at start and end. vLLM's multimodal processor cache and prefix caching
are off, so no round reuses an earlier round's images.

    python eval/bench_vllm.py --quick     # CPU, toys, both families (README: Serving with vLLM, Speed)
    python eval/bench_vllm.py --families llava --rounds 5
    python eval/bench_vllm.py --device cuda --workdir /tmp/bench_vllm   # random weights, 7B shapes
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vtprune.toyvlm.model import FAMILIES

SCHEDULES = ["divprune:16", "uniform:25%"]
CUDA_SCHEDULES = ["divprune:64", "uniform:25%"]
#: Per toy family, the full-size shapes of its ``--device cuda`` checkpoint (data, as a config.json is).
SHAPES_7B = Path(__file__).with_name("shapes_7b.json")


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
    from vtprune.toyvlm.model import save_for_stock_vllm, toy_path

    samples = make_split(0, n)
    families = []
    for name in names:
        path = toy_path(name)
        stock = save_for_stock_vllm(workdir / f"stock_{name}", path)
        processor = AutoProcessor.from_pretrained(path)
        requests = [Request(build_prompt(s.question, processor), s.image) for s in samples]
        families.append(Family(name, path, stock, requests))
    return families


def cuda_families(names: list[str], workdir: Path, n: int) -> list[Family]:
    """Random-weight checkpoints with 7B shapes (``shapes_7b.json``), random-pixel images."""
    from transformers import AutoProcessor

    from vtprune.toyvlm import build_prompt, make_split

    shapes = json.loads(SHAPES_7B.read_text())
    families = []
    for name in names:
        path = workdir / f"{name}_7b"
        if not (path / "config.json").exists():
            random_7b_checkpoint(name, path)
        processor = AutoProcessor.from_pretrained(path)
        size = shapes[name]["image_side"]
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


def random_7b_checkpoint(name: str, folder: Path) -> None:
    """The toy family ``name`` at its full-size shapes (``shapes_7b.json``: LLaVA-1.5-7B, Qwen2.5-VL-7B), random
    bfloat16 weights, the toy's tokenizer."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from vtprune.toyvlm.model import toy_path

    shape = json.loads(SHAPES_7B.read_text())[name]
    toy = toy_path(name)
    shutil.copytree(toy, folder, ignore=shutil.ignore_patterns("model.safetensors", "config.json", "clip_text"))
    toy_config = json.loads((toy / "config.json").read_text())
    fields = dict(shape["config"], **{key: toy_config[key] for key in shape["toy_token_ids"]})
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    processor = json.loads((folder / "processor_config.json").read_text())
    for key, value in shape["processor"].items():
        if isinstance(value, dict):
            processor[key].update(value)
        else:
            processor[key] = value
    (folder / "processor_config.json").write_text(json.dumps(processor, indent=2))
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):  # on the GPU: initialising 7B parameters on the CPU takes minutes
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

    def print(self, title: str, baseline: str) -> None:
        """The medians, and each configuration's requests/s and TTFT as a ratio to ``baseline``'s."""
        print(f"\n{title}")
        print(
            f"{'configuration':<34} {'requests/s':>11} {'output tok/s':>13} {'TTFT ms':>8} "
            f"{'req/s ratio':>12} {'TTFT ratio':>11}"
        )
        base = self.rows[baseline]
        for label, row in self.rows.items():
            print(
                f"{label:<34} {median(row['req/s']):>11.2f} {median(row['tok/s']):>13.1f} "
                f"{1000 * median(row['ttft']):>8.0f} {median(row['req/s']) / median(base['req/s']):>12.2f} "
                f"{median(row['ttft']) / median(base['ttft']):>11.2f}"
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


def measure(label: str, run: Callable[[list[Request], int], tuple[float, int]], args, requests) -> dict:
    """One round of one configuration: a batch for throughput, then ``--ttft-requests`` single requests."""
    seconds, written = run(requests, args.tokens)
    assert written == len(requests) * args.tokens, f"{label}: {written} tokens written"
    ttft = [run([r], 1)[0] for r in requests[: args.ttft_requests]]
    return {"req/s": len(requests) / seconds, "tok/s": written / seconds, "ttft": ttft}


def serve(conn, kind: str, family: Family, args: argparse.Namespace) -> None:
    """One engine in its own process (``kind``: "stock" or "class" for vLLM, "hf" for generate()): warms up, says
    "ready", then measures one round per schedule it receives ("" for none) until it receives None."""
    if kind == "hf":
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if args.device == "cpu":
            # One intra-op thread, as vLLM's CPU engine runs its model (vllm.utils.torch_utils); OpenMP threads
            # spin-waiting on shared cores stall generate() by several times, at random.
            torch.set_num_threads(1)
        dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
        model = AutoModelForImageTextToText.from_pretrained(family.path, dtype=dtype).to(args.device).eval()
        processor = AutoProcessor.from_pretrained(family.path)
        run_for = lambda s: lambda rs, n: hf_round(model, processor, rs, s or None, n)
    else:
        import vtprune.vllm

        model_args = (
            {"model": str(family.stock_path)} if kind == "stock" else vtprune.vllm.engine_args(str(family.path))
        )
        llm = vllm_engine(model_args, args)
        run_for = lambda s: lambda rs, n: vllm_round(llm, rs, s or None, n)
    for schedule in [""] + ([] if kind == "stock" else args.schedules):  # warm-up, not recorded
        run_for(schedule)(family.requests[:2], 2)
    conn.send("ready")
    while (schedule := conn.recv()) is not None:
        conn.send(measure(f"{kind} {schedule}", run_for(schedule), args, family.requests))
    if kind != "hf":
        shutdown(llm)
    conn.close()


def run_phase(family: Family, args: argparse.Namespace, configurations: list[tuple[str, str, str]]) -> Timings:
    """``configurations``: (label, engine kind, schedule). One process per engine kind, all started (and warmed up)
    before the first round; every round measures each configuration once, one at a time, the order reversed every
    other round so no configuration always follows the same one."""
    context = multiprocessing.get_context("spawn")
    workers = {}
    for kind in dict.fromkeys(kind for _, kind, _ in configurations):
        here, there = context.Pipe()
        process = context.Process(target=serve, args=(there, kind, family, args))
        process.start()
        workers[kind] = (here, process)
    try:
        for here, _ in workers.values():
            assert here.recv() == "ready"
        timings = Timings()
        for round_index in range(args.rounds):
            order = configurations if round_index % 2 == 0 else configurations[::-1]
            for label, kind, schedule in order:
                time.sleep(args.pause)  # the previous engine's idle OpenMP threads stop spinning
                workers[kind][0].send(schedule)
                for key, value in workers[kind][0].recv().items():
                    for sample in value if isinstance(value, list) else [value]:
                        timings.add(label, key, sample)
        for here, _ in workers.values():
            here.send(None)
    finally:
        for _, process in workers.values():
            process.join(timeout=120)
            if process.is_alive():
                process.kill()
    # Print in the order given, not the order of the last round.
    timings.rows = {label: timings.rows[label] for label, _, _ in configurations}
    return timings


def bench_family(family: Family, args: argparse.Namespace) -> None:
    """vLLM first (stock and the pruning class, two processes), then HF generate (one process): HF never shares a
    process, or its cores' time, with a vLLM engine that is being measured."""
    vllm_configurations = [("vLLM stock", "stock", ""), ("vLLM + vtprune class, no schedule", "class", "")]
    vllm_configurations += [(f"vLLM + vtprune {s}", "class", s) for s in args.schedules]
    run_phase(family, args, vllm_configurations).print(f"{family.name} ({family.path.name}), vLLM", "vLLM stock")
    if args.hf:
        hf_configurations = [("HF generate", "hf", "")] + [
            (f"HF generate + vtprune {s}", "hf", s) for s in args.schedules
        ]
        run_phase(family, args, hf_configurations).print(f"{family.name} ({family.path.name}), HF", "HF generate")


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
    parser.add_argument("--no-hf", dest="hf", action="store_false", help="skip the HF generate() phase")
    parser.add_argument("--pause", type=float, default=0.5, help="seconds between configurations")
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
    from vtprune.vllm import ARCHITECTURES as VLLM_ARCHITECTURES
    from vtprune.vllm import engine_args

    for schedule in args.schedules:  # refused schedules fail here, before any engine starts
        engine_args("unused", schedule, architecture=next(iter(VLLM_ARCHITECTURES)))
    if args.device == "cpu":
        # The toys need a few MiB of KV cache; each engine runs inside its worker process (no engine-core child),
        # which starts faster on few cores. The workers inherit the environment.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import vllm

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_vllm_"))
    workdir.mkdir(parents=True, exist_ok=True)
    build = toy_families if args.device == "cpu" else cuda_families
    families = build(args.families, workdir, args.requests)
    print(
        f"vLLM {vllm.__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs; {args.requests} requests x {args.tokens} tokens per round, {args.rounds} rounds, "
        f"medians\nuptime at start: {uptime()}"
    )
    started = time.perf_counter()
    for family in families:
        bench_family(family, args)
    print(f"\nuptime at end: {uptime()}; {time.perf_counter() - started:.0f} s")


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


if __name__ == "__main__":  # vLLM spawns workers: the engine must not start on import
    main()
