"""FT+KL (DiSC paper baseline): next-token CE plus β·KL(initial model ‖ student) on the same tokens.

The teacher is the frozen initial model reading the same document, with no extra context; β = 0.1
("deliberately strong") and T = 1 by default, as in the authors' code.
"""

from __future__ import annotations

import torch

from ..losses import ft_kl_loss
from .ft import FineTune, TokenExample


class FineTuneKL(FineTune):
    name = "ft_kl"
    needs_teacher = True

    def loss(self, student, teacher, item: TokenExample, cfg, pad_id: int, device) -> tuple[torch.Tensor, dict]:
        ids = torch.tensor([item.ids], device=device)
        student_logits = student(input_ids=ids, use_cache=False).logits
        teacher_logits = teacher(input_ids=ids, use_cache=False).logits
        loss, ce, kl = ft_kl_loss(student_logits, teacher_logits, ids, cfg.kl_beta, cfg.kl_temperature)
        n = len(item.ids)
        return loss, {"student_tokens": n - 1, "teacher_tokens": n, "ce": ce.item(), "kl": kl.item()}
