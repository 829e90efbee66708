"""Shared by the CE and KL methods: sequences laid out for one forward pass (padded or packed) and the
chunked LM head + CE/KL over the positions a loss reads.

Packed (padding-free, as TRL's `padding_free` / `DataCollatorWithFlattening`): the sequences are concatenated
into ONE row [1, total] with `position_ids` restarting at 0 for each sequence and no attention mask;
transformers turns such position ids into attention that never crosses a sequence (a block-diagonal causal
mask for SDPA / eager, `cu_seqlens` for flash-attention 2). Padded: right-padded rows [n, longest] with an
attention mask. Either way `rows` marks the positions whose next token is a target, sequence after sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels import head_kl_ce
from ..losses import forward_kl_per_position
from ..models import final_hidden_states, plain_lm_head

PACKING_MODES = ("auto", "on", "off")


def round_up(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple if multiple > 1 else length


def pad_multiple(cfg, device) -> int:
    """`--pad-to-multiple`, 0 = automatic: 64 on CUDA (bounded attention shapes), 1 elsewhere."""
    if cfg.pad_to_multiple:
        return cfg.pad_to_multiple
    return 64 if torch.device(device).type == "cuda" else 1


@dataclass(frozen=True)
class SequenceBatch:
    """Sequences for one pass. `inputs`: the model's keyword arguments; `rows` [B, L] bool: positions whose
    next token is a target (in sequence order); `targets` [N]; `sequence_of_row` [N]: which sequence each
    row belongs to."""

    inputs: dict
    rows: torch.Tensor
    targets: torch.Tensor
    sequence_of_row: torch.Tensor
    packed: bool

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.inputs["input_ids"].shape)


def sequence_batch(sequences, pad_id: int, device, packed: bool, multiple: int = 1) -> SequenceBatch:
    """`sequences`: (ids, labels) pairs, labels -100 where no loss is taken (label t is predicted at t-1)."""
    lengths = [len(ids) for ids, _ in sequences]
    if packed:
        total = round_up(sum(lengths), multiple)
        input_ids = torch.full((1, total), pad_id, dtype=torch.long)
        position_ids = torch.zeros((1, total), dtype=torch.long)
        labels = torch.full((1, total), -100, dtype=torch.long)
        at = 0
        for ids, lab in sequences:
            n = len(ids)
            input_ids[0, at : at + n] = torch.tensor(ids)
            position_ids[0, at : at + n] = torch.arange(n)
            labels[0, at + 1 : at + n] = torch.tensor(lab[1:])  # the first label of a sequence is never predicted
            at += n
        if total > at:  # the padding tail is a segment of its own: nothing attends into it from the sequences
            position_ids[0, at:] = torch.arange(total - at)
        inputs = {"input_ids": input_ids.to(device), "position_ids": position_ids.to(device)}
        sequence = torch.repeat_interleave(torch.arange(len(sequences)), torch.tensor(lengths))
        sequence = torch.cat([sequence, torch.full((total - at,), -1)])[None]
    else:
        longest = round_up(max(lengths), multiple)
        input_ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        labels = torch.full_like(input_ids, -100)
        for row, (ids, lab) in enumerate(sequences):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention[row, : len(ids)] = 1
            labels[row, 1 : len(ids)] = torch.tensor(lab[1:])
        inputs = {"input_ids": input_ids.to(device), "attention_mask": attention.to(device)}
        sequence = torch.arange(len(sequences))[:, None].expand_as(input_ids)
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)  # target of position t
    rows = shifted != -100
    return SequenceBatch(inputs, rows.to(device), shifted[rows].to(device), sequence[rows].to(device), packed)


def mean_per_sequence_weights(batch: SequenceBatch, num_sequences: int, scale: float = 1.0) -> torch.Tensor:
    """Weight of each row so that the weighted sum is `scale` × the mean over sequences of their mean over rows."""
    counts = torch.bincount(batch.sequence_of_row, minlength=num_sequences).to(torch.float32)
    return scale / (counts[batch.sequence_of_row] * num_sequences)


def head_ce_kl(student, teacher, student_inputs: dict, student_rows: torch.Tensor, targets=None, ce_weights=None,
               teacher_inputs: dict | None = None, teacher_rows: torch.Tensor | None = None, kl_weights=None,
               temperature: float = 1.0, chunk_size: int = 1024, teacher_output: torch.Tensor | None = None,
               kernels: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted KL sum, weighted CE sum) over the selected rows of one student pass (and one teacher pass).

    With a plain LM head: final hidden states, then LM head + CE/KL in chunks (`chunked_head_kl_ce`, or Liger's fused
    kernels with `kernels="liger"`), no [N, V] tensor. Otherwise the model's own logits at those rows (the dense reference, same weighted sums).
    The teacher's rows (`teacher_rows`, default the student's) are aligned with the student's row by row;
    `teacher_output` is the teacher's side already computed at those rows (`teacher_side`), e.g. kept over steps.
    """
    with_kl = kl_weights is not None
    teacher_inputs = student_inputs if teacher_inputs is None else teacher_inputs
    teacher_rows = student_rows if teacher_rows is None else teacher_rows
    if plain_lm_head(student):
        student_hidden = final_hidden_states(student, **student_inputs, use_cache=False)[student_rows]
        teacher_hidden = teacher_output if teacher_output is not None or not with_kl else teacher_side(teacher, teacher_inputs, teacher_rows, True)
        return head_kl_ce(kernels, student_hidden, student.get_output_embeddings().weight, targets, ce_weights, teacher_hidden,
                                  teacher.head_weight if with_kl else None, kl_weights, temperature, chunk_size)
    student_logits = student(**student_inputs, use_cache=False).logits[student_rows]
    kl = ce = student_logits.new_zeros((), dtype=torch.float32)
    if with_kl:
        teacher_logits = teacher_output if teacher_output is not None else teacher_side(teacher, teacher_inputs, teacher_rows, False)
        kl = (forward_kl_per_position(teacher_logits, student_logits, temperature) * kl_weights).sum()
    if targets is not None:
        ce = (F.cross_entropy(student_logits.float(), targets, reduction="none") * ce_weights).sum()
    return kl, ce


def teacher_side(teacher, inputs: dict, rows: torch.Tensor, hidden: bool) -> torch.Tensor:
    """The teacher at `rows`: final hidden states (the chunked path) or logits (the dense path)."""
    if hidden:
        return teacher.hidden_states(**inputs, use_cache=False)[rows]
    return teacher(**inputs, use_cache=False).logits[rows]


def single(ids, device) -> dict:
    return {"input_ids": torch.tensor([list(ids)], device=device)}


def last_rows(length: int, count: int, device) -> torch.Tensor:
    """[1, length] bool: the `count` positions before the last one (they predict the last `count` tokens)."""
    rows = torch.zeros((1, length), dtype=torch.bool, device=device)
    rows[0, length - 1 - count : length - 1] = True
    return rows


VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")  # kernels that read segment boundaries, never computing across them


def attention_of(model) -> str:
    return getattr(model, "_ctxdistill_attention", None) or getattr(model.config, "_attn_implementation", None) or "eager"


MASKED_PACK_MAX_TOKENS = 2048  # the longest packed row `auto` builds for DiSC with SDPA / eager (the measured regime)


def packing_on(cfg, model, packed_tokens: int | None = None) -> bool:
    """Whether a batched pass is packed: `--packing on` / `off`, or `auto`: packed where the attention is a varlen
    kernel (flash-attention); with SDPA / eager only for a pass whose packed row would hold at most
    MASKED_PACK_MAX_TOKENS tokens (`packed_tokens`, given by DiSC's passes). SDPA and eager apply the
    block-diagonal mask to the whole [total, total] score matrix, so a packed row costs attention quadratic in
    its length: on CPU at 8 documents per step, packed FT (~2,000-token rows, backward through the mask) ran at
    0.67x the padded documents/s and packed DiSC (suffix rows of ~1,000 tokens, a forward-only teacher row of
    ~2,000) at 1.02x (docs/performance.md). On CUDA, DiSC is packed anyway for its bounded shapes (one row
    rounded to `--pad-to-multiple` instead of [suffixes, longest]; unmeasured); on CPU `auto` keeps the padded
    passes, whose bf16 numerics the documented results were measured with. Packed and padded are tested equal
    (fp32)."""
    if cfg.packing != "auto":
        return cfg.packing == "on"
    if attention_of(model) in VARLEN_ATTENTION:
        return True
    on_gpu = next(model.parameters()).device.type == "cuda"  # where bounded shapes pay (a kernel plan per new shape)
    return on_gpu and packed_tokens is not None and packed_tokens <= MASKED_PACK_MAX_TOKENS
