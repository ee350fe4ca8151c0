"""The papers' own selection formulations, written plainly from the papers and the authors' loops.

They are what ``eval/bench_selection.py`` times vtprune against and what ``tests/strategies/test_parity.py``
checks against the authors' recorded outputs; nothing in the library uses them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def divprune(features: Tensor, k: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """DivPrune's selection order as the authors' loop computes it: the cosine-distance matrix in ``dtype``
    (the model's dtype in their code), the first pick from each column's second-smallest entry (the
    smallest is the token itself), then each step the chosen rows re-gathered and reduced (O(k²N))."""
    x = features.to(dtype)
    unit = x / x.norm(dim=1, keepdim=True)
    dist = 1.0 - unit @ unit.T
    picks = torch.empty(k, dtype=torch.long, device=x.device)
    for i in range(k):
        if i == 0:
            scores = torch.topk(dist, 2, dim=0, largest=False).values[1, :]
        else:
            scores = torch.index_select(dist, 0, picks[:i]).min(dim=0).values
        picks[i] = torch.argmax(scores)
    return picks


def mmtok(
    text: Tensor | None,
    features: Tensor,
    clip: Tensor,
    k: int,
    alpha: float = 0.5,
    text_temp: float = 0.02,
    vision_temp: float = 0.2,
) -> Tensor:
    """MMTok's selection order from the paper: the coverage matrices in float32, then each step the marginal gain
    of ``f(S) = (1/m) sum_i max_{S} P_ij + alpha (1/n) sum_i max_{S} Q_ij``, ``sum_rows max(0, column - best)`` as
    the authors' loop computes it, evaluated densely for every candidate j, and the best candidate added (first on
    ties, chosen ones excluded)."""

    def coverage(queries: Tensor, keys: Tensor, temperature: float) -> Tensor:
        return torch.softmax(F.normalize(queries.float(), dim=1) @ F.normalize(keys.float(), dim=1).T / temperature, 1)

    n = features.shape[0]
    vision = alpha * coverage(clip, clip, vision_temp) / n
    terms = vision if text is None else torch.cat([coverage(text, features, text_temp) / text.shape[0], vision])
    best = torch.zeros(terms.shape[0], device=terms.device)
    taken = torch.zeros(n, dtype=torch.bool, device=terms.device)
    picks = torch.empty(k, dtype=torch.long, device=terms.device)
    for i in range(k):
        gain = (terms - best[:, None]).clamp_min_(0).sum(dim=0)
        picks[i] = gain.masked_fill(taken, -torch.inf).argmax()
        taken[picks[i]] = True
        best = torch.maximum(best, terms[:, picks[i]])
    return picks
