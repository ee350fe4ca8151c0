"""Seeded CPU training of the toy LLaVA on the synthetic shapes QA task.

Recipe (each part was needed; probes of 400-600 steps on 2 CPU cores, answer accuracy with only the object
tokens visible, told which):
- question *before* the image in the prompt, so image tokens can condition on the question (see model.py);
- the answer loss (the answer word and ``</s>``) plus a dense per-image-token loss: the LM head at an image token
  must say the token's share of the answer if the object there is one the question asks about (its colour for a
  colour question, its shape for shape and position questions, "yes" for count and exists questions) and "no"
  otherwise, weighted equally over relevant objects, other objects and background. With the answer loss alone,
  5 question types reached ~45 %; a yes/no relevance target ~50 %; this target ~70 % at 600 steps, because the
  answer is then already written at the object's token and the last position only has to find it. It touches
  training only: the model stays a plain LLaVA;
- a curriculum on background: for the first 20 % of steps background tokens are masked out of attention (the
  object tokens keep their positions), then a growing random share of them is shown, all of them from 60 % on:
  binding a question word to 1 of ~150 keys through near-uniform attention is what learns slowly;
- a curriculum on scene size: at most 2 objects at first, one more every 10 % of steps (all 5 from 30 %);
- AdamW (betas 0.9/0.98, weight decay 0.01), linear warm-up, cosine decay to 10 %, gradient clipping at 1;
- fresh samples every step (an infinite stream; no sample is seen twice); checkpoints chosen on the validation
  split, never on the test split the benchmark and the README figures use.

The shipped checkpoint (``vtprune/assets/toy_llava``, 980,672 parameters, 3.9 MB) is the last of the 100 %
validation checkpoints of ``python eval/train_toy_vlm.py --out vtprune/assets/toy_llava --threads 2`` (defaults:
5000 steps, batch 30, lr 1e-3, seed 0; 64 minutes on the 2-core CI-class CPU, shared with other jobs for part of
it, 2026-12-01). Validation accuracy (250 questions, full images / object tokens only) by step: 250: 12 % / 73 %,
500: 4 % / 92 % (background still hidden), 1250: 77 % / 93 %, 1500: 92 % / 97 %, 2000: 99.6 % / 99.6 %, 2500 on:
100 %. On the test split (300 questions, ``eval/bench_accuracy.py``): 100 % on every question type; object tokens
only 100 %; background tokens only 32.7 % (chance: 25-50 % by type).

The Qwen2-VL variant (``vtprune/assets/toy_qwen2_vl``, 989,312 parameters) is the same recipe and defaults:
``python eval/train_toy_vlm.py --family qwen2_vl --out vtprune/assets/toy_qwen2_vl --threads 2`` (50 minutes,
2026-12-01). Validation (full / object tokens only) by step: 500: 20 % / 84 %, 1000: 52 % / 88 %, 1500: 88 % /
98 %, 2000: 98.4 % / 98.4 %; from there colour, shape, count and exists stay at 100 % while position questions swing
between 68 and 92 %; the shipped checkpoint is step 3750 (98.4 %). Position is the hard type here because its depth-0
vision tower adds no position embedding: where a token lies is known to the LLM only through M-RoPE. Test split:
97.3 % overall (position 86.7 %, every other type 100 %); object tokens only 97.0 %; background only 25.7 %.

The digits task (``--task digits``, ``vtprune.toyvlm.digits``), 2026-12-05, one thread:

- First run, first geometry (digits of 20-28 px at any offset, 2 x 2 to 3 x 3 tokens) and the per-token target on
  every token of an asked digit: ``python eval/train_toy_vlm.py --task digits --out vtprune/assets/toy_llava_digits
  --steps 2400 --batch-size 24 --text-hidden 128 --text-layers 8 --threads 1`` (1,832,384 parameters, 1.2 CPU s a
  step), at load 10-12; validation (full / object tokens only) at 200, 400, 600, 800, 1000 steps: 24.0 / 30.8,
  28.8 / 30.8, 29.2 / 26.8, 26.8 / 28.4, 28.0 / 28.4 % (chance 29 %), stopped at chance.
- Probe 1, same geometry: position questions only, at most 2 digits, background hidden, the per-token target on a
  digit's *last* patch in raster order only (the one token that sees all of it under causal attention; its other
  patches left out of the loss) plus a reading loss halfway up (below), batch 16, lr 2e-3, warm-up 30: 300 steps,
  objects-only 10 / 10 / 9 % at steps 100 / 200 / 300 (chance 10 %), the reading loss at 2.30 (chance: ln 10).
- Probe 2, same geometry: the reading loss alone, at the last layer, one digit per scene: 120 steps, loss
  2.30-2.39, chance. Reading itself was not learnable: ``python eval/digits_readability.py --sizes 20 28`` (a
  logistic regression on the pixels of the 3 x 3 patches around a digit) reads 16.7 % of held-out digits, the
  shipped geometry (24 px at half-cell offsets, exactly 2 x 2 tokens) 94.7 %; so the generator changed to that.
- Second run, shipped geometry and recipe: the shapes recipe with the per-token target on each object's last patch
  (as in probe 1; for shapes, whose objects are one patch, this is the old target) and, for tasks whose object word
  names the object whatever the question (``Task.reads_objects``: the digit), a *reading loss*: the LM head applied
  to the decoder's middle layer (4 of 8) must name every digit at its last patch, asked about or not -- training
  only, the model stays a plain LLaVA. ``python eval/train_toy_vlm.py --task digits --out run2 --steps 3200
  --batch-size 16 --warmup 150 --eval-every 200 --text-hidden 128 --text-layers 8 --threads 1`` (seed 0; 3,800 s
  wall at load 3-7, 0.85-1.75 s a step). Validation (250 questions; full / object tokens only, %) by step: 200:
  37.2 / 46.4 (background still hidden), 400: 34.4 / 50.0, 600: 36.0 / 51.2, 800: 51.2 / 52.0, 1000: 55.2 / 52.8,
  1200: 54.4 / 54.8, 1400: 63.2 / 64.0, 1600: 73.2 / 70.0, 1800: 78.4 / 78.8, 2000: 78.0 / 76.8, 2200: 81.6 /
  78.0, 2400: 85.6 / 84.4, 2600: 86.0 / 83.2, 2800: 83.6 / 84.0, 3000: 86.0 / 84.8, 3200 (the end): 88.4 / 83.6. Per
  type at step 3000: position 94, largest 94, exists 90, count 84, compare 68 %; at 3200 compare 84, count 78: the
  digits are read, the two-digit comparison and counting lag (the comparison's per-token target names both digits
  alike, so the answer position must still find which is named first). Test split: 88.0 % unpruned.
- Third run, continuing the second (``--init``: its weights, a fresh optimiser and schedule, the curricula done):
  ``python eval/train_toy_vlm.py --task digits --init run2 --out run3 --steps 1600 --seed 1 --batch-size 16 --lr 3e-4
  --warmup 50 --eval-every 200 --threads 1`` (972 s wall at load 1-3, 0.6 s a step). Validation (full / object tokens
  only, %) by step: 200: 84.0 / 80.8, 400: 88.4 / 86.4, 600: 91.2 / 84.4, 800: 90.8 / 89.6, 1000: 90.8 / 85.2, 1200:
  92.4 / 87.2, 1400: 92.4 / 87.6, 1600: 93.2 / 88.0. Test split (300 questions): 90.7 % unpruned, 87.0 % object
  tokens only -- 3.7 points under, the "within 3 points" target missed: with every background token always visible
  in this run, the answer had come to lean on the background.
- Fourth run, continuing the third with ``--background-dropout`` (each step shows a random share, uniform in 0-1, of
  the background tokens; object tokens always shown): ``python eval/train_toy_vlm.py --task digits --init run3 --out
  vtprune/assets/toy_llava_digits --steps 1200 --seed 2 --batch-size 16 --lr 2e-4 --warmup 50 --eval-every 200
  --background-dropout --threads 1`` (702 s wall at load 2-3). Validation by step: 200: 93.2 / 90.4, 400: 91.6 /
  90.0, 600: 94.8 / 93.2, 800: 94.0 / 93.2, 1000: 94.8 / 94.8, 1200: 95.2 / 94.8 (per type: compare 98, largest 98,
  position 96, count 94, exists 90). Shipped (step 1200; the recipe, runs two to four: 3,800 + 972 + 702 s, 91 minutes of
  one thread). Test split (``eval/bench_accuracy.py --task digits``, 300 questions): 92.0 %
  unpruned, 90.7 % object tokens only, 28.7 % background only (chance 29.0 %), random at 36 tokens 42.0 % against
  MMTok's 90.7 %: every target of issue 19 met.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, ProcessorMixin

from vtprune.errors import VTPruneError
from vtprune.toyvlm.data import TRAIN_SEED_BASE, VALIDATION_SEED, Sample, box_patches, object_patch_mask
from vtprune.toyvlm.model import DEFAULT_FAMILY, build_model, build_processor, encode_batch, evaluate, load_toy_model
from vtprune.toyvlm.tasks import TASKS, Task


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay from 1 to 0.1."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def _max_objects(step: int, steps: int, most: int) -> int:
    """Curriculum: at most 2 objects first (binding a word to one object), one more every 10 % of training."""
    return min(most, 2 + (10 * step) // steps)


def _background_visible(step: int, steps: int) -> float:
    """Curriculum: the share of background tokens the model sees, 0 for the first 20 % of steps, all from 60 %."""
    return min(1.0, max(0.0, (step / steps - 0.2) / 0.4))


def _token_targets(task: Task, sample: Sample) -> tuple[list[str], list[bool]]:
    """Per patch (row-major): the target word, and whether the patch is left out of the per-token loss.

    An object's word is the task's word if the question asks about it, "no" otherwise, and it goes on the object's
    *last* patch in raster order only -- under causal attention the one token that sees all of the object (a
    shapes object is one patch); the object's other patches are left out. Background patches say "no".
    """
    words = ["no"] * len(object_patch_mask(sample))
    ignored = [False] * len(words)
    for obj, asked in zip(sample.objects, sample.relevant, strict=True):
        *first, last = box_patches(obj.box)
        for index in first:
            ignored[index] = True
        if asked:
            words[last] = task.object_word(sample, obj)
    return words, ignored


def _reading_loss(
    task: Task,
    model: PreTrainedModel,
    processor: ProcessorMixin,
    samples: list[Sample],
    image: torch.Tensor,
    hidden_states: tuple[torch.Tensor, ...],
) -> torch.Tensor:
    """Cross-entropy of the LM head, applied halfway up the decoder, naming every object at its last patch
    (``task.object_word``, whatever the question asks): the reading the upper layers build the answer from."""
    layers = model.config.text_config.num_hidden_layers
    language_model = model.model.language_model
    hidden = language_model.norm(hidden_states[layers // 2])[image]
    per_image = hidden.shape[0] // len(samples)
    rows, words = [], []
    for row, sample in enumerate(samples):
        for obj in sample.objects:
            rows.append(row * per_image + box_patches(obj.box)[-1])
            words.append(task.object_word(sample, obj))
    targets = torch.tensor(processor.tokenizer.convert_tokens_to_ids(words))
    return F.cross_entropy(model.lm_head(hidden[torch.tensor(rows)]), targets)


def _loss(
    task: Task,
    model: PreTrainedModel,
    processor: ProcessorMixin,
    samples: list[Sample],
    background_visible: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Answer loss + the balanced per-image-token loss of the module docstring.

    Background tokens are hidden from attention (masked, positions kept) except a random ``background_visible``
    share of them; every image token still gets the per-token loss.
    """
    batch = encode_batch(model, processor, samples, with_answers=True)
    ids = batch["input_ids"]
    image = ids == model.config.image_token_id
    objects = torch.tensor([object_patch_mask(s) for s in samples])
    if background_visible < 1.0:
        shown = objects | (torch.rand(objects.shape, generator=generator) < background_visible)
        batch["attention_mask"][image] = shown.flatten().to(batch["attention_mask"].dtype)
    outputs = model(**batch, output_hidden_states=task.reads_objects)
    logits = outputs.logits
    answer_loss = F.cross_entropy(logits[:, -3:-1].flatten(0, 1), ids[:, -2:].flatten())
    tokenizer = processor.tokenizer
    relevant = torch.tensor([object_patch_mask(s, relevant_only=True) for s in samples])
    words, ignored = zip(*(_token_targets(task, s) for s in samples), strict=True)
    targets = torch.tensor([tokenizer.convert_tokens_to_ids(list(w)) for w in words])
    counted = ~torch.tensor(ignored)
    per_token = F.cross_entropy(logits[image], targets.flatten(), reduction="none").view_as(targets.float())
    # Equal weight per group: background alone is 97 % of the tokens, and the other objects are what force the
    # question to be read ("any object -> relevant" must not score well).
    groups = [g for g in (m & counted for m in (relevant, objects & ~relevant, ~objects)) if g.any()]
    token_loss = sum(per_token[g].mean() for g in groups) / len(groups)
    if not task.reads_objects:
        return answer_loss + token_loss
    return answer_loss + token_loss + _reading_loss(task, model, processor, samples, image, outputs.hidden_states)


def train(
    out_dir: str | Path,
    steps: int = 5000,
    seed: int = 0,
    batch_size: int = 30,
    lr: float = 1e-3,
    warmup: int = 200,
    sizes: dict[str, int] | None = None,
    family: str = DEFAULT_FAMILY,
    task: str = "shapes",
    eval_every: int = 250,
    eval_samples: int = 250,
    init: str | Path | None = None,
    background_dropout: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """Train a toy VLM of ``family`` (one of ``model.FAMILIES``) on ``task`` (a name in ``tasks.TASKS``) and save
    the best (validation accuracy) checkpoint with ``save_pretrained`` to ``out_dir``.

    Returns the validation accuracy of the saved checkpoint (per question type and ``"overall"``). The log line
    of each evaluation also gives the accuracy with only the object tokens visible (what the curriculum's early
    phase trains).

    ``init``: continue from a checkpoint this function saved (its weights and processor; ``family`` and ``sizes``
    are then the checkpoint's) with a fresh optimiser and learning-rate schedule. The curricula count as done --
    full scenes, every background token visible -- since the checkpoint went through them.
    ``background_dropout``: each step shows only a random share (uniform in 0-1) of the background tokens the
    curriculum would show, so the answer does not come to lean on the background (object tokens are always shown).
    """
    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    spec = TASKS[task]
    if init is None:
        processor = build_processor(family, spec.vocabulary())
        model = build_model(processor, sizes)
    else:
        model, processor = load_toy_model(init)
        # A checkpoint of another task would map this task's words to <unk> and train on them silently.
        missing = sorted(set(spec.vocabulary()) - set(processor.tokenizer.get_vocab()))
        if missing:
            raise VTPruneError(
                f"init={str(init)!r} was not trained on task {task!r}: its tokenizer lacks {missing[:5]}; continue a "
                f"checkpoint of the same task, or leave init out to train from scratch"
            )
    log(f"parameters: {sum(p.numel() for p in model.parameters()):,}")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, steps, warmup))
    validation = spec.make_split(VALIDATION_SEED, eval_samples)
    generator = torch.Generator().manual_seed(seed)
    best: dict[str, float] = {"overall": -1.0}
    start, running = time.time(), 0.0
    for step in range(1, steps + 1):
        model.train()
        progress = step if init is None else steps  # a continued run starts where the curricula ended
        most = _max_objects(progress, steps, spec.max_objects)
        samples = spec.make_split(TRAIN_SEED_BASE + seed * 1_000_000 + step, batch_size, most)
        visible = _background_visible(progress, steps)
        if background_dropout:
            visible *= torch.rand((), generator=generator).item()
        loss = _loss(spec, model, processor, samples, visible, generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        running = loss.item() if step == 1 else 0.98 * running + 0.02 * loss.item()
        if step % eval_every == 0 or step == steps:
            model.eval()
            accuracy = evaluate(model, processor, validation)
            objects_only = evaluate(model, processor, validation, keep_fn=object_patch_mask)["overall"]
            summary = " ".join(f"{k}={v:.3f}" for k, v in accuracy.items())
            log(f"step {step} loss {running:.4f} {time.time() - start:.0f}s {summary} objects-only={objects_only:.3f}")
            if accuracy["overall"] >= best["overall"]:
                best = accuracy
                model.save_pretrained(out_dir)
                processor.save_pretrained(out_dir)
    return best
