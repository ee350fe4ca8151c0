"""CLIP text towers: the instruction and the visual tokens in CLIP's joint space (CDPruner's and TRIM's relevance).

``load_text_tower(spec, device)`` accepts

- a transformers CLIP checkpoint, hub id or local folder (e.g. ``"openai/clip-vit-large-patch14-336"``,
  LLaVA-1.5's tower): the text side is the checkpoint's text transformer and ``text_projection``
  (``CLIPTextModelWithProjection``'s computation), the image side its ``vision_model.post_layernorm``
  and ``visual_projection``;
- ``"open_clip:<model>/<pretrained>"`` (e.g. ``"open_clip:ViT-L-14-336-quickgelu/openai"``; the
  pretrained part may be an open_clip tag or a checkpoint path, and may be left out:
  ``"open_clip:<model>"`` builds random weights): the model's ``encode_text``, and on the image side
  its vision transformer's ``ln_post`` and ``proj``. Needs ``pip install "vtprune[clip]"``.

Image side: a VLM's projector reads the tower's penultimate-layer patch features (LLaVA:
``vision_feature_layer=-2``, no CLS), which CLIP itself never projects. As CDPruner's reference does,
they are mapped into the joint space with the final layer norm and the visual projection; both come
from *the text tower's checkpoint* (a LLaVA checkpoint has no ``visual_projection``, and taking the
layer norm from the same checkpoint keeps the pair matched), so name the CLIP the VLM's tower was.

Text side: the instruction is split into segments of the tower's context length (77 tokens: 75 plus
start and end), each encoded on its own; a strategy averages over segments. open_clip models with a
Hugging Face tokenizer (not CLIP's BPE) encode one segment, truncated at the context length.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import TextTowerError

OPEN_CLIP_PREFIX = "open_clip:"


class TextTower:
    """A CLIP model's text encoder and image-side projection, float32, frozen, on one device."""

    spec: str

    def encode_text(self, text: str) -> Tensor:
        """(segments, P) projected text embeddings of ``text``; (0, P) when it has no tokens."""
        raise NotImplementedError

    def encode_image(self, features: Tensor) -> Tensor:
        """(N, P) joint-space embeddings of (N, width) penultimate-layer patch features."""
        raise NotImplementedError

    def _check_width(self, features: Tensor, width: int) -> None:
        if features.ndim != 2 or features.shape[1] != width:
            raise TextTowerError(
                f"text_tower={self.spec!r} projects {width}-wide vision features, but the projector of this model "
                f"read features of shape {tuple(features.shape)}; name the CLIP checkpoint that matches the model's "
                "vision tower, or drop text_tower= to use the LLM-embedding relevance"
            )


def segments(ids: list[int], start: int, end: int, length: int, pad: int) -> tuple[Tensor, Tensor]:
    """Token ids split into rows of ``length``: each ``start + up to length-2 ids + end``, padded with ``pad``.

    Returns (ids (S, length), attention mask (S, length)); S = 0 for no ids.
    """
    body = length - 2
    chunks = [ids[i : i + body] for i in range(0, len(ids), body)]
    rows = torch.full((len(chunks), length), pad, dtype=torch.long)
    mask = torch.zeros((len(chunks), length), dtype=torch.long)
    for row, chunk in enumerate(chunks):
        tokens = [start, *chunk, end]
        rows[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
    return rows, mask


class TransformersCLIP(TextTower):
    def __init__(self, spec: str, device: torch.device) -> None:
        from transformers import AutoTokenizer, CLIPModel

        self.spec = spec
        try:
            model = CLIPModel.from_pretrained(spec, dtype=torch.float32)
            self.tokenizer = AutoTokenizer.from_pretrained(spec)
        except (OSError, ValueError) as error:
            raise TextTowerError(
                f"text_tower={spec!r}: cannot load a transformers CLIP checkpoint there ({error})"
            ) from None
        # Keep only what relevance uses; the vision transformer itself is the VLM's business.
        self.text_model = model.text_model.to(device).eval()
        self.text_projection = model.text_projection.to(device).eval()
        self.post_layernorm = model.vision_model.post_layernorm.to(device).eval()
        self.visual_projection = model.visual_projection.to(device).eval()
        # transformers types CLIPConfig's sub-configs as ``dict | XConfig | None``; a loaded model has the config.
        self.context_length = model.config.text_config.max_position_embeddings  # type: ignore[union-attr]
        self.width = model.config.vision_config.hidden_size  # type: ignore[union-attr]
        self.device = device

    @torch.no_grad()
    def encode_text(self, text: str) -> Tensor:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        rows, mask = segments(ids, tok.bos_token_id, tok.eos_token_id, self.context_length, pad)
        if rows.shape[0] == 0:
            return torch.zeros(0, self.text_projection.out_features, device=self.device)
        pooled = self.text_model(input_ids=rows.to(self.device), attention_mask=mask.to(self.device)).pooler_output
        embeds: Tensor = self.text_projection(pooled)
        return embeds

    @torch.no_grad()
    def encode_image(self, features: Tensor) -> Tensor:
        self._check_width(features, self.width)
        embeds: Tensor = self.visual_projection(self.post_layernorm(features.float()))
        return embeds


class OpenCLIP(TextTower):
    def __init__(self, spec: str, device: torch.device) -> None:
        try:
            import open_clip
            from open_clip.tokenizer import SimpleTokenizer
            from open_clip.transformer import VisionTransformer
        except ImportError:
            raise TextTowerError(
                f'text_tower={spec!r} needs open_clip: pip install "vtprune[clip]" (open_clip_torch)'
            ) from None
        self.spec = spec
        name, _, pretrained = spec[len(OPEN_CLIP_PREFIX) :].partition("/")
        if not name:
            raise TextTowerError(f"text_tower={spec!r}: write open_clip:<model>/<pretrained tag or checkpoint path>")
        try:
            model = open_clip.create_model(name, pretrained=pretrained or None, device=device)
        except (RuntimeError, ValueError, OSError) as error:
            raise TextTowerError(f"text_tower={spec!r}: open_clip cannot build it ({error})") from None
        if not isinstance(model.visual, VisionTransformer) or model.visual.proj is None:
            raise TextTowerError(
                f"text_tower={spec!r}: its image tower is {type(model.visual).__name__}, not a projected vision "
                "transformer, so patch features cannot be mapped into its joint space"
            )
        self.model = model.eval()
        self.tokenizer = open_clip.get_tokenizer(name)
        self.simple = isinstance(self.tokenizer, SimpleTokenizer)
        self.width = model.visual.proj.shape[0]
        self.device = device

    @torch.no_grad()
    def encode_text(self, text: str) -> Tensor:
        if self.simple:
            tok = self.tokenizer
            rows, _ = segments(tok.encode(text), tok.sot_token_id, tok.eot_token_id, tok.context_length, 0)
        else:
            rows = self.tokenizer([text])
        if rows.shape[0] == 0:
            return torch.zeros(0, self.model.visual.proj.shape[1], device=self.device)
        embeds: Tensor = self.model.encode_text(rows.to(self.device))
        return embeds

    @torch.no_grad()
    def encode_image(self, features: Tensor) -> Tensor:
        self._check_width(features, self.width)
        visual = self.model.visual
        embeds: Tensor = visual.ln_post(features.float()) @ visual.proj
        return embeds


def load_text_tower(spec: str, device: torch.device | str = "cpu") -> TextTower:
    """The tower ``spec`` names (a transformers CLIP id or folder, or ``open_clip:<model>/<pretrained>``) on ``device``."""
    if not isinstance(spec, str) or not spec:
        raise TextTowerError(
            f"text_tower={spec!r} is not accepted: it must be a CLIP checkpoint id or folder or 'open_clip:...'"
        )
    device = torch.device(device)
    tower = OpenCLIP(spec, device) if spec.startswith(OPEN_CLIP_PREFIX) else TransformersCLIP(spec, device)
    for module in vars(tower).values():
        if isinstance(module, nn.Module):
            module.requires_grad_(False)
    return tower
