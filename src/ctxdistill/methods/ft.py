"""FT: continued pre-training, next-token cross-entropy over each raw document.

As in the DiSC authors' baseline: tokenised with the tokenizer's default special tokens, one
document per step. Documents longer than `max_length` are cut into consecutive windows.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..losses import token_cross_entropy
from .base import LossOutput, Method, PrepareContext, PreparedCorpus, register

DOCUMENTS = "documents: one text per record (JSONL field `text`, or .txt files)"


@dataclass(frozen=True)
class TokenExample:
    doc_id: str
    ids: tuple[int, ...]


def token_windows(documents, tokenizer, max_length: int) -> PreparedCorpus:
    """Each document tokenised (default special tokens) and cut into windows of at most `max_length`."""
    examples, skipped = [], []
    for doc in documents:
        ids = tokenizer(doc.text)["input_ids"]
        windows = [ids[i : i + max_length] for i in range(0, len(ids), max_length)]
        for i, w in enumerate(windows):
            window_id = doc.id if len(windows) == 1 else f"{doc.id}#w{i}"
            if len(w) >= 2:
                examples.append(TokenExample(window_id, tuple(w)))
            else:
                skipped.append(window_id)
    return PreparedCorpus(examples, {"under-2-token": skipped})


@register
class FineTune(Method):
    name = "ft"
    input_format = DOCUMENTS

    def prepare(self, documents, ctx: PrepareContext) -> PreparedCorpus:
        return token_windows(documents, ctx.tokenizer, self.cfg.max_length)

    def plan(self, example: TokenExample, rng: random.Random) -> list:
        return [example]

    def loss(self, student, teacher, item: TokenExample, device) -> LossOutput:
        ids = torch.tensor([item.ids], device=device)
        logits = student(input_ids=ids, use_cache=False).logits
        return LossOutput(token_cross_entropy(logits, ids), student_tokens=len(item.ids) - 1)
