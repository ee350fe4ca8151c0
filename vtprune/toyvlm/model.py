"""The toy VLMs: real ``LlavaForConditionalGeneration`` / ``Qwen2VLForConditionalGeneration`` built from small
configs, plus their processors.

Everything is a stock transformers class (LLaVA: CLIP vision tower, LLaVA projector, Llama text model,
``CLIPImageProcessorPil``, ``LlavaProcessor``; Qwen2-VL: its vision transformer and 2 x 2 merger, Qwen2 text model
with M-RoPE, ``Qwen2VLImageProcessor``, ``Qwen2VLProcessor``; both with a word-level ``PreTrainedTokenizerFast``),
so a saved folder loads with ``from_pretrained`` / ``AutoProcessor.from_pretrained`` exactly like a hub checkpoint
and runs through the same code paths as LLaVA-1.5 and Qwen2-VL.

Prompt format (ours to choose): ``"{question} <image> answer :"`` -- the question comes *before* the image so that,
under causal attention, every image token can already attend to the question and mark whether it is relevant; the
answer position then only has to read the marked tokens. This is what made the task trainable from scratch on CPU.

Visual features are taken from the vision tower's embedding output (``vision_feature_layer=-2`` as in LLaVA-1.5,
which for a one-layer tower is the patch projection + position embedding, before any vision self-attention; the
tower's one encoder layer is computed but unused, kept because the stock CLIP class needs at least one). A visual token therefore carries only its own 16 x 16 patch, so
dropping a token removes exactly that patch's information: with a deeper feature layer, global attention in the
vision tower would copy object information into background tokens and the oracle check (object tokens only vs
background only) would no longer measure token selection. The Qwen2-VL variant gets the same property from a
vision transformer of depth 0: its 8 px patches go through the patch embedding only, and the merger turns each
2 x 2 block (one 16 px cell) into one visual token.
"""

from __future__ import annotations

import shutil
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
)

from vtprune.adapters import adapter_for
from vtprune.adapters.llava_torch import LlavaTorchAdapter, llava_torch_inputs
from vtprune.errors import VTPruneError
from vtprune.toyvlm.data import CELL, IMAGE_SIZE, Sample, vocabulary

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_PATH = ASSETS / "toy_llava"
QWEN2_VL_PATH = ASSETS / "toy_qwen2_vl"
DIGITS_PATH = ASSETS / "toy_llava_digits"
#: The toy families: ``family=`` of :func:`build_processor` and the trainer.
FAMILIES = ("llava", "qwen2_vl")
#: Image processor backend per family, as :func:`build_processor` builds it: the PIL one for LLaVA (the base install
#: has no torchvision), torchvision for Qwen2-VL (its processor needs torchvision for videos anyway). The two backends
#: resize and normalise with different float rounding, which moves the toy benchmark's figures.
IMAGE_PROCESSOR_BACKEND = {"llava": "pil", "qwen2_vl": "torchvision"}
PATCH_SIZE = CELL  # one grid cell of the task is one patch, i.e. one visual token
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ("<pad>", "<unk>", "</s>", IMAGE_TOKEN)
# Qwen2-VL: 8 px patches merged 2 x 2, so again one visual token per cell; an image is written
# <|vision_start|><|image_pad|><|vision_end|> and the processor repeats <|image_pad|> per token.
QWEN_PATCH_SIZE = CELL // 2
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
QWEN_SPECIAL_TOKENS = ("<pad>", "<unk>", "</s>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>")
# The question always comes before the image (see the module docstring), however the caller orders them:
# structured content puts text parts first, and "<image>" placeholders inside a string (lmms-eval's
# llava_hf wrapper prepends them) are moved behind its text. System messages (lmms-eval's Qwen wrappers send
# "You are a helpful assistant.") are dropped: the toy models were trained without one.
_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}"
    "{% if m['content'] is string %}"
    "{{ m['content'] | replace('<image>', ' ') | trim }} "
    "{% for _ in range(m['content'].count('<image>')) %}<image> {% endfor %}"
    "{% else %}"
    "{% for c in m['content'] if c['type'] == 'text' %}{{ c['text'] }} {% endfor %}"
    "{% for c in m['content'] if c['type'] == 'image' %}<image> {% endfor %}"
    "{% endif %}"
    "{% elif m['role'] == 'assistant' %}answer : "
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] if c['type'] == 'text' %}{{ c['text'] }}{% endfor %}{% endif %}"
    " </s> {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}answer :{% endif %}"
)


def chat_template(placeholder: str) -> str:
    """The chat template for a family whose prompts write an image as ``placeholder``."""
    return _CHAT_TEMPLATE.replace(IMAGE_TOKEN, placeholder)


# Model sizes of the shipped checkpoint (train.py can override them, e.g. for tiny smoke tests).
DEFAULT_SIZES: dict[str, int] = {
    "vision_hidden": 64,
    "vision_layers": 1,
    "text_hidden": 128,
    "text_layers": 4,
    "heads": 4,
}
# Qwen2-VL's vision transformer runs at depth 0 (see the module docstring).
QWEN_DEFAULT_SIZES: dict[str, int] = {**DEFAULT_SIZES, "vision_layers": 0}


def image_placeholder(processor: ProcessorMixin | None = None) -> str:
    """How a prompt writes one image for ``processor``'s family (LLaVA's ``<image>`` when none is given)."""
    return QWEN_IMAGE if isinstance(processor, Qwen2VLProcessor) else IMAGE_TOKEN


def build_prompt(question: str, processor: ProcessorMixin | None = None) -> str:
    """The prompt for one question; identical to the processor's chat template for a single user turn."""
    return f"{question} {image_placeholder(processor)} answer :"


def _word_tokenizer(
    special_tokens: Sequence[str], extra_special_tokens: dict[str, str], task_words: Sequence[str]
) -> PreTrainedTokenizerFast:
    words = list(special_tokens) + list(task_words) + ["answer", ":"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="</s>",
        extra_special_tokens=extra_special_tokens,
        padding_side="left",
    )


def build_processor(family: str = "llava", task_words: Sequence[str] | None = None) -> ProcessorMixin:
    """Word-level tokenizer + the family's image processor, combined so an image expands to one token per cell.

    ``task_words`` is the task's vocabulary (default: the shapes task's).
    """
    words = vocabulary() if task_words is None else task_words
    if family == "qwen2_vl":
        return _build_qwen2_vl_processor(words)
    if family != "llava":
        raise ValueError(f"unknown toy VLM family {family!r}; choose one of {', '.join(FAMILIES)}")
    tokenizer = _word_tokenizer(SPECIAL_TOKENS, {"image_token": IMAGE_TOKEN}, words)
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
        chat_template=chat_template(IMAGE_TOKEN),
    )


def _build_qwen2_vl_processor(task_words: Sequence[str]) -> Qwen2VLProcessor:
    # Imported here: without torchvision, importing these warns about Qwen2-VL on every command that imports vtprune.
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    names = ("vision_start_token", "image_token", "vision_end_token", "video_token")
    tokenizer = _word_tokenizer(QWEN_SPECIAL_TOKENS, dict(zip(names, QWEN_SPECIAL_TOKENS[3:], strict=True)), task_words)
    geometry = {"patch_size": QWEN_PATCH_SIZE, "merge_size": 2, "temporal_patch_size": 2}
    # Pixel limits keep a task image at its 192 x 192 (12 x 12 tokens) and shrink larger pictures to that area.
    pixels = {"min_pixels": (2 * CELL) ** 2, "max_pixels": IMAGE_SIZE**2}
    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**geometry, **pixels),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**geometry, **pixels),
        chat_template=chat_template(QWEN_IMAGE),
    )


def build_model(processor: ProcessorMixin, sizes: dict[str, int] | None = None) -> PreTrainedModel:
    """A randomly initialised toy VLM of ``processor``'s family, whose vocabulary and image geometry match it."""
    model: PreTrainedModel
    if isinstance(processor, Qwen2VLProcessor):
        model = _build_qwen2_vl(processor, {**QWEN_DEFAULT_SIZES, **(sizes or {})})
    else:
        model = _build_llava(cast(LlavaProcessor, processor), {**DEFAULT_SIZES, **(sizes or {})})
    tokenizer = processor.tokenizer
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = None
    return model


def _text_sizes(tokenizer: PreTrainedTokenizerFast, s: dict[str, int]) -> dict:
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": s["text_hidden"],
        "intermediate_size": 3 * s["text_hidden"],
        "num_hidden_layers": s["text_layers"],
        "num_attention_heads": s["heads"],
        "num_key_value_heads": s["heads"],
        "max_position_embeddings": 512,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": None,
    }


def _build_llava(processor: LlavaProcessor, s: dict[str, int]) -> LlavaForConditionalGeneration:
    tokenizer = processor.tokenizer
    vision = CLIPVisionConfig(
        hidden_size=s["vision_hidden"],
        intermediate_size=2 * s["vision_hidden"],
        num_hidden_layers=s["vision_layers"],
        num_attention_heads=s["heads"],
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )
    text = LlamaConfig(**_text_sizes(tokenizer, s))
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=processor.image_token_id,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,  # as LLaVA-1.5; with one layer: its input, see the module docstring
    )
    return LlavaForConditionalGeneration(config)


def _build_qwen2_vl(processor: Qwen2VLProcessor, s: dict[str, int]) -> Qwen2VLForConditionalGeneration:
    tokenizer = processor.tokenizer
    head_dim = s["text_hidden"] // s["heads"]
    # M-RoPE splits a head's rotary half-dimensions over (t, h, w), in Qwen2-VL's 1:1.5:1.5 proportion.
    mrope = [head_dim // 8, 3 * head_dim // 16, head_dim // 2 - head_dim // 8 - 3 * head_dim // 16]
    vision = {
        "depth": s["vision_layers"],
        "embed_dim": s["vision_hidden"],
        "hidden_size": s["text_hidden"],
        "num_heads": s["heads"],
        "patch_size": QWEN_PATCH_SIZE,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    text = {
        **_text_sizes(tokenizer, s),
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
    }
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2VLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    return Qwen2VLForConditionalGeneration(config)


def load_toy_model(path: str | Path | None = None) -> tuple[PreTrainedModel, ProcessorMixin]:
    """(model, processor) from a saved folder of either family, by default the toy LLaVA shipped in the package.

    The image processor's backend is pinned per family (:data:`IMAGE_PROCESSOR_BACKEND`), so the pixels -- and the
    benchmark's figures, which hinge on exact ties between identical cells -- do not depend on whether torchvision
    happens to be installed.
    """
    folder = Path(path) if path is not None else DEFAULT_PATH
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"no toy VLM checkpoint in {folder}; train one with eval/train_toy_vlm.py")
    model = AutoModelForImageTextToText.from_pretrained(folder)
    model.eval()
    backend = IMAGE_PROCESSOR_BACKEND[model.config.model_type]
    return model, AutoProcessor.from_pretrained(folder, backend=backend)


def prompt_inputs(processor: ProcessorMixin, images: Sequence[Image.Image], questions: Sequence[str]) -> dict:
    """Processor inputs for one question per image, left-padded for batched ``generate()``."""
    texts = [build_prompt(q, processor) for q in questions]
    return processor(images=list(images), text=texts, return_tensors="pt", padding=True)


def answer(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    images: Sequence[Image.Image],
    questions: Sequence[str],
    max_new_tokens: int = 3,
) -> list[str]:
    """Greedy batched ``generate()`` (left padding), one answer string per (image, question)."""
    inputs = prompt_inputs(processor, images, questions)
    with torch.no_grad():
        # transformers types generate's self as a Protocol that mypy cannot match with PreTrainedModel.
        generate = cast(Callable[..., torch.Tensor], model.generate)
        out = generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1] :]
    return [t.strip() for t in processor.batch_decode(new, skip_special_tokens=True)]


def encode_batch(
    model: PreTrainedModel, processor: ProcessorMixin, samples: Sequence[Sample], with_answers: bool = False
) -> dict:
    """Processor inputs for ``samples`` plus the ``position_ids`` that ``generate()`` would use.

    ``generate()`` numbers positions from the 2-D mask (LLaVA: ``cumsum - 1``, Qwen: M-RoPE over the unpadded
    tokens); fixing them here keeps training, evaluation and generation consistent, and lets callers then hide
    tokens in the mask without moving the others. With ``with_answers`` every row ends with its one-word answer
    and ``</s>`` (teacher forcing).
    """
    texts = [build_prompt(s.question, processor) + (f" {s.answer} </s>" if with_answers else "") for s in samples]
    batch = processor(images=[s.image for s in samples], text=texts, return_tensors="pt", padding=True)
    adapter = adapter_for(model)
    if adapter.position_seq_dim == 1:
        batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    else:  # M-RoPE, as vtprune's adapter computes it for pruning
        batch["position_ids"] = adapter.original_positions(batch, batch["input_ids"])
    return batch


def predict(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    samples: Sequence[Sample],
    keep_fn: Callable[[Sample], Sequence[bool]] | None = None,
) -> list[str]:
    """The greedy first answer token of each sample (answers are one word), from one batched forward.

    ``keep_fn(sample)`` may return a row-major patch mask; dropped image tokens are zeroed in the 2-D attention
    mask while every token keeps its original position, which is equivalent to pruning them before the LLM.
    """
    batch = encode_batch(model, processor, samples)
    llava_torch = LlavaTorchAdapter.serves(model)  # the toy converted to the original codebase's format
    if llava_torch:
        if keep_fn is not None:
            raise VTPruneError("keep_fn hides image tokens in the mask; llava-torch's prompt has one per image")
        llava_model: Any = model  # the llava package's LlavaLlamaForCausalLM (untyped)
        tokens_per_image = llava_model.get_vision_tower().num_patches_per_side ** 2
        batch = llava_torch_inputs(batch, cast(LlavaProcessor, processor).image_token_id, tokens_per_image)
    elif keep_fn is not None:
        image_pos = batch["input_ids"] == model.config.image_token_id
        keep = torch.tensor([list(keep_fn(s)) for s in samples], dtype=batch["attention_mask"].dtype)
        batch["attention_mask"][image_pos] = keep.flatten()
    with torch.no_grad():  # llava-torch's forward has no logits_to_keep
        logits = model(**batch, **({} if llava_torch else {"logits_to_keep": 1})).logits[:, -1]
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
    model: PreTrainedModel,
    processor: ProcessorMixin,
    samples: Sequence[Sample],
    keep_fn: Callable[[Sample], Sequence[bool]] | None = None,
    batch_size: int = 50,
) -> dict[str, float]:
    """Accuracy per question type and ``"overall"`` of :func:`predict`, in batches of ``batch_size``."""
    predictions: list[str] = []
    for start in range(0, len(samples), batch_size):
        predictions += predict(model, processor, samples[start : start + batch_size], keep_fn)
    return accuracy(samples, predictions)


def save_for_stock_vllm(folder: str | Path) -> Path:
    """Copy the toy LLaVA into ``folder`` as stock vLLM loads it: transformers 5 saves its CLIP tower without the
    ``vision_model.`` level that vLLM's CLIP module has (vtprune's vLLM class inserts it itself); returns ``folder``."""
    folder = Path(folder)
    shutil.copytree(DEFAULT_PATH, folder)
    weights = load_file(folder / "model.safetensors")
    renamed = {
        name.replace("vision_tower.", "vision_tower.vision_model.", 1) if name.startswith("vision_tower.") else name: t
        for name, t in weights.items()
    }
    save_file(renamed, folder / "model.safetensors", metadata={"format": "pt"})
    return folder
