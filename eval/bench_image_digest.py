"""What the vLLM plugin's image keys cost per image, against one vision-tower pass over the same image.

``vtprune.vllm.plan.image_digest`` (BLAKE3 of the image's bytes, shape, dtype and grid: what its kept set is remembered
under, computed once per image per step) and ``image_seed`` (the CRC32 of its pixels as float32 that seeds random
draws, computed when a kept set is selected; before the digest it was the key too, computed at every look-up), on
float32 pixels as the model receives them, on the CPU. The towers have random weights (float32, this CPU):

- LLaVA-1.5, 336 x 336 (576 tokens): pixels (3, 336, 336), CLIP ViT-L/14-336's tower (24 layers, width 1024);
- Qwen2-VL, 672 x 672 (576 tokens): 2304 patches of 1176 values, Qwen2-VL-7B's tower (depth 32, width 1280);
- Qwen2-VL, 1344 x 1344 (2304 tokens): 9216 patches, the digest and the seed only (the tower pass takes minutes on a
  CPU, and its cost grows faster with the patch count than the digest's, which is linear in the bytes).

Rounds interleave the timings (the order alternating, one warm-up round first; ``eval/bench_selection.py``'s
``interleaved_times``), the digest and the seed each timed as the mean of 20 calls per round; the medians of
``--repeats`` rounds are printed, with the machine load before and after.

    OMP_NUM_THREADS=1 python eval/bench_image_digest.py              # a few minutes (the towers)
    OMP_NUM_THREADS=1 python eval/bench_image_digest.py --no-towers  # the digest and the seed only: seconds
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import CLIPVisionConfig, CLIPVisionModel
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

from vtprune.vllm.plan import image_digest, image_seed

sys.path.insert(0, str(Path(__file__).parent))
from bench_selection import interleaved_times, load  # next to this script

CALLS = 20
#: One vision-tower pass over (pixels, grid).
Tower = Callable[[Tensor, Tensor | None], object]


def clip_tower() -> Tower:
    config = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336
    )
    config.patch_size = 14
    tower: nn.Module = CLIPVisionModel(config).eval()
    return lambda pixels, grid: tower(pixel_values=pixels[None])


def qwen2_vl_tower() -> Tower:
    tower: nn.Module = Qwen2VisionTransformerPretrainedModel(Qwen2VLVisionConfig()).eval()

    def encode(patches: Tensor, grid: Tensor | None) -> object:
        assert grid is not None, "Qwen2-VL's patches come with their grid"
        return tower(patches, grid_thw=grid[None])

    return encode


def repeated(fn: Callable[[], object]) -> Callable[[], None]:
    def calls() -> None:
        for _ in range(CALLS):
            fn()

    return calls


def row(name: str, pixels: Tensor, grid: Tensor | None, tower: Tower | None, repeats: int) -> str:
    """One table row: the medians of ``repeats`` interleaved rounds for one image."""
    fns: list[Callable[[], object]] = [
        repeated(lambda: image_digest(pixels, grid)),
        repeated(lambda: image_seed(pixels)),
    ]
    if tower is not None:
        fns.append(torch.inference_mode()(lambda: tower(pixels, grid)))
    times = interleaved_times(fns, torch.device("cpu"), repeats)
    digest, seed = (statistics.median(each) / CALLS for each in times[:2])
    cells = [
        name,
        f"{pixels.numel() * pixels.element_size() / 1e6:.1f}",
        f"{digest * 1e3:.2f} ms",
        f"{seed * 1e3:.2f} ms",
    ]
    if tower is None:
        cells += ["-", "-"]
    else:
        pass_ = statistics.median(times[2])
        cells += [f"{pass_:.2f} s", f"{digest / pass_:.1e}"]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-towers", action="store_true", help="time the digest and the seed only")
    args = parser.parse_args()
    torch.manual_seed(0)
    images: list[tuple[str, Tensor, Tensor | None, Callable[[], Tower] | None]] = [
        ("LLaVA-1.5 336 x 336, 576 tokens", torch.rand(3, 336, 336), None, clip_tower),
        ("Qwen2-VL 672 x 672, 576 tokens", torch.rand(2304, 1176), torch.tensor([1, 48, 48]), qwen2_vl_tower),
        ("Qwen2-VL 1344 x 1344, 2304 tokens", torch.rand(9216, 1176), torch.tensor([1, 96, 96]), None),
    ]
    print(f"torch threads {torch.get_num_threads()}; {load()}")
    print("| image | MB | image_digest | image_seed | tower pass | digest / tower |")
    print("|---|---|---|---|---|---|")
    for name, pixels, grid, build in images:
        tower = None if build is None or args.no_towers else build()
        print(row(name, pixels, grid, tower, args.repeats), flush=True)
    print(load())


if __name__ == "__main__":
    main()
