"""FT+TALR (Lin et al. 2025, a DiSC paper baseline): token-adaptive loss reweighting.

Each token's NLL is weighted by w_t = clamp(p_t^(1/τ), 0.01) under stop-gradient, so tokens the
model finds very unlikely (the new facts) pull less hard; τ is the batch median of per-sequence
mean NLL, recomputed every step, unless `talr_tau` fixes it. The training loop feeds one document
at a time, so the "batch" median is that document's mean NLL, as with the authors' batch size 1.
"""

from __future__ import annotations

import torch

from ..losses import talr_loss
from .ft import FineTune, TokenExample


class Talr(FineTune):
    name = "talr"

    def loss(self, student, teacher, item: TokenExample, cfg, pad_id: int, device) -> tuple[torch.Tensor, dict]:
        ids = torch.tensor([item.ids], device=device)
        logits = student(input_ids=ids, use_cache=False).logits
        loss, tau = talr_loss(logits, ids, tau=cfg.talr_tau or None, floor=cfg.talr_floor)
        return loss, {"student_tokens": len(item.ids) - 1, "teacher_tokens": 0, "tau": tau}
