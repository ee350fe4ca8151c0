"""The toy VLM: a real ``LlavaForConditionalGeneration`` built from small configs, plus its processor.

Everything is a stock transformers class (CLIP vision tower, LLaVA projector, Llama text model, a word-level
``PreTrainedTokenizerFast``, ``CLIPImageProcessorPil``, ``LlavaProcessor``), so the saved folder loads with
``LlavaForConditionalGeneration.from_pretrained`` / ``AutoProcessor.from_pretrained`` exactly like a hub checkpoint
and runs through the same code paths as LLaVA-1.5.

Prompt format (ours to choose): ``"{question} <image> answer :"`` -- the question comes *before* the image so that,
under causal attention, every image token can already attend to the question and mark whether it is relevant; the
answer position then only has to read the marked tokens. This is what made the task trainable from scratch on CPU.

Visual features are taken from the vision tower's embedding output (``vision_feature_layer=-2`` as in LLaVA-1.5,
which for a one-layer tower is the patch projection + position embedding, before any vision self-attention; the
tower's one encoder layer is computed but unused, kept because the stock CLIP class needs at least one). A visual token therefore carries only its own 16 x 16 patch, so
dropping a token removes exactly that patch's information: with a deeper feature layer, global attention in the
vision tower would copy object information into background tokens and the oracle check (object tokens only vs
background only) would no longer measure token selection.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoProcessor,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from vtprune.toyvlm.data import CELL, IMAGE_SIZE, Sample, vocabulary

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "assets" / "toy_llava"
PATCH_SIZE = CELL  # one grid cell of the task is one patch, i.e. one visual token
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ("<pad>", "<unk>", "</s>", IMAGE_TOKEN)
# The question always comes before the image (see the module docstring), however the caller orders them:
# structured content puts text parts first, and "<image>" placeholders inside a string (lmms-eval's
# llava_hf wrapper prepends them) are moved behind its text.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}"
    "{% if m['content'] is string %}"
    "{{ m['content'] | replace('<image>', ' ') | trim }} "
    "{% for _ in range(m['content'].count('<image>')) %}<image> {% endfor %}"
    "{% else %}"
    "{% for c in m['content'] if c['type'] == 'text' %}{{ c['text'] }} {% endfor %}"
    "{% for c in m['content'] if c['type'] == 'image' %}<image> {% endfor %}"
    "{% endif %}"
    "{% else %}answer : "
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] if c['type'] == 'text' %}{{ c['text'] }}{% endfor %}{% endif %}"
    " </s> {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}answer :{% endif %}"
)
# Model sizes of the shipped checkpoint (train.py can override them, e.g. for tiny smoke tests).
DEFAULT_SIZES: dict[str, int] = {
    "vision_hidden": 64,
    "vision_layers": 1,
    "text_hidden": 128,
    "text_layers": 4,
    "heads": 4,
}


def build_prompt(question: str) -> str:
    """The prompt for one question; identical to the processor's chat template for a single user turn."""
    return f"{question} {IMAGE_TOKEN} answer :"


def build_processor() -> LlavaProcessor:
    """Word-level tokenizer + CLIP image processor, combined so ``<image>`` expands to one token per patch."""
    words = list(SPECIAL_TOKENS) + vocabulary() + ["answer", ":"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="</s>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
    )


def build_model(processor: LlavaProcessor, sizes: dict[str, int] | None = None) -> LlavaForConditionalGeneration:
    """A randomly initialised toy LLaVA whose vocabulary and image geometry match ``processor``."""
    s = {**DEFAULT_SIZES, **(sizes or {})}
    tokenizer = processor.tokenizer
    vision = CLIPVisionConfig(
        hidden_size=s["vision_hidden"],
        intermediate_size=2 * s["vision_hidden"],
        num_hidden_layers=s["vision_layers"],
        num_attention_heads=s["heads"],
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=s["text_hidden"],
        intermediate_size=3 * s["text_hidden"],
        num_hidden_layers=s["text_layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["heads"],
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=processor.image_token_id,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,  # as LLaVA-1.5; with one layer: its input, see the module docstring
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = None
    return model


def load_toy_model(path: str | Path | None = None) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """(model, processor) from a saved folder, by default the checkpoint shipped inside the package."""
    folder = Path(path) if path is not None else DEFAULT_PATH
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"no toy VLM checkpoint in {folder}; train one with eval/train_toy_vlm.py")
    model = LlavaForConditionalGeneration.from_pretrained(folder)
    model.eval()
    return model, AutoProcessor.from_pretrained(folder)


def prompt_inputs(processor: LlavaProcessor, images: Sequence[Image.Image], questions: Sequence[str]) -> dict:
    """Processor inputs for one question per image, left-padded for batched ``generate()``."""
    return processor(images=list(images), text=[build_prompt(q) for q in questions], return_tensors="pt", padding=True)


def answer(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    images: Sequence[Image.Image],
    questions: Sequence[str],
    max_new_tokens: int = 3,
) -> list[str]:
    """Greedy batched ``generate()`` (left padding), one answer string per (image, question)."""
    inputs = prompt_inputs(processor, images, questions)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1] :]
    return [t.strip() for t in processor.batch_decode(new, skip_special_tokens=True)]


def encode_batch(processor: LlavaProcessor, samples: Sequence[Sample], with_answers: bool = False) -> dict:
    """Processor inputs for ``samples`` plus ``position_ids`` that ignore the left padding.

    ``generate()`` numbers positions from the 2-D mask (``cumsum - 1``); passing the same numbering to plain
    forwards keeps training, evaluation and generation consistent. With ``with_answers`` every row ends with its
    one-word answer and ``</s>`` (teacher forcing).
    """
    texts = [build_prompt(s.question) + (f" {s.answer} </s>" if with_answers else "") for s in samples]
    batch = processor(images=[s.image for s in samples], text=texts, return_tensors="pt", padding=True)
    batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return batch


def predict(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    samples: Sequence[Sample],
    keep_fn: Callable[[Sample], Sequence[bool]] | None = None,
) -> list[str]:
    """The greedy first answer token of each sample (answers are one word), from one batched forward.

    ``keep_fn(sample)`` may return a row-major patch mask; dropped image tokens are zeroed in the 2-D attention
    mask while every token keeps its original position, which is equivalent to pruning them before the LLM.
    """
    batch = encode_batch(processor, samples)
    if keep_fn is not None:
        image_pos = batch["input_ids"] == model.config.image_token_id
        keep = torch.tensor([list(keep_fn(s)) for s in samples], dtype=batch["attention_mask"].dtype)
        batch["attention_mask"][image_pos] = keep.flatten()
    with torch.no_grad():
        logits = model(**batch, logits_to_keep=1).logits[:, -1]
    return [p.strip() for p in processor.batch_decode(logits.argmax(-1)[:, None], skip_special_tokens=True)]


def accuracy(samples: Sequence[Sample], predictions: Sequence[str]) -> dict[str, float]:
    """Accuracy per question type and ``"overall"``."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for sample, predicted in zip(samples, predictions, strict=True):
        hits[sample.qtype].append(predicted == sample.answer)
    result = {t: sum(h) / len(h) for t, h in sorted(hits.items())}
    result["overall"] = sum(sum(h) for h in hits.values()) / sum(len(h) for h in hits.values())
    return result


def evaluate(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    samples: Sequence[Sample],
    keep_fn: Callable[[Sample], Sequence[bool]] | None = None,
    batch_size: int = 50,
) -> dict[str, float]:
    """Accuracy per question type and ``"overall"`` of :func:`predict`, in batches of ``batch_size``."""
    predictions: list[str] = []
    for start in range(0, len(samples), batch_size):
        predictions += predict(model, processor, samples[start : start + batch_size], keep_fn)
    return accuracy(samples, predictions)
