"""FT+KL (DiSC paper baseline): next-token CE plus β·KL(initial model ‖ student) on the same tokens.

The teacher is the frozen initial model reading the same document, with no extra context; β = 0.1
("deliberately strong") and T = 1 (`kl_temperature`, shared with replay) by default, as in the
authors' code.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..options import opt, require
from .base import LossOutput, register
from .ft import FineTune, TokenExample
from .heads import head_ce_kl


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

    def batch_loss(self, student, teacher, items: list[TokenExample], device) -> LossOutput:
        """Mean over items of CE + β·KL(initial ‖ student) on the same positions, in one student and one teacher pass."""
        batch, weights = self.token_batch(student, items, device)
        kl, ce = head_ce_kl(student, teacher, batch.inputs, batch.rows, batch.targets, weights, kl_weights=weights,
                            temperature=self.cfg.kl_temperature, chunk_size=self.cfg.kl_chunk_size, kernels=self.cfg.kernels)
        student_tokens = sum(i.student_tokens for i in items)
        return LossOutput(ce + self.config.kl_beta * kl, student_tokens, student_tokens + len(items),
                          metrics={"ce": ce.item(), "kl": kl.item()})
