"""Which of a step's items share a forward pass, and what run.json says about how those passes ran."""

from __future__ import annotations


def forward_units(cfg, method, rt, group: list, slots: list[int | None]) -> list[list[int | None]]:
    """This process's slots, packed into forward passes of at most `batch_tokens` tokens.

    Only methods with a batched loss are packed, under document normalisation on data-parallel or
    single-process runs; documents are sorted by length first so batches carry little padding.
    Everything else runs one item per forward pass.
    """
    if (cfg.batch_tokens <= 0 or not method.batched or cfg.loss_normalization == "token"
            or (cfg.uses("disc") and cfg.disc.teacher_mode == "per_split") or rt.sharded or None in slots):
        return [[slot] for slot in slots]
    size = lambda slot: group[slot].teacher_tokens + group[slot].student_tokens
    units: list[list[int | None]] = []
    used = 0
    for slot in sorted(slots, key=size):
        if units and used + size(slot) <= cfg.batch_tokens:
            units[-1].append(slot)
            used += size(slot)
        else:
            units.append([slot])
            used = size(slot)
    return units


def packing_report(trainer) -> dict:
    """run.json `packing`: whether batched passes are packed padding-free, the attention they run with, the
    length multiple and how many distinct (rows, length) pass shapes the run's batched passes had."""
    from ..methods.heads import MASKED_PACK_MAX_TOKENS, attention_of, pad_multiple, packing_on

    cfg, method = trainer.cfg, trainer.method
    packed = method.batched and packing_on(cfg, trainer.unwrapped)
    if method.batched and not packed and cfg.packing == "auto" and cfg.uses("disc") and trainer.rt.device.type == "cuda":
        packed = f"DiSC passes of up to {MASKED_PACK_MAX_TOKENS} tokens"
    return {"batched_loss": method.batched, "packed": packed, "mode": cfg.packing,
            "attention": attention_of(trainer.unwrapped),
            "pad_to_multiple": pad_multiple(cfg, trainer.rt.device), "distinct_pass_shapes": len(method.shapes_seen)}
