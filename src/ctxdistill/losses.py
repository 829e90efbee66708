"""Pure loss functions over tensors. No models, no optimizers: tested against direct computations."""

from __future__ import annotations

import math

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


def ft_kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    beta: float = 0.1,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FT+KL (DiSC paper baseline): CE + beta · KL(teacher ‖ student) on the same tokens.

    Both logits are [B, L, V] over the same input; CE and KL cover the positions that predict a
    labelled token (mean over those positions). Returns (total, ce, kl).
    """
    ce = token_cross_entropy(student_logits, labels, ignore_index)
    keep = labels[:, 1:] != ignore_index
    kl = forward_kl_per_position(teacher_logits[:, :-1][keep], student_logits[:, :-1][keep], temperature).mean()
    return ce + beta * kl, ce, kl


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(label_{t+1}) at each position t, validity mask), both [B, L-1], in fp32."""
    shift_labels = labels[:, 1:]
    valid = shift_labels != ignore_index
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, shift_labels.clamp_min(0)[..., None])[..., 0], valid


def talr_dynamic_tau(token_logp: torch.Tensor, valid: torch.Tensor) -> float:
    """TALR's default temperature: the median over sequences of the mean per-token NLL (at least 1e-6)."""
    per_sequence = -(token_logp * valid).sum(-1) / valid.sum(-1).clamp_min(1)
    return max(per_sequence.median().item(), 1e-6)


@torch.no_grad()
def talr_token_weights(token_logp: torch.Tensor, tau: float, floor: float = 0.01, min_prob: float = 1e-6) -> torch.Tensor:
    """TALR's stop-gradient weights clamp(max(p, min_prob)^(1/tau), floor) from log p of each target token."""
    return token_logp.exp().clamp_min(min_prob).pow(1.0 / tau).clamp_min(floor)


def talr_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    tau: float | None = None,
    floor: float = 0.01,
    min_prob: float = 1e-6,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, float]:
    """Token-adaptive loss reweighting (Lin et al. 2025), as in the DiSC authors' baseline.

    w_t = clamp(p_t^(1/tau), floor) with stop-gradient (p_t clamped below at `min_prob`); the loss is
    sum_t w_t · NLL_t / (number of labelled tokens). `tau=None` uses `talr_dynamic_tau`.
    Returns (loss, tau used).
    """
    logp, valid = token_logprobs(logits, labels, ignore_index)
    if tau is None:
        tau = talr_dynamic_tau(logp.detach(), valid)
    weights = talr_token_weights(logp, tau, floor, min_prob) * valid
    loss = (weights * -logp * valid).sum() / valid.sum().clamp_min(1)
    return loss, tau


def chunked_kl(per_position: torch.Tensor, chunk: int = 64, reduction: str = "chunk_sum") -> torch.Tensor:
    """CD-base's reduction of a per-position KL [N]: the positions are cut into `chunk`-long pieces.

    `chunk_sum` is the authors' code (`kl_div(..., "batchmean")` on [1, chunk, V] divides by the
    batch size 1, so each chunk contributes the SUM of its positions) averaged over chunks;
    `mean` is the plain mean over positions.
    """
    if reduction == "mean":
        return per_position.mean()
    if reduction != "chunk_sum":
        raise ValueError(f"unknown reduction {reduction!r}")
    return torch.stack([piece.sum() for piece in per_position.split(chunk)]).mean()


def masked_kl_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over the selected positions of T² · KL(teacher ‖ student); logits [..., V], mask [...]."""
    return forward_kl_per_position(teacher_logits[mask], student_logits[mask], temperature).mean()


def distill_with_ce(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    mask: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    ce_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """In-context distillation: mean masked T²·KL plus `ce_weight` × mean CE of `targets` at the same
    positions (`targets[i]` is the gold next token at position i). Returns (total, kl, ce)."""
    kl = masked_kl_loss(teacher_logits, student_logits, mask, temperature)
    ce = F.cross_entropy(student_logits[mask].float(), targets[mask])
    return kl + ce_weight * ce, kl, ce


def chunked_head_kl(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_head: torch.Tensor,
    teacher_head: torch.Tensor,
    weights: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Σ_i weights[i] · T²·KL(teacher_i ‖ student_i), projecting hidden states to logits chunk by chunk.

    `*_hidden` are [N, H] final hidden states at the distilled positions, `*_head` the [V, H] LM-head
    weights. Each chunk's logits are recomputed in the backward pass (activation checkpointing), so
    at most `chunk_size` x V logits exist at once instead of N x V: memory stays flat in document
    length and the gradient equals the dense computation.
    """
    return chunked_head_kl_ce(student_hidden, student_head, teacher_hidden=teacher_hidden, teacher_head=teacher_head,
                              kl_weights=weights, temperature=temperature, chunk_size=chunk_size)[0]


def chunked_head_kl_ce(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    targets: torch.Tensor | None = None,
    ce_weights: torch.Tensor | None = None,
    teacher_hidden: torch.Tensor | None = None,
    teacher_head: torch.Tensor | None = None,
    kl_weights: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_i kl_weights[i] · T²·KL(teacher_i ‖ student_i), Σ_i ce_weights[i] · CE(student_i, targets[i])), chunk by chunk.

    The generalisation of `chunked_head_kl` for methods that take a CE, a KL or both on the same positions:
    `student_hidden` [N, H] are final hidden states at those positions, `*_head` [V, H] LM-head weights.
    Without a teacher the KL term is 0; without targets the CE term is 0. The student's logits are projected
    once per chunk for both terms and recomputed in the backward pass, so at most `chunk_size` x V logits exist.
    """
    from torch.utils.checkpoint import checkpoint

    with_kl, with_ce = teacher_hidden is not None, targets is not None
    chunk_size = chunk_size or max(student_hidden.shape[0], 1)

    def chunk_loss(h_s, h_t, t, w_kl, w_ce):
        s_logits = h_s @ student_head.T.to(h_s.dtype)
        kl = ce = s_logits.new_zeros((), dtype=torch.float32)
        if with_kl:
            t_logits = h_t @ teacher_head.T.to(h_t.dtype)
            kl = (forward_kl_per_position(t_logits, s_logits, temperature) * w_kl).sum()
        if with_ce:
            ce = (F.cross_entropy(s_logits.float(), t, reduction="none") * w_ce).sum()
        return kl, ce

    n = student_hidden.shape[0]
    kl_total = ce_total = student_hidden.new_zeros((), dtype=torch.float32)
    for first in range(0, n, chunk_size):
        part = slice(first, first + chunk_size)
        args = (student_hidden[part], teacher_hidden[part].detach() if with_kl else None, targets[part] if with_ce else None,
                kl_weights[part] if with_kl else None, ce_weights[part] if with_ce else None)
        several = n > chunk_size and torch.is_grad_enabled()  # one chunk: nothing to save by recomputing
        kl, ce = checkpoint(chunk_loss, *args, use_reentrant=False) if several else chunk_loss(*args)
        kl_total, ce_total = kl_total + kl, ce_total + ce
    return kl_total, ce_total


def topk_tail_kl_per_position(
    teacher_topk_logprobs: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    student_logits: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """T²·KL over the teacher's top-k tokens plus one bucket holding the rest of the vocabulary.

    The teacher side comes from a cache: log-probabilities at temperature T of its k most likely
    tokens ([N, k]) and their ids. The tail bucket's teacher mass is 1 − Σ top-k; the student's is its
    mass outside those ids. With k = V the tail is empty and this equals the full-vocabulary KL.
    """
    s_logp = F.log_softmax(student_logits.float() / temperature, dim=-1)
    s_top = s_logp.gather(-1, teacher_topk_ids.long())
    t_top = teacher_topk_logprobs.float()
    top_term = (t_top.exp() * (t_top - s_top)).sum(-1)
    if teacher_topk_ids.shape[-1] == student_logits.shape[-1]:  # the whole vocabulary: no tail bucket
        return top_term * temperature**2
    t_tail = (1 - t_top.exp().sum(-1)).clamp_min(0)
    # The student's tail mass as a log-sum-exp over the tokens outside the top-k (stable; a large
    # finite fill instead of -inf for the top-k entries keeps every gradient finite).
    s_tail_logp = torch.logsumexp(s_logp.scatter(-1, teacher_topk_ids.long(), -1e4), dim=-1)
    tail_term = torch.where(t_tail > 1e-12, t_tail * (torch.log(t_tail.clamp_min(1e-30)) - s_tail_logp), torch.zeros_like(t_tail))
    return (top_term + tail_term) * temperature**2


def context_kl_per_position(with_context_logits: torch.Tensor, alone_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(c/T) ‖ softmax(a/T)) in nats at each position, WITHOUT the T² factor: how much the context
    changes the teacher's prediction (ctxdistill's context-sensitive DiSC variant). Logits [..., V] -> [...]."""
    return forward_kl_per_position(with_context_logits, alone_logits, temperature) / temperature**2


@torch.no_grad()
def chunked_context_kl(
    with_context_hidden: torch.Tensor,
    alone_hidden: torch.Tensor,
    head: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """`context_kl_per_position` from [N, H] hidden states and a [V, H] LM head, `chunk_size` positions at a
    time, so no [N, V] tensor exists (the chunked-head path of DiSC). No gradient: it only selects positions."""
    chunk_size = chunk_size or max(with_context_hidden.shape[0], 1)
    parts = [context_kl_per_position(c @ head.T.to(c.dtype), a @ head.T.to(a.dtype), temperature)
             for c, a in zip(with_context_hidden.split(chunk_size), alone_hidden.split(chunk_size))]
    return torch.cat(parts) if parts else with_context_hidden.new_zeros(0, dtype=torch.float32)


def context_gain_mask(context_kl: torch.Tensor, threshold: float) -> torch.Tensor:
    """Positions whose context KL exceeds `threshold` (nats); a negative threshold keeps them all."""
    return context_kl > threshold


def renormalise_within_groups(weights: torch.Tensor, keep: torch.Tensor, group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """`weights` with dropped positions zeroed and each group's kept weights rescaled to the group's original total.

    So a document's loss stays a weighted mean over the positions it keeps; a group that keeps nothing
    contributes 0, and a group that keeps everything is returned bit for bit (no rescaling round-off).
    """
    kept = weights * keep.to(weights.dtype)
    total = torch.zeros(num_groups, dtype=weights.dtype, device=weights.device).index_add(0, group, weights)
    kept_total = torch.zeros_like(total).index_add(0, group, kept)
    dropped = torch.zeros(num_groups, dtype=torch.long, device=weights.device).index_add(0, group, (~keep).long())
    scale = torch.where(kept_total > 0, total / kept_total.clamp_min(torch.finfo(weights.dtype).tiny), torch.zeros_like(total))
    scale = torch.where(dropped == 0, torch.ones_like(scale), scale)
    return kept * scale[group]


def replay_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    ce_weight: float = 1.0,
    kl_weight: float = 0.0,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> torch.Tensor:
    """A replay item's loss: ce_weight · CE + kl_weight · T²·KL(initial ‖ student), both means over the labelled
    positions (as `ft_kl_loss`). A zero weight skips its term, so `ce_weight = 0` is a pure KL retention term."""
    loss = student_logits.new_zeros((), dtype=torch.float32)
    if ce_weight:
        ce = token_cross_entropy(student_logits, labels, ignore_index)
        loss = ce if ce_weight == 1 else ce_weight * ce
    if kl_weight:
        keep = labels[:, 1:] != ignore_index
        kl = forward_kl_per_position(teacher_logits[:, :-1][keep], student_logits[:, :-1][keep], temperature).mean()
        loss = loss + kl_weight * kl if ce_weight else kl_weight * kl
    return loss


# -- SDFT (on-policy self-distillation): TRL's divergence family -------------------------------------


def generalized_jsd_per_position(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 1.0,
                                 temperature: float = 1.0) -> torch.Tensor:
    """TRL's SDFT/GKD divergence at each position, summed over the vocabulary (no T² factor, as TRL).

    beta = 0: forward KL(teacher ‖ student); beta = 1: reverse KL(student ‖ teacher); in between the
    generalized JSD  beta·KL(teacher ‖ m) + (1 − beta)·KL(student ‖ m)  with m = beta·teacher + (1 − beta)·student
    (TRL's `distillation_alpha`, GKD's `beta`). Logits [..., V] are divided by `temperature`; result [...] in fp32.
    """
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return jsd_from_logprobs(s, t, beta)


def jsd_from_logprobs(s: torch.Tensor, t: torch.Tensor, beta: float) -> torch.Tensor:
    """`generalized_jsd_per_position` on log-probabilities (of any support, e.g. top-k plus a tail bucket)."""
    if beta == 0:
        return F.kl_div(s, t, log_target=True, reduction="none").sum(-1)
    if beta == 1:
        return F.kl_div(t, s, log_target=True, reduction="none").sum(-1)
    log_m = torch.logsumexp(torch.stack([s + math.log(1 - beta), t + math.log(beta)]), dim=0)
    to_teacher = F.kl_div(log_m, t, log_target=True, reduction="none").sum(-1)
    to_student = F.kl_div(log_m, s, log_target=True, reduction="none").sum(-1)
    return beta * to_teacher + (1 - beta) * to_student


def with_tail_bucket(logprobs: torch.Tensor) -> torch.Tensor:
    """Top-k log-probabilities [..., k] plus one bucket holding the rest of the mass: [..., k + 1], summing to 1."""
    captured = torch.logsumexp(logprobs, dim=-1, keepdim=True).clamp(max=-1e-7)
    return torch.cat([logprobs, torch.log(-torch.expm1(captured))], dim=-1)


def topk_jsd_per_position(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int, beta: float = 1.0,
                          temperature: float = 1.0, add_tail: bool = False) -> torch.Tensor:
    """`generalized_jsd_per_position` on the STUDENT's top-k tokens (TRL's `topk_logits` mode): the teacher is
    read at the same ids; the k entries are renormalised, or (`add_tail`) completed by one tail bucket each."""
    s_all = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t_all = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    ids = s_all.topk(min(k, s_all.shape[-1]), dim=-1).indices  # the order of logits and log-probs is the same
    s, t = s_all.gather(-1, ids), t_all.gather(-1, ids)
    if add_tail:
        s, t = with_tail_bucket(s), with_tail_bucket(t)
    else:
        s, t = s - torch.logsumexp(s, -1, keepdim=True), t - torch.logsumexp(t, -1, keepdim=True)
    return jsd_from_logprobs(s, t, beta)


def sdft_per_position(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 1.0, temperature: float = 1.0,
                      topk: int = 0, add_tail: bool = False) -> torch.Tensor:
    """SDFT's per-position divergence: full vocabulary (`topk` 0) or the student's top-k support."""
    if topk > 0:
        return topk_jsd_per_position(student_logits, teacher_logits, topk, beta, temperature, add_tail)
    return generalized_jsd_per_position(student_logits, teacher_logits, beta, temperature)


def clipped_importance_ratio(student_logits: torch.Tensor, targets: torch.Tensor, old_logprobs: torch.Tensor,
                             clip: float, temperature: float = 1.0) -> torch.Tensor:
    """TRL's correction for reused rollouts: min(π_now(y)/π_then(y), clip) per position, without gradient."""
    now = F.log_softmax(student_logits.detach().float() / temperature, dim=-1).gather(-1, targets[..., None])[..., 0]
    return torch.exp((now - old_logprobs.float()).clamp(-20.0, 20.0)).clamp(max=clip)


def sdft_sequence_loss(per_position: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """TRL's SDFT reduction: per sequence the mean over its loss tokens (0 when it has none), then the mean over
    sequences. `per_position` and `loss_mask` are [B, C] over the completions."""
    mask = loss_mask.to(per_position.dtype)
    return ((per_position * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)).mean()


def chunked_head_sdft(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_head: torch.Tensor,
    teacher_head: torch.Tensor,
    weights: torch.Tensor,
    beta: float = 1.0,
    temperature: float = 1.0,
    topk: int = 0,
    add_tail: bool = False,
    chunk_size: int = 1024,
    targets: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
    is_clip: float = 0.0,
) -> torch.Tensor:
    """Σ_i weights[i] · `sdft_per_position` at row i, from [N, H] hidden states and [V, H] LM heads, `chunk_size`
    rows at a time with activation checkpointing (as `chunked_head_kl`): no [N, V] tensor, the same gradient.

    With `old_logprobs` (and `targets`, the sampled tokens) each row is scaled by `clipped_importance_ratio`.
    """
    from torch.utils.checkpoint import checkpoint

    def chunk_loss(h_s, h_t, w, y, old):
        s_logits = h_s @ student_head.T.to(h_s.dtype)
        t_logits = h_t @ teacher_head.T.to(h_t.dtype)
        per_position = sdft_per_position(s_logits, t_logits, beta, temperature, topk, add_tail)
        if old is not None and is_clip > 0:
            per_position = per_position * clipped_importance_ratio(s_logits, y, old, is_clip, temperature)
        return (per_position * w).sum()

    rows = student_hidden.shape[0]
    chunk_size = chunk_size or max(rows, 1)
    total = student_hidden.new_zeros((), dtype=torch.float32)
    for first in range(0, max(rows, 1), chunk_size):
        part = slice(first, first + chunk_size)
        args = (student_hidden[part], teacher_hidden[part].detach(), weights[part],
                None if targets is None else targets[part], None if old_logprobs is None else old_logprobs[part])
        if rows > chunk_size and torch.is_grad_enabled():
            total = total + checkpoint(chunk_loss, *args, use_reentrant=False)
        else:
            total = total + chunk_loss(*args)
    return total


@torch.no_grad()
def chunked_token_logprobs(hidden: torch.Tensor, head: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                           chunk_size: int = 1024) -> torch.Tensor:
    """log softmax(hidden @ head.T / T)[target] per row ([N, H], [V, H], [N] -> [N] fp32), `chunk_size` rows at a time."""
    chunk_size = chunk_size or max(hidden.shape[0], 1)
    parts = [F.log_softmax((h @ head.T.to(h.dtype)).float() / temperature, dim=-1).gather(-1, y[:, None])[:, 0]
             for h, y in zip(hidden.split(chunk_size), targets.split(chunk_size))]
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def position_weights(lengths: list[int], skip: int, per_item: list[int], num_items: int) -> torch.Tensor:
    """Weight of each loss position (the order of `SequenceBatch.keep`): 1 / (its rollout's loss tokens × the
    item's rollouts × items), so the weighted sum is TRL's per-sequence mean, averaged over rollouts and items."""
    weights, row = [], 0
    for copies in per_item:
        for _ in range(copies):
            n = max(lengths[row] - skip, 0)
            weights.append(torch.full((n,), 1.0 / (n * copies * num_items)) if n else torch.zeros(0))
            row += 1
    return torch.cat(weights) if weights else torch.zeros(0)
