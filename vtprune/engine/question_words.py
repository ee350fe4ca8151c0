"""The question's words as MMTok uses them: input-embedding rows of the prompt's content words.

MMTok embeds the question words with the language model's input-embedding table, after removing
stop-words and the benchmark's answer-format instruction ("Answer the question using a single word
or phrase."). vtprune finds them in each row's ``input_ids``: the real text tokens (not padding, not
visual placeholders, not special tokens). With a tokenizer it also drops stop-words, instruction
words and punctuation; without one every non-special text token counts.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ..errors import TextTowerError

STOP_WORDS = frozenset(
    """a an the of to in on at by for with from and or but if then than as is are was were be been being
    do does did has have had it its this that these those there here what which who whom whose where when
    why how can could would should will shall may might must not no yes i you he she we they me him her us
    them my your his our their please about into over under image picture photo shown show""".split()
)
#: Words of answer-format instructions that benchmarks append to questions.
INSTRUCTION_WORDS = frozenset(
    """answer question using single word phrase option letter given choices directly briefly short
    respond reply provide only""".split()
)
_WORD = re.compile(r"[a-z0-9]")


class QuestionTokens:
    """Chooses which text token ids of a row are question words."""

    def __init__(self, special_ids: Iterable[int], tokenizer: Any | None = None) -> None:
        self.special_ids = {int(i) for i in special_ids if i is not None}
        self.tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor or a tokenizer
        if self.tokenizer is not None:
            self.special_ids |= set(self.tokenizer.all_special_ids)
        self._verdicts: dict[int, bool] = {}

    def _is_word(self, token_id: int) -> bool:
        if token_id not in self._verdicts:
            assert self.tokenizer is not None  # select() asks only when there is a tokenizer
            text = self.tokenizer.decode([token_id]).strip().lower()
            self._verdicts[token_id] = bool(_WORD.search(text)) and text not in STOP_WORDS | INSTRUCTION_WORDS
        return self._verdicts[token_id]

    def select(self, ids: Tensor, delimiters: Iterable[int] = ()) -> Tensor:
        """The question-word ids among a row's text token ids, in order; ``delimiters``: the prompt's image
        delimiters that the special ids do not name (``ModelAdapter.image_delimiter_ids``)."""
        special = self.special_ids | set(delimiters)
        keep = [i for i in ids.tolist() if i not in special and (self.tokenizer is None or self._is_word(i))]
        return torch.tensor(keep, dtype=torch.long, device=ids.device)

    def decode(self, ids: Tensor) -> str:
        """The question words as text, for CLIP text towers (which need a tokenizer to read them)."""
        if self.tokenizer is None:
            raise TextTowerError(
                "a text tower reads the question as text: pass the processor or tokenizer to "
                "prune(..., tokenizer=processor)"
            )
        return self.tokenizer.decode(ids.tolist()).strip()
