"""Selection time of every strategy at realistic sizes, as a share of the prefill it is meant to shrink.

Sizes: 576 x 4096 (LLaVA-1.5-7B: one 336 px image), 2880 x 4096 (LLaVA-NeXT-7B: five tiles), and
a batch of 8 images of 576. The reference is the unpruned prefill of a 7B-shaped decoder (hidden
4096, MLP 11008, 32 heads, 32 layers) over the same visual tokens plus 64 text tokens, estimated
as 32 x the time of one real decoder layer measured in the same run (same machine, same dtype).
Keep is 25 % of each image. Inputs each strategy reads are made at the matching shapes, per image
(question of 20 words, 1024-wide pre-projector features, seeds; one LLaVA-1.5-shaped projector for
zoo). The batch is timed twice: one ``vtprune.select`` call per image (each image its own greedy
loop) and one call of the engine for all images (what the hooks run: same-sized images as one
group); both must keep the same tokens.

    python eval/bench_selection.py                    # CPU, float32
    python eval/bench_selection.py --device cuda --sizes 576 2880
    python eval/bench_selection.py --sizes 576 --batch 8 --strategies divprune todre mmtok "zoo(directions:8)"
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

import vtprune
from vtprune.schedule import Budget, parse_strategy
from vtprune.selection import TokenInputs, select_tokens

HIDDEN, LAYERS, VISION = 4096, 32, 1024


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn, device: torch.device, repeats: int) -> float:
    return best_times([fn], device, repeats)[0]


def best_times(fns: list, device: torch.device, repeats: int) -> list[float]:
    """Fastest of ``repeats`` runs of each function, the functions interleaved so they share the machine's noise."""
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, runs in zip(fns, times):
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            runs.append(time.perf_counter() - start)
    return [min(runs) for runs in times]


def prefill_seconds(tokens: int, device: torch.device, dtype: torch.dtype, repeats: int) -> float:
    """Unpruned 7B-shaped prefill over ``tokens``: one real decoder layer, timed, times the depth."""
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)
    config._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(config, layer_idx=0).to(device, dtype).eval()
    hidden = torch.randn(1, tokens, HIDDEN, device=device, dtype=dtype)
    positions = torch.arange(tokens, device=device)[None]
    tables = LlamaRotaryEmbedding(config).to(device)(hidden, positions)
    with torch.no_grad():
        return LAYERS * best_time(
            lambda: layer(hidden, position_embeddings=tables, position_ids=positions), device, repeats
        )


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
        inputs["text_embeds"] = torch.randn(20, HIDDEN, generator=generator).to(device)
    if name in ("mmtok", "zoo"):
        inputs["pre_features"] = torch.randn(n, VISION, generator=generator).to(device)
    if name == "zoo":
        inputs["projector"] = projector
    if name == "todre_relevance":
        inputs["cross_shares"] = torch.tensor([0.05, 0.2], device=device)
    return inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=int, default=[576, 2880])
    parser.add_argument("--batch", type=int, default=8, help="images in the batched case (of the first size)")
    parser.add_argument(
        "--strategies",
        nargs="+",
        default=None,
        help="names or name(option:value), e.g. 'zoo(directions:8)'; default: all",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", type=lambda name: getattr(torch, name))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    device = torch.device(args.device)
    names = args.strategies or [n for n in vtprune.list_strategies() if not n.startswith("test_")]
    cases = [(n, 1) for n in args.sizes] + [(args.sizes[0], args.batch)]
    machine = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    )
    print(f"# selection benchmark: {machine}, prefill in {args.dtype}, selection in float32, keep 25 %")
    generator = torch.Generator().manual_seed(0)
    projector = torch.nn.Sequential(torch.nn.Linear(VISION, HIDDEN), torch.nn.GELU(), torch.nn.Linear(HIDDEN, HIDDEN))
    projector = projector.to(device)
    prefill = {}
    for n, images in cases:
        tokens = n * images + 64
        if tokens not in prefill:
            prefill[tokens] = prefill_seconds(tokens, device, args.dtype, max(1, args.repeats - 1))
        print(f"\n## {images} x {n} tokens x {HIDDEN}: unpruned 7B-shaped prefill ~{prefill[tokens]:.2f} s")
        if images == 1:
            print("| strategy | selection s | share of prefill |\n|---|---|---|")
        else:
            print("| strategy | one call per image s | one call for the batch s | speed-up | share of prefill |")
            print("|---|---|---|---|---|")
        features = [torch.randn(n, HIDDEN, generator=generator).to(device) for _ in range(images)]
        for spec in names:
            strategy = parse_strategy(spec)
            inputs = [selector_inputs(strategy.name, n, device, generator, projector, seed) for seed in range(images)]
            ratio = {"keep_ratio": 0.25} if strategy.needs_budget else {}
            kept = {}

            def per_image() -> None:
                kept["per image"] = [
                    vtprune.select(strategy, image, **ratio, **extra) for image, extra in zip(features, inputs)
                ]

            batch = [(image, TokenInputs(**extra)) for image, extra in zip(features, inputs)]

            def batched() -> None:
                kept["batched"] = select_tokens(strategy, Budget(**ratio) if ratio else None, batch)

            with torch.no_grad():
                try:
                    if images == 1:
                        seconds = best_time(per_image, device, args.repeats)
                        print(f"| {spec} | {seconds:.4f} | {seconds / prefill[tokens]:.2%} |", flush=True)
                        continue
                    looped, together = best_times([per_image, batched], device, args.repeats)
                except (ValueError, vtprune.VTPruneError) as error:  # e.g. a grid it cannot pool
                    print(f"| {spec} | n/a ({error}) | |")
                    continue
            same = all(torch.equal(a, b) for a, b in zip(kept["per image"], kept["batched"]))
            assert same, f"{spec}: the batch kept other tokens than the images one by one"
            share = together / prefill[tokens]
            print(f"| {spec} | {looped:.4f} | {together:.4f} | {looped / together:.2f}x | {share:.2%} |", flush=True)


if __name__ == "__main__":
    main()
