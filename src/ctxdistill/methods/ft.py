"""FT: continued pre-training, next-token cross-entropy over each raw document.

As in the DiSC authors' baseline: tokenised with the tokenizer's default special tokens, one
document per step. Documents longer than `max_length` are cut into consecutive windows.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .heads import head_ce_kl, mean_per_sequence_weights, pad_multiple, packing_on, sequence_batch
from .base import LossOutput, Method, PrepareContext, PreparedCorpus, register

DOCUMENTS = "documents: one text per record (JSONL field `text`, or .txt files)"


@dataclass(frozen=True)
class TokenExample:
    doc_id: str
    ids: tuple[int, ...]

    @property
    def student_tokens(self) -> int:
        return len(self.ids) - 1

    @property
    def teacher_tokens(self) -> int:
        return 0


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
    batched = True

    def prepare(self, documents, ctx: PrepareContext) -> PreparedCorpus:
        self.pad_id = ctx.pad_id
        return token_windows(documents, ctx.tokenizer, self.cfg.max_length)

    def plan(self, example: TokenExample, rng: random.Random) -> list:
        return [example]

    def loss(self, student, teacher, item: TokenExample, device) -> LossOutput:
        return self.batch_loss(student, teacher, [item], device)

    def token_batch(self, student, items: list, device):
        """One pass over `items` (packed or padded; one item is one plain row), CE weights of the mean over items."""
        packed = packing_on(self.cfg, student) or len(items) == 1
        batch = sequence_batch([(i.ids, i.ids) for i in items], self.pad_id, device, packed,
                               pad_multiple(self.cfg, device) if len(items) > 1 else 1)
        self.shapes_seen.add(batch.shape)
        return batch, mean_per_sequence_weights(batch, len(items))

    def batch_loss(self, student, teacher, items: list, device) -> LossOutput:
        """Mean over items of next-token CE, in one forward pass; LM head + CE in chunks when the head is plain."""
        batch, weights = self.token_batch(student, items, device)
        _, ce = head_ce_kl(student, teacher, batch.inputs, batch.rows, batch.targets, weights, chunk_size=self.cfg.kl_chunk_size, kernels=self.cfg.kernels)
        return LossOutput(ce, student_tokens=sum(i.student_tokens for i in items))
