"""Train a small CLIP text tower against a toy VLM's vision features, for ``text_tower=`` relevance on the toys.

The toys have no CLIP partner for their vision towers, so CDPruner's and TRIM's CLIP relevance would be noise.
This trains one, contrastively, on the training scenes: the text is exactly what the strategies see at inference
(the question's content words, decoded by vtprune from the prompt tokens) and the image side is exactly what they
project (the features the VLM's projector reads, through a trained ``post_layernorm`` + ``visual_projection``).
The loss is an InfoNCE over the 144 patches of the question's own scene, every patch of the objects the question
asks about (``Sample.relevant``) a positive — the patch-level analogue of CLIP's image–caption objective, which is
what relevance scores use. The VLM stays frozen. The result is a transformers ``CLIPModel`` folder (its vision
transformer is unused random weights; only the text side and the two image-side layers are trained) with a
character-level CLIP tokenizer, loadable as ``text_tower=<folder>``.

    python eval/train_toy_text_tower.py --model vtprune/assets/toy_llava --out vtprune/assets/toy_llava/clip_text
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

import vtprune
from vtprune.strategies import Strategy
from vtprune.toyvlm import load_toy_model, make_split, object_patch_mask
from vtprune.toyvlm.data import TRAIN_SEED_BASE, VALIDATION_SEED
from vtprune.toyvlm.model import prompt_inputs

CHARS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789?.,'-")


class Recorder(Strategy):
    """Keeps everything and records the inputs a text-tower strategy reads."""

    needs = frozenset({"instruction", "pre_features"})
    needs_budget = False  # so the engine calls it although it prunes nothing

    def __init__(self) -> None:
        self.seen: list[tuple[str, torch.Tensor]] = []

    def select(self, ctx):
        self.seen.append((ctx.instruction, ctx.pre_features))
        return torch.arange(ctx.keep)


def scene_inputs(model, processor, samples, batch_size: int = 50) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(instruction, pre-projector features (N, W), relevant-patch mask (N,)) per sample with relevant objects."""
    recorder = Recorder()
    with torch.no_grad(), vtprune.pruned(model, recorder, tokenizer=processor):
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            model(**prompt_inputs(processor, [s.image for s in chunk], [s.question for s in chunk]))
    data = []
    for sample, (instruction, features) in zip(samples, recorder.seen):
        mask = torch.tensor(object_patch_mask(sample, relevant_only=True))
        if bool(mask.any()) and features is not None:
            data.append((instruction, features, mask))
    return data


def char_tokenizer(folder: Path) -> CLIPTokenizer:
    """A character-level CLIP tokenizer (no merges) written to ``folder``: ids 0 (start), the characters, end last."""
    vocab = {"<|startoftext|>": 0, **{c: 1 + i for i, c in enumerate(CHARS)}}
    vocab.update({f"{c}</w>": len(vocab) + i for i, c in enumerate(CHARS)})
    vocab["<|endoftext|>"] = len(vocab)  # the largest id, as in CLIP's vocabulary
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


def build_tower(width: int, folder: Path) -> tuple[CLIPModel, CLIPTokenizer]:
    tokenizer = char_tokenizer(folder)
    eos = tokenizer.eos_token_id
    text = {"vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
    text.update(num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=eos, pad_token_id=eos)
    vision = {"hidden_size": width, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 1}
    vision.update(image_size=16, patch_size=16)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=64))
    return model, tokenizer


def relevance_logits(model: CLIPModel, tokenizer, batch) -> torch.Tensor:
    """(B, N) cosine / temperature between each instruction and its scene's patches."""
    encoded = tokenizer([instruction for instruction, _, _ in batch], return_tensors="pt", padding=True)
    text = F.normalize(model.get_text_features(**encoded).pooler_output, dim=-1)
    patches = torch.stack([features for _, features, _ in batch])
    image = F.normalize(model.visual_projection(model.vision_model.post_layernorm(patches)), dim=-1)
    return torch.einsum("bd,bnd->bn", text, image) * model.logit_scale.exp()


def loss_of(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """InfoNCE with several positives: minus the log of the softmax mass on the relevant patches."""
    log_p = logits.log_softmax(dim=-1)
    return -(log_p.masked_fill(~masks, -torch.inf).logsumexp(dim=-1)).mean()


def top1(model, tokenizer, data) -> float:
    """Share of questions whose most relevant patch is one of the relevant objects'."""
    with torch.no_grad():
        logits = relevance_logits(model, tokenizer, data)
    masks = torch.stack([mask for _, _, mask in data])
    return float(masks.gather(1, logits.argmax(dim=1, keepdim=True)).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="toy VLM folder")
    parser.add_argument("--out", required=True, help="folder for the CLIP text tower")
    parser.add_argument("--scenes", type=int, default=3000)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    vlm, processor = load_toy_model(args.model)
    train = scene_inputs(vlm, processor, make_split(TRAIN_SEED_BASE, args.scenes))
    validation = scene_inputs(vlm, processor, make_split(VALIDATION_SEED, 300))
    width = train[0][1].shape[1]
    out = Path(args.out)
    model, tokenizer = build_tower(width, out)
    model.logit_scale.requires_grad_(False)  # fixed at CLIP's initial 1/0.07
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01)
    generator = torch.Generator().manual_seed(args.seed)
    for step in range(args.steps):
        batch = [train[i] for i in torch.randint(len(train), (args.batch_size,), generator=generator).tolist()]
        loss = loss_of(relevance_logits(model, tokenizer, batch), torch.stack([mask for _, _, mask in batch]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {loss.item():.3f}, validation top-1 {top1(model, tokenizer, validation):.3f}")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"saved {out} ({len(train)} training questions, {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
