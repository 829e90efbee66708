"""Pure loss functions over tensors. No models, no optimizers: tested against direct computations."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def forward_kl_per_position(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T² · KL(softmax(t/T) ‖ softmax(s/T)) at each position, summed over the full vocabulary.

    Inputs are [..., V]; the result is [...] in fp32. The T² factor keeps gradient magnitudes
    comparable across temperatures (Hinton et al.), as in the DiSC code.
    """
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="none").sum(-1) * temperature**2


def mean_per_group(values: torch.Tensor, group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Mean of `values` inside each group id in [0, num_groups); groups with no member give 0."""
    sums = torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add(0, group, values)
    counts = torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add(0, group, torch.ones_like(values))
    return sums / counts.clamp_min(1)


def disc_loss(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    span_of_position: torch.Tensor,
    num_spans: int,
    temperature: float = 2.0,
) -> torch.Tensor:
    """DiSC objective for one document: mean over split points of the mean per-position forward KL.

    `teacher_logits` and `student_logits` are [N, V] over the N distilled positions of all spans,
    aligned row by row; `span_of_position[i]` says which split point row i belongs to.
    """
    per_position = forward_kl_per_position(teacher_logits, student_logits, temperature)
    return mean_per_group(per_position, span_of_position, num_spans).mean()


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Next-token CE, mean over the labelled tokens. `logits` [B, L, V] predict `labels` [B, L] shifted by one."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=ignore_index
    )
