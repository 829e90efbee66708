"""FT+TALR (Lin et al. 2025, a DiSC paper baseline): token-adaptive loss reweighting.

Each token's NLL is weighted by w_t = clamp(p_t^(1/τ), 0.01) under stop-gradient, so tokens the
model finds very unlikely (the new facts) pull less hard; τ is the batch median of per-sequence
mean NLL, recomputed every step, unless `talr_tau` fixes it. The training loop feeds one document
at a time, so the "batch" median is that document's mean NLL, as with the authors' batch size 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..losses import talr_loss
from ..options import opt, require
from .base import LossOutput, register
from .ft import FineTune, TokenExample


@dataclass
class TalrConfig:
    """talr options"""

    talr_tau: float = opt(0.0, "talr: fixed temperature tau of the weights p^(1/tau); 0 = the batch median of per-sequence mean NLL, recomputed every step")
    talr_floor: float = opt(0.01, "talr: lower clamp of the token weights")

    def validate(self) -> None:
        require(self, ("talr_tau", "talr_floor"), lambda v: v >= 0, ">= 0")


@register
class Talr(FineTune):
    name = "talr"
    config_class = TalrConfig

    def loss(self, student, teacher, item: TokenExample, device) -> LossOutput:
        ids = torch.tensor([item.ids], device=device)
        logits = student(input_ids=ids, use_cache=False).logits
        loss, tau = talr_loss(logits, ids, tau=self.config.talr_tau or None, floor=self.config.talr_floor)
        return LossOutput(loss, len(item.ids) - 1, metrics={"tau": tau})
