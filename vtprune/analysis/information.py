"""What each visual token carries at each decoder layer: the answer's change when the token is removed from there on.

For a sample, a decoder layer K and a visual token i, the model runs once with token i removed from layer K on
(layers < K see every token; layers >= K never see i, exactly what a decoder stage at K that drops i does) and
the next-token distribution at the answer position (the last prompt token) is compared with the unpruned one.
Three measures come out of the same forward (all in nats or probability, all zero when the token changes nothing):

- ``kl``: KL(p_full || p_removed), the information-horizon paper's "change in output probabilities" as a divergence;
- ``tv``: total variation, ½ Σ |p_full − p_removed| (bounded by 1, symmetric);
- ``prob_drop``: p_full(a) − p_removed(a) for the model's own answer a = argmax p_full (negative if removal helps).

Removals are batched: the sample is repeated G times in one batch and row g drops a different token through
vtprune's own decoder stage (a :class:`LeaveOut` stage at K), so a group of G removals costs one forward. The
removal is therefore exactly vtprune's pruning, which ``tests/integration/test_analysis.py`` checks against the masking
reference (the unpruned model with that token masked out of attention from layer K on).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import VTPruneError
from ..schedule import Stage
from ..strategies.base import DECODER_PLACE, Strategy, TokenContext
from ..vocabulary.layout import last_valid

#: Measures computed for every removal (see the module docstring).
MEASURES = ("kl", "tv", "prob_drop")


class LeaveOut(Strategy):
    """Drop one given token (or none) of each image or video, item by item in the engine's order.

    The engine hands a forward's items to a strategy in the order its record lists them (images of every row,
    then videos of every row; ``Strategy.select_batch`` keeps that order), so a plan in that order says what
    each item of each row loses. ``removals`` maps (row, modality, index in the row) -> the token it loses
    (None: nothing). A plan is used by one forward only; :meth:`check` then compares the record with it, so a
    plan that did not land where meant fails loudly.
    """

    name = "leave_out"
    places = frozenset({DECODER_PLACE})
    needs_budget = False

    def __init__(self, removals: Mapping[tuple[int, str, int], int | None]) -> None:
        self.removals = dict(removals)
        # The record's order: modality by modality (in the order they first appear), then row, then index.
        modalities = list(dict.fromkeys(modality for _, modality, _ in self.removals))
        self.order = sorted(self.removals, key=lambda key: (modalities.index(key[1]), key[0], key[2]))
        self.used = 0

    def select(self, ctx: TokenContext) -> Tensor:
        if self.used >= len(self.order):
            raise VTPruneError(f"leave_out was planned for {len(self.order)} images and got more")
        removed = self.removals[self.order[self.used]]
        self.used += 1
        keep = torch.ones(ctx.num_tokens, dtype=torch.bool)
        if removed is not None:
            keep[removed] = False
        return keep.nonzero(as_tuple=True)[0]

    def check(self, record: Any, layer: int) -> None:
        """Every planned item lost exactly its planned token at ``layer`` (read off the record)."""
        listed = [(image.row, image.modality, image.index) for image in record.images]
        if self.used != len(self.order) or listed != self.order:
            raise VTPruneError(
                f"leave_out was planned for {len(self.order)} images; the forward had {len(listed)} and selected "
                f"{self.used}, in the order {listed}"
            )
        for image in record.images:
            removed = self.removals[(image.row, image.modality, image.index)]
            kept = image.kept_by_stage[f"layer {layer}"]
            expected = image.num_tokens - (removed is not None)
            if kept.numel() != expected or (removed is not None and bool((kept == removed).any())):
                raise VTPruneError(f"leave_out: row {image.row} did not lose token {removed} at layer {layer}")


@dataclass
class SampleInformation:
    """Information of the measured visual tokens of one sample, per measured layer."""

    layers: list[int]
    tokens: Tensor
    """(m,) measured tokens, indices into the sample's visual tokens (its items' tokens one after another)."""
    num_tokens: int
    """Visual tokens of the sample (all items)."""
    items: list[tuple[str, int]]
    """(modality, tokens) of each image / video of the sample, in the order its tokens are numbered."""
    answer: int
    """Token id the unpruned model predicts at the answer position (the one ``prob_drop`` follows)."""
    values: dict[str, Tensor]
    """Measure -> (len(layers), m) float32."""

    def full(self, measure: str = "kl") -> Tensor:
        """(len(layers), num_tokens): the measure for every token, NaN for tokens not measured."""
        out = torch.full((len(self.layers), self.num_tokens), torch.nan)
        out[:, self.tokens] = self.values[measure]
        return out

    def item_slices(self) -> list[slice]:
        """Where each item's tokens sit in the sample's token numbering."""
        starts = [0]
        for _, count in self.items:
            starts.append(starts[-1] + count)
        return [slice(a, b) for a, b in itertools.pairwise(starts)]


@torch.no_grad()
def token_information(
    model: nn.Module,
    inputs: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    *,
    layers: Sequence[int] | None = None,
    tokens: int | Tensor | None = None,
    group_size: int = 64,
    seed: int = 0,
) -> list[SampleInformation]:
    """Per sample, measured layer and visual token: how much removing that token from that layer on changes the
    answer's next-token distribution (every measure of :data:`MEASURES`).

    ``inputs``: the processor's (forward) inputs of one sample, a batch of one row, or a list of such samples.
    ``layers``: decoder layers to remove at (default all). ``tokens``: which visual tokens to measure — all
    (None), the same given indices in every sample (a 1-D tensor), or ``m`` drawn uniformly without replacement
    per sample (an int; seeded by ``seed`` and the sample's index). The mean of a measure over such a subset is
    an unbiased estimate of its mean over all tokens, with standard error ``sd/√m · √((N−m)/(N−1))``
    (:func:`vtprune.analysis.horizon` reports it). ``group_size``: removals per forward (rows of one batch).
    Costs ``len(layers) · ⌈m / group_size⌉`` forwards of ``group_size`` rows per sample, plus one unpruned.
    """
    samples = [inputs] if isinstance(inputs, Mapping) else list(inputs)
    if not samples:
        raise VTPruneError("token_information needs at least one sample in inputs")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise VTPruneError(f"group_size must be a positive int (removals per forward), got {group_size!r}")
    from ..adapters import adapter_for

    num_layers = len(adapter_for(model).layers)
    chosen_layers = list(range(num_layers)) if layers is None else [int(layer) for layer in layers]
    bad = [layer for layer in chosen_layers if not 0 <= layer < num_layers]
    if bad or not chosen_layers:
        raise VTPruneError(f"layers must be decoder layers in [0, {num_layers}), got {list(layers or [])}")
    return [_sample(model, sample, chosen_layers, tokens, group_size, seed + i) for i, sample in enumerate(samples)]


def _sample(
    model: nn.Module, inputs: Mapping[str, Any], layers: list[int], tokens: Any, group_size: int, seed: int
) -> SampleInformation:
    from ..api import pruned

    if inputs["input_ids"].shape[0] != 1:
        raise VTPruneError(
            f"token_information takes one sample per inputs mapping, got a batch of {inputs['input_ids'].shape[0]} "
            "rows: pass a list with one processor output per sample"
        )
    # The unpruned distribution, through the keep-all strategy (bit-identical to no hooks) so the record names
    # the sample's images and videos and their token counts.
    with pruned(model, "none") as handle:
        full_logits = model(**inputs).logits[0]
    record = handle.require_record()
    items = [(image.modality, image.num_tokens) for image in record.images]
    if not items:
        raise VTPruneError("token_information: the sample has no visual tokens (no image or video)")
    mask = inputs.get("attention_mask")
    answer_slot = int(last_valid(mask.bool())[0]) if mask is not None else -1
    log_p = torch.log_softmax(full_logits[answer_slot].double(), dim=-1)
    answer = int(log_p.argmax())
    num_tokens = sum(count for _, count in items)
    measured = _measured_tokens(tokens, num_tokens, seed)
    values = {measure: torch.empty(len(layers), measured.numel()) for measure in MEASURES}
    keys = [(image.modality, image.index) for image in record.images]
    owner = [(index, local) for index, (_, count) in enumerate(items) for local in range(count)]
    for row_of_layer, layer in enumerate(layers):
        for start in range(0, measured.numel(), group_size):
            group = measured[start : start + group_size].tolist()
            plan: dict[tuple[int, str, int], int | None] = {}
            for row, token in enumerate(group):  # row g loses token group[g] of its item, nothing of the others
                item, local = owner[token]
                plan.update({(row, *key): local if index == item else None for index, key in enumerate(keys)})
            leave_out = LeaveOut(plan)
            batch = {key: _repeat(value, len(group)) for key, value in inputs.items()}
            with pruned(model, Stage(leave_out, layer=layer)) as handle:
                # After a decoder stage every row is one token shorter and unpadded: the answer is the last slot.
                logits = model(**batch, logits_to_keep=1).logits[:, -1]
            leave_out.check(handle.require_record(), layer)
            log_q = torch.log_softmax(logits.double(), dim=-1)
            p = log_p.exp()
            columns = slice(start, start + len(group))
            values["kl"][row_of_layer, columns] = (p * (log_p - log_q)).sum(-1)
            values["tv"][row_of_layer, columns] = 0.5 * (p - log_q.exp()).abs().sum(-1)
            values["prob_drop"][row_of_layer, columns] = p[answer] - log_q[:, answer].exp()
    return SampleInformation(layers, measured, num_tokens, items, answer, values)


def _measured_tokens(tokens: int | Tensor | None, num_tokens: int, seed: int) -> Tensor:
    if tokens is None:
        return torch.arange(num_tokens)
    if isinstance(tokens, int) and not isinstance(tokens, bool):
        if not 1 <= tokens:
            raise VTPruneError(f"tokens must be a positive count of tokens to sample, got {tokens}")
        if tokens >= num_tokens:
            return torch.arange(num_tokens)
        return torch.randperm(num_tokens, generator=torch.Generator().manual_seed(seed))[:tokens].sort().values
    if isinstance(tokens, Tensor) and tokens.ndim == 1 and not tokens.is_floating_point():
        indices = tokens.cpu().long().unique()
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= num_tokens):
            raise VTPruneError(f"tokens must index the sample's {num_tokens} visual tokens, got {indices.tolist()}")
        return indices
    raise VTPruneError("tokens must be None (all), an int (a random subset of that size) or a 1-D index tensor")


def _repeat(value: Any, copies: int) -> Any:
    """One sample's input repeated ``copies`` times: every tensor lists the row's tokens or its images in order,
    so whole copies one after another are ``copies`` rows (and their images in row order) in every family."""
    return torch.cat([value] * copies) if isinstance(value, Tensor) else value
