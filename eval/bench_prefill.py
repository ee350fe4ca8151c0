"""LLM prefill time, unpruned vs pruned, side by side in one run, for every supported model class.

For each class a random-weight model (by default hidden 256, 8 layers; ``--hidden`` / ``--layers``
for bigger ones; 576 visual tokens per LLaVA / Qwen image, AnyRes adds tiles) runs the prefill that
generate() runs: images are encoded once beforehand (as generate() does), so the timed part is the
LLM plus vtprune's hooks. Runs are interleaved and the minimum of ``--repeats`` is kept, which suppresses noise from
other processes on a shared machine.

Printed per (class, schedule): measured speedup; the token-count bound (unpruned tokens summed over
layers / pruned tokens summed over layers, i.e. the speedup if time were linear in tokens) and the speedup's share of
it ("of bound"); "short ms", the same model without vtprune fed the very sequence the pruned prefill handed its LLM
(the input hook's shortened ids, encoder outputs, mask and positions: what the shorter sequence alone costs; "-" for
schedules that also prune inside the decoder), and "of short" = short ms / pruned ms, the share of that speed the
pruned prefill keeps (1 - vtprune's own cost: hooks and selection). So of bound = (unpruned / short) / bound x of
short: the model's per-forward work that does not shrink with tokens (weights read once per forward, masks, rotary
tables, the head) is the first factor, vtprune the second. Then the time spent in vtprune's hooks and in selection as
a share of the unpruned prefill, and the peak tensor memory of one prefill (``vtprune.testing.peak_extra_bytes``: the profiler's
allocation and free events, in a separate untimed run; it must fall with the kept ratio). With ``--batch 8`` every
row has its own images, so each sample gets its own keep set. The header notes the 1-minute load average.

``--profile`` adds a second table, where the time goes (``torch.profiler``, one prefill at a time in ``--repeats``
interleaved rounds after the timed ones, medians): the self time of the model's ops by kind (matrix products, attention, the rest) in the unpruned
prefill and in the short one, with their ratio to set against the bound; vtprune's own time in the pruned prefill
(its ``vtprune.*`` profiler ranges, Python included); and the pruned prefill's model ops less the short one's, which
is what vtprune makes the model do beyond the shorter sequence.

The bound only means something where per-token layer work dominates the forward: the README's figures (and the
issue's ">= 0.9 of the bound" check) are read at ``--hidden 1024 --layers 8``. At the default 256-wide decoder the
per-forward costs are a large share of a pruned prefill, and ``--shape`` (a 7B decoder's width, any class) is too slow
for every class on a 2-core CPU; it is for GPUs.

    python eval/bench_prefill.py                      # all classes, default schedules
    OMP_NUM_THREADS=1 python eval/bench_prefill.py --hidden 1024 --layers 8 \
        --schedules uniform:25% uniform:11% divprune:25% divprune:11% fastv@2:25%   # the README's figures
    python eval/bench_prefill.py --kinds llava --repeats 7 --device cuda --dtype bfloat16
    python eval/bench_prefill.py --batch 8 --schedules divprune:25% divprune:11%
    OMP_NUM_THREADS=1 python eval/bench_prefill.py --hidden 1024 --layers 8 --schedules uniform:11% divprune:11% \
        --repeats 3 --profile                          # the README's "where the time goes"
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import replace
from functools import partial

import torch
from torch.autograd import DeviceType

import vtprune
from vtprune.adapters import architecture
from vtprune.errors import VTPruneError
from vtprune.testing import MID, MODEL_KINDS, RowSpec, Size, build_inputs, build_model, peak_extra_bytes
from vtprune.vocabulary.compat import CACHE_KWARG

SCHEDULES = ["uniform:50%", "uniform:25%", "uniform:11%", "divprune:25%", "divprune:11%", "fastv@2:50%", "fastv@2:25%"]

#: ``--shape``: the text decoders of real 7B models (width, heads, KV heads, MLP width, depth); the vision towers
#: stay small, since images are encoded before the timed prefill.
SHAPES = {
    "llava-1.5-7b": {"hidden": 4096, "heads": 32, "kv_heads": 32, "intermediate": 11008, "layers": 32},
    "qwen2.5-vl-7b": {"hidden": 3584, "heads": 28, "kv_heads": 4, "intermediate": 18944, "layers": 28},
}


def image_rows(kind: str, batch: int) -> list[RowSpec]:
    # The family's benchmark image: LLaVA, Gemma 3, InternVL, Qwen: about 576 tokens; NeXT/OneVision: a wide
    # AnyRes image (base + 2 tiles).
    image = architecture(kind).bench_image
    return [RowSpec(images=[image], text_before=16, text_after=24) for _ in range(batch)]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefill_inputs(model: torch.nn.Module, inputs: dict) -> dict:
    """Inputs as generate() hands them to the prefill: images already encoded."""
    adapter = vtprune.adapters.adapter_for(model)
    with torch.no_grad():
        return adapter.encode(dict(inputs))


def runs(model: torch.nn.Module, schedule: str) -> bool:
    """Whether the model's family runs ``schedule`` (it refuses, e.g., decoder stages over sliding-window layers)."""
    try:
        vtprune.prune(model, schedule).remove()
    except VTPruneError as error:
        print(f"<!-- {type(model).__name__} {schedule}: refused: {error} -->", flush=True)
        return False
    return True


def timed_prefill(model: torch.nn.Module, inputs: dict, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        model(**inputs, use_cache=True, logits_to_keep=1)
    synchronize(device)
    return time.perf_counter() - start


def peak_bytes(model: torch.nn.Module, inputs: dict, device: torch.device) -> int:
    """Peak tensor memory of one prefill, counted from zero at its start."""
    gc.collect()  # earlier runs' garbage, freed inside the measured one, would count against its own allocations
    return peak_extra_bytes(lambda: timed_prefill(model, inputs, device), device)


#: ``--profile``: ops whose self time counts as matrix products (the model's linear layers; attention's products are
#: inside its own kernel).
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation"}
SPLIT = ("matmul", "attention", "other", "vtprune")


def op_split(
    model: torch.nn.Module, inputs: dict, device: torch.device, schedule: str | None = None
) -> dict[str, float]:
    """Seconds of one prefill by kind: the model's ops' self time (on an accelerator their device time) by matmul /
    attention / other, and vtprune's: the host wall time of its outermost ``vtprune.*`` ranges, its Python included
    (on an accelerator: the time vtprune holds up the host, its waits for the device included; the device time of its
    own kernels is in no column)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    pruning = vtprune.pruned(model, schedule) if schedule else nullcontext()
    with pruning, torch.profiler.profile(activities=activities) as profile:
        timed_prefill(model, inputs, device)
    split = dict.fromkeys(SPLIT, 0.0)
    for event in profile.events():
        if event.device_type != DeviceType.CPU:  # kernels: their time is their launching op's device time
            continue
        in_vtprune = False
        parent = event.cpu_parent
        while parent is not None:
            in_vtprune |= parent.name.startswith("vtprune.")
            parent = parent.cpu_parent
        if event.name.startswith("vtprune."):
            if not in_vtprune:
                split["vtprune"] += event.cpu_time_total
            continue
        if in_vtprune:
            continue
        seconds = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        if event.name in MATMUL_OPS:
            split["matmul"] += seconds
        elif "scaled_dot_product" in event.name or "attention" in event.name:
            split["attention"] += seconds
        else:
            split["other"] += seconds
    return {kind: microseconds / 1e6 for kind, microseconds in split.items()}


def profiled_splits(
    model: torch.nn.Module, inputs: dict, shorts: dict[str, dict], device: torch.device, repeats: int
) -> dict[str, dict[str, dict[str, float]]]:
    """Per schedule, the median :func:`op_split` of the unpruned, short and pruned prefills, profiled one prefill
    at a time in interleaved rounds (as the timings are), so a change in the machine's load falls on all alike."""
    runs: dict[str, tuple[dict, str | None]] = {"none": (inputs, None)}
    for name, short_inputs in shorts.items():
        runs[f"short {name}"] = (short_inputs, None)
        runs[name] = (inputs, name)
    samples: dict[str, list[dict[str, float]]] = {key: [] for key in runs}
    for _ in range(repeats):
        for key, (run_inputs, schedule) in runs.items():
            samples[key].append(op_split(model, run_inputs, device, schedule))
    median = {
        key: {kind: statistics.median(split[kind] for split in splits) for kind in SPLIT}
        for key, splits in samples.items()
    }
    return {
        name: {"unpruned": median["none"], "short": median[f"short {name}"], "pruned": median[name]} for name in shorts
    }


def shortened_inputs(model: torch.nn.Module, inputs: dict, schedule: str, device: torch.device) -> dict | None:
    """What the pruned prefill hands the model: the kwargs vtprune's input hook makes of ``inputs`` (shortened ids
    and encoder outputs, the packed mask, the kept tokens' positions), less the cache it attaches. None for a
    schedule with decoder stages, whose sequence shrinks inside the forward."""
    seen: dict = {}

    def capture(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        seen.update(kwargs)

    with vtprune.pruned(model, schedule) as handle:
        if handle.schedule.decoder_stages:
            return None
        hook = model.register_forward_pre_hook(capture, with_kwargs=True)  # runs after vtprune's
        try:
            timed_prefill(model, inputs, device)
        finally:
            hook.remove()
    return {key: value for key, value in seen.items() if key not in (CACHE_KWARG, "use_cache", "logits_to_keep")}


def model_size(args: argparse.Namespace) -> Size:
    """The decoder ``--shape`` names (its depth unless ``--layers`` is given), or ``--hidden`` / ``--layers`` wide
    and deep with heads of 32 dims, GQA 2:1."""
    if args.shape:
        shape = dict(SHAPES[args.shape])
        shape["layers"] = args.layers or shape["layers"]
        return replace(MID, **shape)
    layers = args.layers or MID.layers
    return replace(MID, hidden=args.hidden, layers=layers, heads=args.hidden // 32, kv_heads=args.hidden // 64)


def bench_kind(kind: str, schedules: list[str], args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    with device:  # built where it runs: a 7B-shaped decoder's weights would take minutes to initialise on a CPU
        model = build_model(kind, model_size(args), attn_implementation=args.attn)
    model = model.to(dtype=args.dtype)
    inputs = build_inputs(model, image_rows(kind, args.batch))
    inputs = {k: v.to(device) if not v.is_floating_point() else v.to(device, args.dtype) for k, v in inputs.items()}
    inputs = prefill_inputs(model, inputs)
    schedules = [name for name in schedules if runs(model, name)]
    records = {}

    def pruned_prefill(name: str) -> float:
        with vtprune.pruned(model, name) as handle:
            seconds = timed_prefill(model, inputs, device)
        records[name] = handle.last_record
        return seconds

    # One round: the unpruned prefill, then per schedule the pruned one and the short one (the model alone on the
    # sequence the pruned one handed it).
    calls: dict[str, Callable[[], float]] = {"none": partial(timed_prefill, model, inputs, device)}
    shorts = {}  # per schedule that has one, the short sequence's inputs
    for name in schedules:
        calls[name] = partial(pruned_prefill, name)
        short_inputs = shortened_inputs(model, inputs, name, device)
        if short_inputs is not None:
            shorts[name] = short_inputs
            calls[f"short {name}"] = partial(timed_prefill, model, short_inputs, device)
    times: dict[str, list[float]] = {key: [] for key in calls}
    for _ in range(args.warmup + args.repeats):
        for key, call in calls.items():
            times[key].append(call())
    best = {name: min(values[args.warmup :]) for name, values in times.items()}
    peak = {"none": peak_bytes(model, inputs, device)}
    for name in schedules:
        with vtprune.pruned(model, name):
            peak[name] = peak_bytes(model, inputs, device)
    num_layers = len(model.model.language_model.layers)
    unpruned_tokens = int(inputs["attention_mask"].sum()) * num_layers
    splits = profiled_splits(model, inputs, shorts, device, args.repeats) if args.profile else {}
    rows = []
    for name in schedules:
        record = records[name]
        bound = unpruned_tokens / int(record.layer_lengths.sum())
        speedup = best["none"] / best[name]
        short = best.get(f"short {name}")
        rows.append(
            {
                "kind": kind,
                "schedule": name,
                "visual": f"{record.visual_tokens()['before'] // args.batch}->{record.visual_tokens_left() // args.batch}",
                "unpruned_ms": 1e3 * best["none"],
                "pruned_ms": 1e3 * best[name],
                "speedup": speedup,
                "bound": bound,
                "of_bound": speedup / bound,
                "short_ms": None if short is None else 1e3 * short,
                "of_short": None if short is None else short / best[name],
                "hooks": record.hook_seconds / best["none"],
                "selection": record.selection_seconds / best["none"],
                "unpruned_mb": peak["none"] / 2**20,
                "pruned_mb": peak[name] / 2**20,
                "split": splits.get(name),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", nargs="+", default=list(MODEL_KINDS), choices=MODEL_KINDS)
    parser.add_argument("--schedules", nargs="+", default=SCHEDULES)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=MID.hidden, help="text hidden size (heads of 32 dims, GQA 2:1)")
    parser.add_argument(
        "--layers", type=int, default=None, help=f"decoder layers (default {MID.layers}, or the shape's)"
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None, help="a real model's decoder (not --hidden)")
    parser.add_argument("--attn", default="sdpa", help="attention implementation: sdpa, eager, flash_attention_2")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", type=lambda name: getattr(torch, name))
    parser.add_argument("--profile", action="store_true", help="add where the time goes (torch.profiler)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    machine = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"# prefill benchmark: {machine}, {args.dtype}, batch {args.batch}, {args.shape or f'hidden {args.hidden}'}, "
        f"{model_size(args).layers} layers, {args.attn} attention, min of {args.repeats} interleaved runs, "
        f"load {os.getloadavg()[0]:.1f}"
    )
    header = [
        "class",
        "schedule",
        "visual/row",
        "unpruned ms",
        "pruned ms",
        "speedup",
        "bound",
        "of bound",
        "short ms",
        "of short",
        "hooks",
        "selection",
        "unpruned MB",
        "pruned MB",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    profiled = []
    for kind in args.kinds:
        for row in bench_kind(kind, args.schedules, args):
            if row["split"] is not None:
                profiled.append(row)
            short = "- | -" if row["short_ms"] is None else f"{row['short_ms']:.1f} | {row['of_short']:.2f}"
            print(
                f"| {row['kind']} | {row['schedule']} | {row['visual']} | {row['unpruned_ms']:.1f} | {row['pruned_ms']:.1f} "
                f"| x{row['speedup']:.2f} | x{row['bound']:.2f} | {row['of_bound']:.2f} | {short} | {row['hooks']:.1%} "
                f"| {row['selection']:.1%} | {row['unpruned_mb']:.1f} | {row['pruned_mb']:.1f} |",
                flush=True,
            )

    if profiled:
        print_split(profiled)


def print_split(rows: list[dict]) -> None:
    """``--profile``'s table: ms per prefill by kind of op, unpruned -> short, with ``x`` = unpruned / short to set
    against the bound; vtprune's own ms in the pruned prefill; the pruned prefill's model ops less the short one's."""
    print("\n# where the time goes (torch.profiler self time, ms per prefill)")
    header = ["class", "schedule", "bound", "matmul", "x", "attention", "x", "other ops", "x", "vtprune"]
    print("| " + " | ".join(header + ["pruned - short, model ops"]) + " |")
    print("|" + "---|" * (len(header) + 1))
    for row in rows:
        split = row["split"]
        cells = [row["kind"], row["schedule"], f"x{row['bound']:.2f}"]
        for kind in SPLIT[:-1]:
            unpruned, short = 1e3 * split["unpruned"][kind], 1e3 * split["short"][kind]
            cells += [f"{unpruned:.1f} -> {short:.1f}", f"x{unpruned / short:.2f}"]
        extra = sum(split["pruned"][kind] - split["short"][kind] for kind in SPLIT[:-1])
        cells += [f"{1e3 * split['pruned']['vtprune']:.1f}", f"{1e3 * extra:+.1f}"]
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
