"""DiSC: Distillation via Split Contexts (Padmanabhan, Gul, Goyal; arXiv 2602.16093).

Each document is split into sentences; at each split point the frozen teacher reads the preceding
sentences plus the suffix sentence, the student reads the suffix alone, and the loss is the forward
KL(teacher ‖ student) on the suffix's shared tokens (predictions of tokens 1..L-1).

Because attention is causal, the teacher's distributions for every split point of a document are the
logits of ONE forward pass over the whole token sequence (`single_pass`, the default). `per_split`
runs one teacher and one student pass per split point, as the authors' code does; a test proves the
two agree.

ctxdistill variant, not in the paper (`disc_positions context`): distil only the suffix positions where
the prefix changes the teacher's prediction, i.e. KL(teacher with prefix ‖ teacher on the suffix alone)
> `context_kl_threshold`; one extra teacher pass over the student's suffix batch measures it.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from ..errors import CtxDistillError
from ..inputs.segment import SPLIT_STRATEGIES, SegmentedDoc, choose_spans, segment_document
from ..losses import (chunked_context_kl, chunked_head_kl, context_gain_mask, context_kl_per_position, disc_loss,
                      forward_kl_per_position, renormalise_within_groups, topk_tail_kl_per_position)
from ..models import final_hidden_states, plain_lm_head
from ..options import opt, positive_finite, require
from .base import LossOutput, Method, PrepareContext, PreparedCorpus, register

INPUT_FORMAT = "documents: one text per record (JSONL field `text`, or .txt files); each needs >= 2 sentences"


@dataclass
class DiscConfig:
    """disc options (the authors' defaults)"""

    temperature: float = opt(2.0, "distillation temperature T (loss is scaled by T^2)")
    split_strategy: str = opt("sentence_boundary", "how documents are split into prefix/suffix pairs", SPLIT_STRATEGIES)
    num_splits: int = opt(5, "split points per document (k) for sentence_boundary and token strategies")
    suffix_tokens: int = opt(0, "suffix length for token_random_variable_suffix (0 = to the document end)")
    min_suffix_tokens: int = opt(2, "suffixes shorter than this are dropped")
    teacher_mode: str = opt("single_pass", "single_pass: one teacher forward per document; per_split: the authors' reference (one per split point)",
                            ("single_pass", "per_split"))
    teacher_cache: str = opt("", "read the teacher's top-k distributions from this cache (built by `ctxdistill cache-teacher`) instead of running a teacher")
    disc_positions: str = opt("all", "DiSC positions distilled: all (the paper); context = ctxdistill variant, not in the paper: only the suffix positions "
                                     "where the prefix changes the teacher's prediction by more than context_kl_threshold (needs a live teacher)", ("all", "context"))
    context_kl_threshold: float = opt(0.05, "disc_positions context (ctxdistill variant): keep a position when KL(teacher with prefix || teacher on the "
                                            "suffix alone) at the distillation temperature, in nats, exceeds this; a negative value keeps every position")

    def validate(self) -> None:
        require(self, ("temperature",), positive_finite, "a finite number > 0")
        require(self, ("num_splits", "min_suffix_tokens"), lambda v: v >= 1, ">= 1")
        require(self, ("suffix_tokens",), lambda v: v >= 0, ">= 0")
        require(self, ("context_kl_threshold",), math.isfinite, "a finite number")
        if self.disc_positions == "context":
            if self.teacher_cache:
                raise CtxDistillError("disc_positions context needs a live teacher (it runs the teacher on the suffix alone); drop --teacher-cache")
            if self.teacher_mode == "per_split":
                raise CtxDistillError("disc_positions context is implemented for teacher_mode single_pass only; drop --teacher-mode per_split")


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
    """Right-padded student batch of one document's suffixes (see `suffixes_batch`)."""
    return suffixes_batch([(token_ids, s, e) for s, e in spans], pad_id, device)


def suffixes_batch(suffixes, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded batch of (token_ids, start, end) suffixes: (input_ids, attention_mask, keep), each [n, L].

    `keep` marks positions 0..len-2 of every suffix: the ones whose predictions are distilled.
    """
    longest = max(e - s for _, s, e in suffixes)
    input_ids = torch.full((len(suffixes), longest), pad_id, dtype=torch.long)
    attention = torch.zeros((len(suffixes), longest), dtype=torch.long)
    keep = torch.zeros((len(suffixes), longest), dtype=torch.bool)
    for row, (token_ids, s, e) in enumerate(suffixes):
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


@dataclass(frozen=True)
class TeacherBatch:
    """Several documents right-padded for one teacher pass, and where each distilled position lands.

    `keep` [n_docs, L] marks the unique positions to project; `rows` maps every distilled position
    (document after document, span after span) to its row in the flattened `keep` selection.
    """

    input_ids: torch.Tensor
    attention: torch.Tensor
    keep: torch.Tensor
    rows: torch.Tensor


def teacher_batch(items, pad_id: int, device) -> TeacherBatch:
    ends = [max(e for _, e in item.spans) for item in items]
    input_ids = torch.full((len(items), max(ends)), pad_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    keep = torch.zeros_like(input_ids, dtype=torch.bool)
    rows, offset = [], 0
    for row, (item, end) in enumerate(zip(items, ends)):
        input_ids[row, :end] = torch.tensor(item.doc.token_ids[:end])
        attention[row, :end] = 1
        unique, inverse = torch.unique(teacher_positions(item.spans), return_inverse=True)
        keep[row, unique] = True
        rows.append(inverse + offset)
        offset += len(unique)
    return TeacherBatch(input_ids.to(device), attention.to(device), keep.to(device), torch.cat(rows).to(device))


def position_weights(items) -> torch.Tensor:
    """Weight of each distilled position so that the weighted sum is DiSC's loss averaged over documents:
    mean over documents of (mean over split points of (mean over the split's positions))."""
    weights = [torch.full((e - s - 1,), 1.0 / ((e - s - 1) * len(item.spans) * len(items)))
               for item in items for s, e in item.spans]
    return torch.cat(weights)


def document_of_position(items) -> torch.Tensor:
    """Index of the document each distilled position belongs to (the order of `position_weights`)."""
    return torch.cat([torch.full((e - s - 1,), d) for d, item in enumerate(items) for s, e in item.spans])


def context_weights(items, weights: torch.Tensor, context_kl: torch.Tensor, threshold: float) -> tuple[torch.Tensor, dict]:
    """`position_weights` restricted to the context-sensitive positions, renormalised per document, and counts."""
    keep = context_gain_mask(context_kl, threshold)
    documents = document_of_position(items).to(weights.device)
    weights = renormalise_within_groups(weights, keep, documents, len(items))
    kept_per_doc = torch.zeros(len(items), dtype=torch.long, device=keep.device).index_add(0, documents, keep.long())
    return weights, {"distilled_positions": int(keep.numel()), "kept_positions": int(keep.sum()),
                     "documents_without_kept_positions": int((kept_per_doc == 0).sum())}


@register
class Disc(Method):
    name = "disc"
    input_format = INPUT_FORMAT
    config_class = DiscConfig
    batched = True

    def needs_teacher(self) -> bool:
        return True

    def prepare(self, documents, ctx: PrepareContext) -> PreparedCorpus:
        self.pad_id = ctx.pad_id
        examples, skipped = [], []
        for doc in documents:
            for window in segment_document(doc.id, doc.text, ctx.tokenizer, max_tokens=self.cfg.max_length):
                if len(window.sentence_ids) < 2:
                    skipped.append(window.doc_id)
                else:
                    examples.append(window)
        return PreparedCorpus(examples, {"one-sentence (DiSC needs >= 2)": skipped})

    def plan(self, example: SegmentedDoc, rng: random.Random) -> list:
        c = self.config
        spans = choose_spans(example, c.split_strategy, rng, c.num_splits, c.suffix_tokens, c.min_suffix_tokens)
        return [DiscItem(example, tuple(spans))] if spans else []

    def loss(self, student, teacher, item: DiscItem, device) -> LossOutput:
        if self.config.teacher_mode == "per_split":
            return self.reference_loss(student, teacher, item, device)
        return self.batch_loss(student, teacher, [item], device)

    def reference_loss(self, student, teacher, item: DiscItem, device) -> LossOutput:
        """The authors' computation: one teacher and one student pass per split point, batch 1."""
        token_ids, spans = item.doc.token_ids, item.spans
        teacher_logits = per_split_teacher_logits(teacher, token_ids, spans, device)
        student_logits = torch.cat([
            student(input_ids=torch.tensor([token_ids[s:e]], device=device), use_cache=False).logits[0, : e - s - 1]
            for s, e in spans
        ])
        span_of_position = torch.cat([torch.full((e - s - 1,), i) for i, (s, e) in enumerate(spans)]).to(device)
        loss = disc_loss(teacher_logits, student_logits, span_of_position, len(spans), self.config.temperature)
        return LossOutput(loss, item.student_tokens, item.teacher_tokens)

    def batch_loss(self, student, teacher, items: list[DiscItem], device) -> LossOutput:
        """DiSC's loss averaged over several documents, with one student pass over all their suffixes and
        one teacher pass over all the documents (or the teacher cache). Equal to averaging `loss` per item.

        With `disc_positions context` a second teacher pass reads the suffix batch alone, and positions whose
        context KL is <= `context_kl_threshold` get weight 0 (see `context_weights`)."""
        c, kl_chunk = self.config, self.cfg.kl_chunk_size
        student_tokens, teacher_tokens = sum(i.student_tokens for i in items), sum(i.teacher_tokens for i in items)
        counts: dict[str, int] = {}
        input_ids, attention, keep = suffixes_batch([(i.doc.token_ids, s, e) for i in items for s, e in i.spans], self.pad_id, device)
        weights = position_weights(items).to(device)
        context = c.disc_positions == "context"
        if context and not teacher.live:
            raise CtxDistillError("disc_positions context needs a live teacher (it runs the teacher on the suffix alone), "
                                  "not a teacher cache; drop --teacher-cache")
        if context:
            teacher_tokens += student_tokens + sum(len(i.spans) for i in items)
        if not teacher.live:  # no teacher model: its top-k distributions were cached
            cached = [teacher.cached(i.doc_id, teacher_positions(i.spans)) for i in items]
            student_logits = student(input_ids=input_ids, attention_mask=attention, logits_to_keep=keep, use_cache=False).logits
            per_position = topk_tail_kl_per_position(torch.cat([x[0] for x in cached]).to(device), torch.cat([x[1] for x in cached]).to(device),
                                                     student_logits.reshape(len(weights), -1), c.temperature)
            return LossOutput((per_position * weights).sum(), student_tokens, 0)

        batch = teacher_batch(items, self.pad_id, device)
        if plain_lm_head(student):  # hidden states, then LM head + KL in chunks: no [N, V] tensor for the batch
            teacher_hidden = teacher.hidden_states(input_ids=batch.input_ids, attention_mask=batch.attention, use_cache=False)[batch.keep]
            teacher_hidden = teacher_hidden[batch.rows]
            student_hidden = final_hidden_states(student, input_ids=input_ids, attention_mask=attention, use_cache=False)[keep]
            if context:  # the same chunked projection, teacher with prefix vs teacher alone; only kept rows reach the KL
                alone_hidden = teacher.hidden_states(input_ids=input_ids, attention_mask=attention, use_cache=False)[keep]
                gain = chunked_context_kl(teacher_hidden, alone_hidden, teacher.head_weight, c.temperature, kl_chunk)
                weights, counts = context_weights(items, weights, gain, c.context_kl_threshold)
                rows = weights > 0
                student_hidden, teacher_hidden, weights = student_hidden[rows], teacher_hidden[rows], weights[rows]
            loss = chunked_head_kl(student_hidden, teacher_hidden, student.get_output_embeddings().weight,
                                   teacher.head_weight, weights, c.temperature, kl_chunk or len(weights))
            return LossOutput(loss, student_tokens, teacher_tokens, counts=counts)
        # dense logits: heads that are not a plain linear map (soft-capping, scaling) or sharded students
        teacher_logits = teacher(input_ids=batch.input_ids, attention_mask=batch.attention, logits_to_keep=batch.keep, use_cache=False).logits
        student_logits = student(input_ids=input_ids, attention_mask=attention, logits_to_keep=keep, use_cache=False).logits
        vocab = student_logits.shape[-1]
        teacher_logits = teacher_logits.reshape(-1, vocab)[batch.rows]
        if context:
            alone_logits = teacher(input_ids=input_ids, attention_mask=attention, logits_to_keep=keep, use_cache=False).logits
            gain = context_kl_per_position(teacher_logits, alone_logits.reshape(-1, vocab), c.temperature)
            weights, counts = context_weights(items, weights, gain, c.context_kl_threshold)
        per_position = forward_kl_per_position(teacher_logits, student_logits.reshape(-1, vocab), c.temperature)
        return LossOutput((per_position * weights).sum(), student_tokens, teacher_tokens, counts=counts)
