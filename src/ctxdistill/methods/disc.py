"""DiSC: Distillation via Split Contexts (Padmanabhan, Gul, Goyal; arXiv 2602.16093).

Each document is split into sentences; at each split point the frozen teacher reads the preceding
sentences plus the suffix sentence, the student reads the suffix alone, and the loss is the forward
KL(teacher ‖ student) on the suffix's shared tokens (predictions of tokens 1..L-1).

Because attention is causal, the teacher's distributions for every split point of a document are the
logits of ONE forward pass over the whole token sequence (`single_pass`, the default). `per_split`
runs one teacher and one student pass per split point, as the authors' code does; a test proves the
two agree.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..losses import chunked_head_kl, disc_loss, mean_per_group, topk_tail_kl_per_position
from ..models import final_hidden_states, plain_lm_head
from ..teacher_cache import TeacherCache
from ..segment import SegmentedDoc, choose_spans, segment_document
from . import Method, PreparedCorpus

INPUT_FORMAT = "documents: one text per record (JSONL field `text`, or .txt files); each needs >= 2 sentences"


@dataclass(frozen=True)
class DiscItem:
    """One document with the split points drawn for this epoch."""

    doc: SegmentedDoc
    spans: tuple[tuple[int, int], ...]

    @property
    def doc_id(self) -> str:
        return self.doc.doc_id

    @property
    def student_tokens(self) -> int:
        return sum(e - s - 1 for s, e in self.spans)

    @property
    def teacher_tokens(self) -> int:
        return max(e for _, e in self.spans)


def suffix_batch(token_ids: list[int], spans, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded student batch of the suffixes: (input_ids, attention_mask, keep) each [n_spans, L].

    `keep` marks positions 0..len-2 of every suffix: the ones whose logits are distilled.
    """
    longest = max(e - s for s, e in spans)
    input_ids = torch.full((len(spans), longest), pad_id, dtype=torch.long)
    attention = torch.zeros((len(spans), longest), dtype=torch.long)
    keep = torch.zeros((len(spans), longest), dtype=torch.bool)
    for row, (s, e) in enumerate(spans):
        input_ids[row, : e - s] = torch.tensor(token_ids[s:e])
        attention[row, : e - s] = 1
        keep[row, : e - s - 1] = True
    return input_ids.to(device), attention.to(device), keep.to(device)


def teacher_positions(spans) -> torch.Tensor:
    """Positions of the teacher's sequence whose logits predict suffix tokens 1..L-1, span after span."""
    return torch.cat([torch.arange(s, e - 1) for s, e in spans])


def single_pass_teacher_logits(teacher, token_ids: list[int], spans, device) -> torch.Tensor:
    """[N, V] teacher logits for every distilled position, from one forward pass over the document.

    The LM head runs only on the positions the loss reads (spans may overlap, so unique positions are
    projected once and gathered).
    """
    positions = teacher_positions(spans)
    unique, inverse = torch.unique(positions, return_inverse=True)
    end = max(e for _, e in spans)
    ids = torch.tensor([token_ids[:end]], device=device)
    logits = teacher(input_ids=ids, logits_to_keep=unique.to(device), use_cache=False).logits[0]
    return logits[inverse.to(device)]


def per_split_teacher_logits(teacher, token_ids: list[int], spans, device) -> torch.Tensor:
    """The authors' computation: one teacher pass over prefix+suffix per split point."""
    rows = []
    for s, e in spans:
        ids = torch.tensor([token_ids[:e]], device=device)
        rows.append(teacher(input_ids=ids, use_cache=False).logits[0, s : e - 1])
    return torch.cat(rows)


class Disc(Method):
    name = "disc"
    needs_teacher = True
    input_format = INPUT_FORMAT

    def prepare(self, documents, tokenizer, cfg) -> PreparedCorpus:
        examples, skipped = [], []
        for doc in documents:
            for window in segment_document(doc.id, doc.text, tokenizer, max_tokens=cfg.max_length):
                if len(window.sentence_ids) < 2:
                    skipped.append(window.doc_id)
                else:
                    examples.append(window)
        return PreparedCorpus(examples, {"one-sentence (DiSC needs >= 2)": skipped})

    def plan(self, example: SegmentedDoc, rng: random.Random, cfg) -> DiscItem | None:
        spans = choose_spans(example, cfg.split_strategy, rng, cfg.num_splits, cfg.suffix_tokens, cfg.min_suffix_tokens)
        return DiscItem(example, tuple(spans)) if spans else None

    def loss(self, student, teacher, item: DiscItem, cfg, pad_id: int, device) -> tuple[torch.Tensor, dict]:
        token_ids, spans = item.doc.token_ids, item.spans
        stats = {"student_tokens": item.student_tokens, "teacher_tokens": item.teacher_tokens}
        span_of_position = torch.cat([torch.full((e - s - 1,), i) for i, (s, e) in enumerate(spans)]).to(device)
        if cfg.teacher_mode == "per_split":
            teacher_logits = per_split_teacher_logits(teacher, token_ids, spans, device)
            student_logits = torch.cat([
                student(input_ids=torch.tensor([token_ids[s:e]], device=device), use_cache=False).logits[0, : e - s - 1]
                for s, e in spans
            ])
            return disc_loss(teacher_logits, student_logits, span_of_position, len(spans), cfg.temperature), stats

        input_ids, attention, keep = suffix_batch(token_ids, spans, pad_id, device)
        if isinstance(teacher, TeacherCache):  # no teacher model: its top-k distributions were cached
            topk_logprobs, topk_ids = teacher.lookup(item.doc_id, teacher_positions(spans))
            student_logits = student(input_ids=input_ids, attention_mask=attention, logits_to_keep=keep, use_cache=False).logits
            per_position = topk_tail_kl_per_position(topk_logprobs.to(device), topk_ids.to(device),
                                                     student_logits.reshape(len(topk_ids), -1), cfg.temperature)
            return mean_per_group(per_position, span_of_position, len(spans)).mean(), stats | {"teacher_tokens": 0}

        n_positions = int(keep.sum())
        if cfg.kl_chunk_size and n_positions > cfg.kl_chunk_size and plain_lm_head(student):
            positions = teacher_positions(spans).to(device)
            end = max(e for _, e in spans)
            teacher_hidden = teacher.hidden_states(input_ids=torch.tensor([token_ids[:end]], device=device), use_cache=False)[0, positions]
            student_hidden = final_hidden_states(student, input_ids=input_ids, attention_mask=attention, use_cache=False)[keep]
            lengths = torch.bincount(span_of_position, minlength=len(spans)).float()
            weights = 1.0 / (lengths[span_of_position] * len(spans))
            loss = chunked_head_kl(student_hidden, teacher_hidden, student.get_output_embeddings().weight, teacher.head_weight,
                                   weights, cfg.temperature, cfg.kl_chunk_size)
            return loss, stats

        teacher_logits = single_pass_teacher_logits(teacher, token_ids, spans, device)
        student_logits = student(input_ids=input_ids, attention_mask=attention, logits_to_keep=keep, use_cache=False).logits
        return disc_loss(teacher_logits, student_logits, span_of_position, len(spans), cfg.temperature), stats
