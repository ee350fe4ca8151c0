"""The toy VLMs: real transformers VLM classes built from small configs, plus their processors.

Each family with a toy declares how it is built (``Architecture.toy`` in ``vtprune.adapters``: the toy LLaVA is a
CLIP vision tower, LLaVA projector and Llama text model with CLIP's PIL image processor; the toy Qwen2-VL its vision
transformer and 2 x 2 merger with a Qwen2 text model and M-RoPE); this module gives them a word-level
``PreTrainedTokenizerFast``, the prompt format and the sizes. Everything is a stock transformers class, so a saved
folder loads with ``from_pretrained`` / ``AutoProcessor.from_pretrained`` exactly like a hub checkpoint and runs
through the same code paths as LLaVA-1.5 and Qwen2-VL.

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

import json
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
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
)

from vtprune.adapters import ARCHITECTURES, adapter_for, architecture
from vtprune.adapters.llava_torch import LlavaTorchAdapter, llava_torch_inputs
from vtprune.adapters.toys import ToyGeometry, ToyVLM
from vtprune.errors import VTPruneError
from vtprune.toyvlm.data import CELL, IMAGE_SIZE, Sample, vocabulary

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_PATH = ASSETS / "toy_llava"
QWEN2_VL_PATH = ASSETS / "toy_qwen2_vl"
DIGITS_PATH = ASSETS / "toy_llava_digits"
#: The toy families, ``family=`` of :func:`build_processor` and the trainer: the ``model_type`` of every class whose
#: family declares how it is built as a toy (``Architecture.toy``).
FAMILIES = tuple(arch.model_type for arch in ARCHITECTURES if arch.toy is not None)
#: The family of the shipped default toy, what :func:`build_processor` and the trainer build unless told.
DEFAULT_FAMILY: str = json.loads((DEFAULT_PATH / "config.json").read_text())["model_type"]
#: The toys' square images: one grid cell of the task is one visual token.
GEOMETRY = ToyGeometry(image_size=IMAGE_SIZE, cell=CELL)
IMAGE_TOKEN = "<image>"  # how the chat template below writes an image; each family's placeholder replaces it
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


# Model sizes of the shipped checkpoints (train.py can override them, e.g. for tiny smoke tests; a family may declare
# its own, ``ToyVLM.sizes``: Qwen2-VL's vision transformer runs at depth 0, see the module docstring).
DEFAULT_SIZES: dict[str, int] = {
    "vision_hidden": 64,
    "vision_layers": 1,
    "text_hidden": 128,
    "text_layers": 4,
    "heads": 4,
}


def toy_of(family: str) -> ToyVLM:
    """How ``family`` (a ``model_type``) is built as a toy, or a clear error naming the toy families."""
    toy = architecture(family).toy if family in FAMILIES else None
    if toy is None:
        raise ValueError(f"unknown toy VLM family {family!r}; choose one of {', '.join(FAMILIES)}")
    return toy


def toy_of_processor(processor: ProcessorMixin | None) -> ToyVLM:
    """The toy family of ``processor`` (built here or loaded from a toy's folder); the default family's otherwise."""
    lineage = {cls.__name__ for cls in type(processor).__mro__}
    for family in FAMILIES:
        if toy_of(family).processor_class in lineage:
            return toy_of(family)
    return toy_of(DEFAULT_FAMILY)


def image_placeholder(processor: ProcessorMixin | None = None) -> str:
    """How a prompt writes one image for ``processor``'s family (the default family's when none is given)."""
    return toy_of_processor(processor).image_placeholder


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


def build_processor(family: str = DEFAULT_FAMILY, task_words: Sequence[str] | None = None) -> ProcessorMixin:
    """Word-level tokenizer + the family's image processor, combined so an image expands to one token per cell.

    ``task_words`` is the task's vocabulary (default: the shapes task's).
    """
    toy = toy_of(family)
    words = vocabulary() if task_words is None else task_words
    tokenizer = _word_tokenizer(toy.special_tokens, dict(toy.named_tokens), words)
    return toy.processor(tokenizer, GEOMETRY, chat_template(toy.image_placeholder))


def build_model(processor: ProcessorMixin, sizes: dict[str, int] | None = None) -> PreTrainedModel:
    """A randomly initialised toy VLM of ``processor``'s family, whose vocabulary and image geometry match it."""
    toy = toy_of_processor(processor)
    tokenizer = processor.tokenizer
    merged = {**DEFAULT_SIZES, **toy.sizes, **(sizes or {})}
    config = toy.config(tokenizer, GEOMETRY, _text_sizes(tokenizer, merged), merged)
    model = AutoModelForImageTextToText.from_config(config)
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


def load_toy_model(path: str | Path | None = None) -> tuple[PreTrainedModel, ProcessorMixin]:
    """(model, processor) from a saved folder of either family, by default the toy LLaVA shipped in the package.

    The image processor's backend is pinned per family (``ToyVLM.image_backend``), so the pixels -- and the
    benchmark's figures, which hinge on exact ties between identical cells -- do not depend on whether torchvision
    happens to be installed.
    """
    folder = Path(path) if path is not None else DEFAULT_PATH
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"no toy VLM checkpoint in {folder}; train one with eval/train_toy_vlm.py")
    model = AutoModelForImageTextToText.from_pretrained(folder)
    model.eval()
    backend = toy_of(model.config.model_type).image_backend
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
        llava_processor: Any = processor  # the toy LLaVA's, which names its placeholder id
        batch = llava_torch_inputs(batch, llava_processor.image_token_id, tokens_per_image)
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


def toy_path(family: str) -> Path:
    """The shipped toy of ``family`` (``vtprune/assets/toy_<family>``)."""
    toy_of(family)
    return ASSETS / f"toy_{family}"


def save_for_stock_vllm(folder: str | Path, source: str | Path = DEFAULT_PATH) -> Path:
    """The toy in ``source`` as stock vLLM loads it, in ``folder`` where it must change: transformers 5 saves a CLIP
    tower without the ``vision_model.`` level that vLLM's CLIP module has (vtprune's vLLM class inserts it itself);
    a toy without such a tower loads as it is, and ``source`` itself is returned."""
    folder, source = Path(folder), Path(source)
    weights = load_file(source / "model.safetensors")
    tower = "vision_tower."
    if not any(name.startswith(tower) for name in weights):
        return source
    shutil.copytree(source, folder)
    renamed = {
        name.replace(tower, f"{tower}vision_model.", 1) if name.startswith(tower) else name: t
        for name, t in weights.items()
    }
    save_file(renamed, folder / "model.safetensors", metadata={"format": "pt"})
    return folder
