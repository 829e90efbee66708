"""FT+TALR (Lin et al. 2025, a DiSC paper baseline): token-adaptive loss reweighting.

Each token's NLL is weighted by w_t = clamp(p_t^(1/τ), 0.01) under stop-gradient, so tokens the
model finds very unlikely (the new facts) pull less hard; τ is the batch median of per-sequence
mean NLL, recomputed every step, unless `talr_tau` fixes it. The training loop feeds one document
at a time, so the "batch" median is that document's mean NLL, as with the authors' batch size 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..losses import chunked_head_kl_ce, chunked_token_logprobs, talr_dynamic_tau, talr_loss, talr_token_weights
from ..models import final_hidden_states, plain_lm_head
from .heads import sequence_batch
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
    batched = False  # tau is a statistic of the pass's batch: packing documents would change it

    def loss(self, student, teacher, item: TokenExample, device) -> LossOutput:
        if plain_lm_head(student):
            return self.chunked_loss(student, item, device)
        ids = torch.tensor([item.ids], device=device)
        logits = student(input_ids=ids, use_cache=False).logits
        loss, tau = talr_loss(logits, ids, tau=self.config.talr_tau or None, floor=self.config.talr_floor)
        return LossOutput(loss, len(item.ids) - 1, metrics={"tau": tau})

    def chunked_loss(self, student, item: TokenExample, device) -> LossOutput:
        """`talr_loss` with the LM head in chunks: a no-gradient pass over the chunks gives log p of each target
        (hence tau and the weights), then the weighted CE runs chunk by chunk with recomputation."""
        c, chunk = self.config, self.cfg.kl_chunk_size
        batch = sequence_batch([(item.ids, item.ids)], self.pad_id, device, packed=True)
        hidden = final_hidden_states(student, **batch.inputs, use_cache=False)[batch.rows]
        head = student.get_output_embeddings().weight
        logp = chunked_token_logprobs(hidden.detach(), head, batch.targets, chunk_size=chunk)
        tau = c.talr_tau or talr_dynamic_tau(logp[None], torch.ones_like(logp[None], dtype=torch.bool))
        weights = talr_token_weights(logp, tau, c.talr_floor) / len(logp)
        _, loss = chunked_head_kl_ce(hidden, head, batch.targets, weights, chunk_size=chunk)
        return LossOutput(loss, len(item.ids) - 1, metrics={"tau": tau})
