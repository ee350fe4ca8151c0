"""Selection time and memory: vtprune against the papers' own formulations, and as a share of the prefill.

Default: DivPrune and MMTok against plain implementations of the papers' formulations
(``eval/paper_selectors.py``: DivPrune's float32 cosine matrix and O(k²N) re-gather loop, MMTok's
dense coverage loop; both reproduce the authors' recorded picks, tests/strategies/test_parity.py) on the same
inputs, at N in {576, 1752, 2880} tokens, D in {1024, 4096}, k in {64, 10 %}, float32 and bfloat16
tokens, batches of 1 and 8 images (each image its own keep set: vtprune runs the engine's
``select_tokens`` for the batch, the paper one call per image). ``--inputs`` picks what the tokens are: ``gaussian``
(i.i.d. normal, no redundancy) and/or ``photo``: real image content, scikit-learn's two sample photographs
(``vtprune.viz.photos``; CC BY 2.0, docs/PHOTO_ATTRIBUTION.md) cut into N 14 x 14 patches of the centre square,
normalised with CLIP's pixel mean / std and mapped to the width D (and, for MMTok's pre-projector features, to
1024) by fixed seeded Gaussian random projections, which keep the patches' cosine similarities up to O(1/sqrt(D))
(Johnson-Lindenstrauss): the natural-texture redundancy of a photo (sky, walls, petals) without a trained encoder.
Image i of a batch is photo i mod 2 turned by (i div 2) quarter turns. The text embeddings stay Gaussian. Rounds are interleaved (the order
alternates), ``--repeats`` >= 5 of them; median and min are printed, and the ratio of the medians
(vtprune / paper: below 1 is faster); every dtype of a configuration runs in the same rounds, and "vtprune vs
<first dtype>" is the ratio of vtprune's medians across dtypes (half precision against float32 by default). Peak extra memory is the largest net amount of tensor memory
the call holds at once, read from the allocation and free events of ``torch.profiler``
(``profile_memory=True``: every tensor the CPU allocator hands out and takes back, inputs excluded,
library-internal scratch such as MKL's not seen) in a separate untimed run. The machine load
(``os.getloadavg``) is printed before and after: on a shared machine compare ratios, not times.

``--shares``: every strategy's selection time as a share of the unpruned prefill of a 7B-shaped
decoder (hidden 4096, MLP 11008, 32 heads, 32 layers) over the same tokens plus 64 text tokens,
estimated as 32 x one real decoder layer timed in the same run; sizes 576 x 4096, 2880 x 4096 and a
batch of 8 x 576, keep 25 %; the batch is timed as one call per image and one engine call for all
images (which must keep the same tokens).

    python eval/bench_selection.py --quick            # 576 and 1752 tokens, k = 64, batch 1: a few minutes
    python eval/bench_selection.py --quick --inputs gaussian photo --sizes 576 --widths 1024
    python eval/bench_selection.py                    # the full grid (long on a 2-core CPU)
    python eval/bench_selection.py --shares --sizes 576 --batch 8 --strategies divprune todre mmtok "zoo(directions:8)"
    python eval/bench_selection.py --device cuda --dtypes bfloat16
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

import vtprune
from vtprune.engine.selection import select_tokens
from vtprune.schedule import Budget, parse_strategy
from vtprune.strategies.base import TokenContext
from vtprune.testing import peak_extra_bytes
from vtprune.viz.photos import photo_patches, sample_photos

sys.path.insert(0, str(Path(__file__).parent))
import paper_selectors  # next to this script

HIDDEN, LAYERS, VISION, WORDS = 4096, 32, 1024, 20
CLIP_MEAN, CLIP_STD = torch.tensor([0.4815, 0.4578, 0.4082]), torch.tensor([0.2686, 0.2613, 0.2758])
PATCH = 14


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(fns: list[Callable[[], object]], device: torch.device, repeats: int) -> list[list[float]]:
    """Seconds of ``repeats`` runs of each function, the functions interleaved (their order alternating each round)
    so they share the machine's noise; one untimed warm-up round first."""
    times: list[list[float]] = [[] for _ in fns]
    for round_ in range(repeats + 1):
        order = list(range(len(fns)))[:: 1 if round_ % 2 else -1]
        for index in order:
            synchronize(device)
            start = time.perf_counter()
            fns[index]()
            synchronize(device)
            if round_:
                times[index].append(time.perf_counter() - start)
    return times


def load() -> str:
    return "load average " + " / ".join(f"{x:.1f}" for x in os.getloadavg()) + " (1 / 5 / 15 min)"


# --- vtprune against the papers' formulations ------------------------------------------------------------------


def random_projection(width: int) -> torch.Tensor:
    """The fixed map from a flattened RGB patch to ``width`` features: Gaussian, seeded by the width, scaled so
    that lengths and inner products are kept in expectation."""
    inputs = 3 * PATCH * PATCH
    return torch.randn(inputs, width, generator=torch.Generator().manual_seed(width)) / inputs**0.5


def photo_features(n: int, widths: tuple[int, ...], batch: int) -> list[list[torch.Tensor]]:
    """Per image of the batch, its ``n`` photo patches at each of ``widths`` (see the module docstring)."""
    photos = sample_photos()
    images = []
    for index in range(batch):
        photo = photos[index % len(photos)].rotate(90 * (index // len(photos)), expand=True)
        patches = photo_patches(photo, n, PATCH).view(n, PATCH, PATCH, 3)
        pixels = ((patches - CLIP_MEAN) / CLIP_STD).reshape(n, -1)
        images.append([pixels @ random_projection(width) for width in widths])
    return images


def token_features(
    kind: str, n: int, width: int, batch: int, generator: torch.Generator
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(tokens at ``width``, pre-projector features at VISION), one of each per image, float32 on the CPU."""
    if kind == "photo":
        return tuple(map(list, zip(*photo_features(n, (width, VISION), batch))))
    tokens = [torch.randn(n, width, generator=generator) for _ in range(batch)]
    return tokens, [torch.randn(n, VISION, generator=generator) for _ in range(batch)]


def paper_cases(
    method: str, images: list[torch.Tensor], pre_features: list[torch.Tensor], k: int, generator: torch.Generator
) -> tuple:
    """(vtprune call, paper call) for ``method`` on ``images`` (MMTok also gets their ``pre_features``), each image
    its own keep set."""
    dtype, device = images[0].dtype, images[0].device
    if method == "divprune":
        inputs = [TokenContext(features=x, keep=x.shape[0]) for x in images]
        strategy = parse_strategy("divprune")

        def paper() -> list[torch.Tensor]:
            return [paper_selectors.divprune(x, k).sort().values for x in images]

    else:
        inputs = [
            TokenContext(
                features=x,
                keep=x.shape[0],
                text_embeds=torch.randn(WORDS, x.shape[1], generator=generator).to(device, dtype),
                pre_features=pre.to(device, dtype),
            )
            for x, pre in zip(images, pre_features)
        ]
        strategy = parse_strategy("mmtok")

        def paper() -> list[torch.Tensor]:
            return [
                paper_selectors.mmtok(extra.text_embeds, x, extra.pre_features, k).sort().values
                for x, extra in zip(images, inputs)
            ]

    def ours() -> list[torch.Tensor]:
        return select_tokens(strategy, Budget(keep=k), inputs)

    return ours, paper


def compare_with_papers(args: argparse.Namespace, device: torch.device) -> None:
    generator = torch.Generator().manual_seed(0)
    first = str(args.dtypes[0]).removeprefix("torch.")
    print(f"# selection against the papers' formulations: {machine(device)}; {args.repeats} interleaved rounds")
    print(f"# before: {load()}")
    print(
        "| method | inputs | N | D | k | dtype | batch | vtprune median / min ms | paper median / min ms "
        f"| time ratio | vtprune vs {first} | vtprune MB | paper MB | memory ratio | same picks |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        for width in args.widths:
            for k in [64] if args.quick else dict.fromkeys([64, round(0.1 * n)]):
                for batch, kind in itertools.product(args.batches, args.inputs):
                    tokens, pre_features = token_features(kind, n, width, batch, generator)
                    for method in args.methods:
                        # Every dtype's two calls in the same interleaved rounds, so "vtprune vs <first dtype>"
                        # compares the dtypes under the same machine noise.
                        cases = {
                            dtype: paper_cases(
                                method, [x.to(device, dtype) for x in tokens], pre_features, k, generator
                            )
                            for dtype in args.dtypes
                        }
                        with torch.no_grad():
                            times = interleaved_times(
                                [fn for pair in cases.values() for fn in pair], device, args.repeats
                            )
                        baseline = statistics.median(times[0])
                        for index, (dtype, (ours, paper)) in enumerate(cases.items()):
                            mine, theirs = times[2 * index], times[2 * index + 1]
                            with torch.no_grad():
                                memory = [peak_extra_bytes(fn, device) for fn in (ours, paper)]
                                same = all(torch.equal(a, b.to(a.device)) for a, b in zip(ours(), paper()))
                            ms = [1e3 * statistics.median(mine), 1e3 * min(mine)]
                            ref = [1e3 * statistics.median(theirs), 1e3 * min(theirs)]
                            print(
                                f"| {method} | {kind} | {n} | {width} | {k} | {str(dtype).removeprefix('torch.')} | {batch} "
                                f"| {ms[0]:.1f} / {ms[1]:.1f} | {ref[0]:.1f} / {ref[1]:.1f} | {ms[0] / ref[0]:.2f} "
                                f"| {statistics.median(mine) / baseline:.2f} "
                                f"| {memory[0] / 2**20:.1f} | {memory[1] / 2**20:.1f} | {memory[0] / memory[1]:.2f} "
                                f"| {'yes' if same else 'no'} |",
                                flush=True,
                            )
    print(f"# after: {load()}")


# --- selection as a share of the prefill -----------------------------------------------------------------------


def prefill_seconds(tokens: int, device: torch.device, dtype: torch.dtype, repeats: int) -> float:
    """Unpruned 7B-shaped prefill over ``tokens``: one real decoder layer, timed (median), times the depth."""
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)
    config._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(config, layer_idx=0).to(device, dtype).eval()
    hidden = torch.randn(1, tokens, HIDDEN, device=device, dtype=dtype)
    positions = torch.arange(tokens, device=device)[None]
    tables = LlamaRotaryEmbedding(config).to(device)(hidden, positions)
    with torch.no_grad():
        runs = interleaved_times(
            [lambda: layer(hidden, position_embeddings=tables, position_ids=positions)], device, repeats
        )[0]
    return LAYERS * statistics.median(runs)


def selector_inputs(
    name: str, n: int, device: torch.device, generator: torch.Generator, projector: torch.nn.Module, seed: int
) -> dict:
    side = int(n**0.5)
    inputs: dict = {"seed": seed}
    if name in ("uniform", "matryoshka") and side * side == n:
        inputs["grid"] = (1, side, side)
    if name == "fastv":
        inputs["attention"] = torch.rand(n, generator=generator).to(device)
    if name == "todre":
        inputs["cls_attention"] = torch.rand(n, generator=generator).to(device)
    if name in ("mmtok", "cdpruner", "trim"):
        inputs["text_embeds"] = torch.randn(WORDS, HIDDEN, generator=generator).to(device)
    if name in ("mmtok", "zoo"):
        inputs["pre_features"] = torch.randn(n, VISION, generator=generator).to(device)
    if name == "zoo":
        inputs["projector"] = projector
    if name == "todre_relevance":
        inputs["cross_shares"] = torch.tensor([0.05, 0.2], device=device)
    return inputs


def selection_calls(strategy, features: list[torch.Tensor], inputs: list[dict], kept: dict) -> tuple:
    """(one call per image, one engine call for the batch) selecting 25 % of ``features``; each writes its picks
    into ``kept`` under "per image" / "batched"."""
    ratio = {"keep_ratio": 0.25} if strategy.needs_budget else {}
    batch = [TokenContext(features=image, keep=image.shape[0], **extra) for image, extra in zip(features, inputs)]

    def per_image() -> None:
        kept["per image"] = [
            vtprune.select(strategy, image, **ratio, **extra) for image, extra in zip(features, inputs)
        ]

    def batched() -> None:
        kept["batched"] = select_tokens(strategy, Budget(**ratio) if ratio else None, batch)

    return per_image, batched


def shares_of_prefill(args: argparse.Namespace, device: torch.device) -> None:
    names = args.strategies or [n for n in vtprune.list_strategies() if not n.startswith("test_")]
    cases = [(n, 1) for n in args.sizes] + [(args.sizes[0], args.batch)]
    dtype = args.dtypes[0]
    print(f"# selection benchmark: {machine(device)}, prefill in {dtype}, keep 25 %, median of {args.repeats}")
    print(f"# before: {load()}")
    generator = torch.Generator().manual_seed(0)
    projector = torch.nn.Sequential(torch.nn.Linear(VISION, HIDDEN), torch.nn.GELU(), torch.nn.Linear(HIDDEN, HIDDEN))
    projector = projector.to(device)
    prefill = {}
    for n, images in cases:
        tokens = n * images + 64
        if tokens not in prefill:
            prefill[tokens] = prefill_seconds(tokens, device, dtype, max(1, args.repeats - 1))
        print(f"\n## {images} x {n} tokens x {HIDDEN}: unpruned 7B-shaped prefill ~{prefill[tokens]:.2f} s")
        if images == 1:
            print("| strategy | selection s | share of prefill |\n|---|---|---|")
        else:
            print("| strategy | one call per image s | one call for the batch s | speed-up | share of prefill |")
            print("|---|---|---|---|---|")
        features = [torch.randn(n, HIDDEN, generator=generator).to(device, dtype) for _ in range(images)]
        for spec in names:
            strategy = parse_strategy(spec)
            inputs = [selector_inputs(strategy.name, n, device, generator, projector, seed) for seed in range(images)]
            kept: dict[str, list[torch.Tensor]] = {}
            per_image, batched = selection_calls(strategy, features, inputs, kept)
            with torch.no_grad():
                try:
                    if images == 1:
                        seconds = statistics.median(interleaved_times([per_image], device, args.repeats)[0])
                        print(f"| {spec} | {seconds:.4f} | {seconds / prefill[tokens]:.2%} |", flush=True)
                        continue
                    looped, together = map(
                        statistics.median, interleaved_times([per_image, batched], device, args.repeats)
                    )
                except (ValueError, vtprune.VTPruneError) as error:  # e.g. a grid it cannot pool
                    print(f"| {spec} | n/a ({error}) | |")
                    continue
            same = all(torch.equal(a, b) for a, b in zip(kept["per image"], kept["batched"]))
            assert same, f"{spec}: the batch kept other tokens than the images one by one"
            share = together / prefill[tokens]
            print(f"| {spec} | {looped:.4f} | {together:.4f} | {looped / together:.2f}x | {share:.2%} |", flush=True)
    print(f"# after: {load()}")


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shares", action="store_true", help="every strategy as a share of a 7B-shaped prefill")
    parser.add_argument(
        "--quick", action="store_true", help="against the papers: k = 64 only; default sizes 576 1752, batch 1"
    )
    parser.add_argument("--sizes", nargs="+", type=int, default=None, help="tokens per image (default 576 1752 2880)")
    parser.add_argument("--widths", nargs="+", type=int, default=[1024, 4096])
    parser.add_argument("--batches", nargs="+", type=int, default=None, help="images per call (default 1 8)")
    parser.add_argument("--methods", nargs="+", default=["divprune", "mmtok"], choices=["divprune", "mmtok"])
    parser.add_argument(
        "--inputs",
        nargs="+",
        default=["gaussian"],
        choices=["gaussian", "photo"],
        help="against the papers: i.i.d. Gaussian tokens and/or projected photo patches (scikit-learn's samples)",
    )
    parser.add_argument("--batch", type=int, default=8, help="--shares: images in the batched case (of the first size)")
    parser.add_argument(
        "--strategies",
        nargs="+",
        default=None,
        help="--shares: names or name(option:value), e.g. 'zoo(directions:8)'; default: all",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtypes", nargs="+", default=[torch.float32, torch.bfloat16], type=lambda name: getattr(torch, name)
    )
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    device = torch.device(args.device)
    if args.shares:
        if args.inputs != ["gaussian"]:
            parser.error("--inputs: --shares times Gaussian tokens only; leave --inputs out with --shares")
        args.sizes = args.sizes or [576, 2880]
        shares_of_prefill(args, device)
        return
    args.sizes = args.sizes or ([576, 1752] if args.quick else [576, 1752, 2880])
    args.batches = args.batches or ([1] if args.quick else [1, 8])
    compare_with_papers(args, device)


if __name__ == "__main__":
    main()
