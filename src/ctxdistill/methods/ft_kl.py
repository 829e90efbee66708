"""FT+KL (DiSC paper baseline): next-token CE plus β·KL(initial model ‖ student) on the same tokens.

The teacher is the frozen initial model reading the same document, with no extra context; β = 0.1
("deliberately strong") and T = 1 (`kl_temperature`, shared with replay) by default, as in the
authors' code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..losses import ft_kl_loss
from ..options import opt, require
from .base import LossOutput, register
from .ft import FineTune, TokenExample


@dataclass
class FtKlConfig:
    """ft_kl options"""

    kl_beta: float = opt(0.1, "ft_kl: weight of KL(initial model || student) added to the CE")

    def validate(self) -> None:
        require(self, ("kl_beta",), lambda v: v >= 0, ">= 0")


@register
class FineTuneKL(FineTune):
    name = "ft_kl"
    config_class = FtKlConfig

    def needs_teacher(self) -> bool:
        return True

    def loss(self, student, teacher, item: TokenExample, device) -> LossOutput:
        ids = torch.tensor([item.ids], device=device)
        student_logits = student(input_ids=ids, use_cache=False).logits
        teacher_logits = teacher(input_ids=ids, use_cache=False).logits
        loss, ce, kl = ft_kl_loss(student_logits, teacher_logits, ids, self.config.kl_beta, self.cfg.kl_temperature)
        n = len(item.ids)
        return LossOutput(loss, n - 1, n, metrics={"ce": ce.item(), "kl": kl.item()})
