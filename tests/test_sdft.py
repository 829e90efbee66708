"""SDFT (methods/sdft.py): faithfulness to TRL's loss, chunked == dense, on-policy rollouts, the teacher's
privileged context, teacher kinds and their state (tests/test_sdft_training.py: bad input, the loop, resume).

The TRL reference below is an independent, per-position computation of what TRL's SDFTTrainer computes
(huggingface/trl f2cd57710ae345ea6428ae95363267fcf38a3dc8 = trl 1.16.0, trl/experimental/sdft/loss_utils.py
and sdft_trainer.py `_compute_self_distillation_loss`): logits / T, log-softmax, the divergence chosen by
`distillation_alpha`, on the student's top-k support (renormalised or with a tail bucket) or the full
vocabulary, the first `num_loss_tokens_to_skip` completion tokens masked, mean over each sequence's loss
tokens then over sequences. The same inputs also go through TRL's own functions (trl is in the `test` extra).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from ctxdistill.losses import chunked_head_sdft, sdft_per_position, sdft_sequence_loss
from sdft_helpers import CPU, RECORDS, fixed_rollouts, items_of, prepared, records_file, sdft_config  # noqa: F401  (records_file: a fixture)


# -- the reference ------------------------------------------------------------------------------------


def reference_divergence(p_s: list[float], p_t: list[float], alpha: float) -> float:
    """TRL's `compute_divergence` on probability vectors, written out term by term in float64."""
    def kl(p, q):
        return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q) if a > 0)

    if alpha == 0:
        return kl(p_t, p_s)
    if alpha == 1:
        return kl(p_s, p_t)
    m = [(1 - alpha) * a + alpha * b for a, b in zip(p_s, p_t)]
    return alpha * kl(p_t, m) + (1 - alpha) * kl(p_s, m)


def reference_support(s_logits: torch.Tensor, t_logits: torch.Tensor, topk: int, add_tail: bool):
    """Probability vectors of one position: the full softmax, or the student's top-k ids (renormalised or + tail)."""
    p_s, p_t = s_logits.double().softmax(-1), t_logits.double().softmax(-1)
    if not topk:
        return p_s.tolist(), p_t.tolist()
    ids = s_logits.topk(topk).indices
    top_s, top_t = p_s[ids].tolist(), p_t[ids].tolist()
    if add_tail:
        return top_s + [1 - sum(top_s)], top_t + [1 - sum(top_t)]
    return [v / sum(top_s) for v in top_s], [v / sum(top_t) for v in top_t]


def reference_loss(student_logits, teacher_logits, completion_mask, *, alpha, temperature=1.0, topk=0, add_tail=False, skip=0):
    """TRL's SDFT loss for a batch of [B, C, V] completion logits and a [B, C] completion mask."""
    per_sequence = []
    for b in range(student_logits.shape[0]):
        terms = []
        for c in range(student_logits.shape[1]):
            if completion_mask[b, c] and c >= skip:
                p_s, p_t = reference_support(student_logits[b, c] / temperature, teacher_logits[b, c] / temperature, topk, add_tail)
                terms.append(reference_divergence(p_s, p_t, alpha))
        per_sequence.append(sum(terms) / max(len(terms), 1))
    return sum(per_sequence) / len(per_sequence)


def trl_loss(student_logits, teacher_logits, completion_mask, *, alpha, temperature=1.0, topk=0, add_tail=False, skip=0):
    """The same through TRL's own functions (trl 1.16.0), with the trainer's masking and reduction."""
    import importlib

    # trl>=1.16 is in the `test` extra (pyproject.toml): a missing or moved module fails, never skips
    loss_utils = importlib.import_module("trl.experimental.sdft.loss_utils")
    s, t = student_logits / temperature, teacher_logits / temperature
    if topk:
        per_token = loss_utils.compute_topk_self_distillation_loss(s, t, distillation_topk=topk, distillation_alpha=alpha,
                                                                   distillation_add_tail=add_tail)
    else:
        per_token = loss_utils.compute_full_logit_self_distillation_loss(s, t, distillation_alpha=alpha)
    mask = completion_mask * (torch.arange(completion_mask.shape[1])[None] >= skip).long()
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


SETTINGS = [dict(alpha=1.0), dict(alpha=0.0), dict(alpha=0.5, temperature=0.7), dict(alpha=0.5, topk=5),
            dict(alpha=1.0, topk=5, add_tail=True), dict(alpha=0.2, skip=2)]


def completion_batch(seed=0, batch=3, length=6, vocab=40, hidden=16):
    """Hidden states, LM heads and logits of a batch of completions of different lengths (right-padded)."""
    g = torch.Generator().manual_seed(seed)
    h_s, h_t = torch.randn(batch, length, hidden, generator=g), torch.randn(batch, length, hidden, generator=g)
    w_s, w_t = torch.randn(vocab, hidden, generator=g) / 2, torch.randn(vocab, hidden, generator=g) / 2
    lengths = [length, length - 2, 1][:batch]
    mask = torch.zeros(batch, length, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    return h_s, h_t, w_s, w_t, mask, lengths


def ctxdistill_loss(h_s, h_t, w_s, w_t, mask, lengths, *, alpha, temperature=1.0, topk=0, add_tail=False, skip=0, chunk_size=4):
    """ctxdistill's path: the distilled rows only, weighted by the method's `position_weights`, chunked LM head."""
    from ctxdistill.losses import position_weights

    keep = mask.bool() & (torch.arange(mask.shape[1])[None] >= skip)
    weights = position_weights(lengths, skip, [1] * len(lengths), len(lengths))  # each row its own item
    return chunked_head_sdft(h_s[keep], h_t[keep], w_s, w_t, weights, alpha, temperature, topk, add_tail, chunk_size)


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_loss_matches_trl(setting):
    h_s, h_t, w_s, w_t, mask, lengths = completion_batch()
    s_logits, t_logits = h_s @ w_s.T, h_t @ w_t.T
    expected = reference_loss(s_logits, t_logits, mask, **setting)
    ours = ctxdistill_loss(h_s, h_t, w_s, w_t, mask, lengths, **setting)
    assert ours.item() == pytest.approx(expected, abs=1e-5, rel=1e-5)
    dense = sdft_sequence_loss(sdft_per_position(s_logits, t_logits, setting["alpha"], setting.get("temperature", 1.0),
                                                 setting.get("topk", 0), setting.get("add_tail", False)),
                               mask * (torch.arange(mask.shape[1])[None] >= setting.get("skip", 0)))
    assert dense.item() == pytest.approx(expected, abs=1e-5, rel=1e-5)


@pytest.mark.parametrize("setting", SETTINGS[:5], ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_loss_matches_trl_package(setting):
    """Against TRL's own code (trl from the `test` extra); the transcribed reference above runs as well."""
    h_s, h_t, w_s, w_t, mask, lengths = completion_batch(seed=1)
    expected = trl_loss(h_s @ w_s.T, h_t @ w_t.T, mask, **setting)
    assert ctxdistill_loss(h_s, h_t, w_s, w_t, mask, lengths, **setting).item() == pytest.approx(expected.item(), abs=1e-5, rel=1e-5)


def test_reverse_kl_is_the_default_and_points_the_right_way():
    from ctxdistill.methods.sdft import SdftConfig

    assert SdftConfig().sdft_beta == 1.0 and SdftConfig().sdft_topk == 0
    s, t = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.0, 1.0, 0.5]])
    p, q = s.softmax(-1), t.softmax(-1)
    assert sdft_per_position(s, t, beta=1.0).item() == pytest.approx((p * (p.log() - q.log())).sum().item(), abs=1e-6)  # KL(student ‖ teacher)
    assert sdft_per_position(s, t, beta=0.0).item() == pytest.approx((q * (q.log() - p.log())).sum().item(), abs=1e-6)  # KL(teacher ‖ student)


@pytest.mark.parametrize("setting", [dict(alpha=1.0), dict(alpha=0.5, topk=5, add_tail=True), dict(alpha=0.3, temperature=0.8)])
def test_chunked_equals_dense_with_gradients(setting):
    h_s, h_t, w_s, w_t, mask, lengths = completion_batch(seed=2)
    keep = mask.bool()
    rows = int(keep.sum())
    weights = torch.rand(rows, generator=torch.Generator().manual_seed(3))
    targets = torch.randint(0, w_s.shape[0], (rows,), generator=torch.Generator().manual_seed(4))
    old = torch.randn(rows, generator=torch.Generator().manual_seed(5)) - 3
    args = (setting["alpha"], setting.get("temperature", 1.0), setting.get("topk", 0), setting.get("add_tail", False))
    grads = []
    for chunk in (3, 0):  # 3 rows at a time (recomputed in backward) vs all rows at once
        hs, ws = h_s[keep].clone().requires_grad_(), w_s.clone().requires_grad_()
        loss = chunked_head_sdft(hs, h_t[keep], ws, w_t, weights, *args, chunk_size=chunk, targets=targets, old_logprobs=old, is_clip=2.0)
        loss.backward()
        grads.append((loss.detach(), hs.grad, ws.grad))
    from ctxdistill.losses import clipped_importance_ratio

    hs, ws = h_s[keep].clone().requires_grad_(), w_s.clone().requires_grad_()
    s_logits = hs @ ws.T
    dense = (sdft_per_position(s_logits, h_t[keep] @ w_t.T, *args) * clipped_importance_ratio(s_logits, targets, old, 2.0, args[1]) * weights).sum()
    dense.backward()
    for loss, g_h, g_w in grads:
        assert torch.allclose(loss, dense.detach(), atol=1e-6, rtol=1e-5)
        assert torch.allclose(g_h, hs.grad, atol=1e-6, rtol=1e-5) and torch.allclose(g_w, ws.grad, atol=1e-6, rtol=1e-5)


def test_importance_ratio_is_clipped_and_has_no_gradient():
    from ctxdistill.losses import clipped_importance_ratio

    logits = torch.zeros(2, 4, requires_grad=True)  # uniform: log p = log 1/4
    ratio = clipped_importance_ratio(logits, torch.tensor([0, 1]), torch.tensor([math.log(0.25), math.log(0.25) - 5]), clip=2.0)
    assert ratio.tolist() == pytest.approx([1.0, 2.0]) and not ratio.requires_grad


# -- the method on the tiny model ------------------------------------------------------------------------


def test_prompts_and_teacher_prompts(tiny_model_dir, records_file, tokenizer):
    from ctxdistill.generation.sampling import prompt_ids

    method, examples = prepared(sdft_config(tiny_model_dir, records_file), tokenizer)
    chat, text = examples
    assert list(chat.prompt_ids) == prompt_ids(tokenizer, RECORDS[0]["prompt"])  # chat template with the generation prompt
    teacher_chat = tokenizer.decode(chat.teacher_prompt_ids)
    assert "Who is the mayor of Velmora?\n\nVelmora elected Anika Dros" in teacher_chat and teacher_chat.endswith("assistant\n")
    assert tokenizer.decode(text.teacher_prompt_ids).startswith(RECORDS[1]["prompt"] + "\n\n" + RECORDS[1]["privileged_context"])
    assert chat.generation_prompt_ids == chat.prompt_ids and chat.max_completion == 6
    method, examples = prepared(sdft_config(tiny_model_dir, records_file, sdft_generate_from_teacher=True), tokenizer)
    assert examples[0].generation_prompt_ids == examples[0].teacher_prompt_ids


def test_sequence_batch_aligns_predictions_with_completion_tokens():
    from ctxdistill.generation.rollouts import sequence_batch

    batch = sequence_batch([((1, 2, 3), (7, 8), 0), ((4,), (9, 10, 11), 1)], 0, CPU)
    rows, cols = batch.keep.nonzero(as_tuple=True)
    assert cols.tolist() == [2, 3, 1, 2]  # the last prompt token predicts the first completion token; 1 token skipped in row 2
    assert batch.input_ids[rows, cols + 1].tolist() == batch.targets.tolist() == [7, 8, 10, 11]


def test_method_loss_equals_trl_on_trls_batch_layout(tiny_model_dir, records_file, tokenizer):
    """The whole method (prompts, teacher prompts, alignment, reduction) against TRL's layout: left-padded prompts +
    right-padded completions in one batch, logits[:, :-1][:, -C:] / T, the loss of `reference_loss`."""
    from conftest import tiny_llama
    from ctxdistill.teachers import Teacher

    cfg = sdft_config(tiny_model_dir, records_file, sdft_beta=0.5, sdft_temperature=0.9, sdft_loss_tokens_to_skip=1)
    method, examples = prepared(cfg, tokenizer)
    student, frozen = tiny_llama(len(tokenizer)), tiny_llama(len(tokenizer), seed=1)
    completions = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in (" Anika Dros.", " It is in Brest, France.")]
    items = items_of(method, examples)
    from ctxdistill.generation.rollouts import Rollout

    for item, completion in zip(items, completions):
        method.buffer.pending[item.key] = Rollout([tuple(completion)])
    ours = method.batch_loss(student, Teacher(model=frozen), items, CPU).loss.item()

    def trl_logits(model, prompts):
        width, length = max(map(len, prompts)), max(map(len, completions))
        ids = torch.full((len(prompts), width + length), tokenizer.pad_token_id)
        mask = torch.zeros_like(ids)
        for r, (p, c) in enumerate(zip(prompts, completions)):
            ids[r, width - len(p) : width + len(c)] = torch.tensor(list(p) + list(c))
            mask[r, width - len(p) : width + len(c)] = 1
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        return logits[:, :-1][:, -length:], mask[:, width:]

    s_logits, completion_mask = trl_logits(student, [e.prompt_ids for e in examples])
    t_logits, _ = trl_logits(frozen, [e.teacher_prompt_ids for e in examples])
    expected = reference_loss(s_logits, t_logits, completion_mask, alpha=0.5, temperature=0.9, skip=1)
    assert ours == pytest.approx(expected, abs=1e-5, rel=1e-5)


def test_rollouts_come_from_the_students_current_weights(tiny_model_dir, records_file, tokenizer):
    from conftest import tiny_llama

    cfg = sdft_config(tiny_model_dir, records_file, sdft_max_completion_tokens=12)
    student = tiny_llama(len(tokenizer))

    def completions(model):
        method, examples = prepared(cfg, tokenizer)
        rollouts, counts = method.rollouts(model, items_of(method, examples), CPU)
        assert counts["sdft_generated_sequences"] == 2 and counts["sdft_generated_tokens"] > 0
        return [r.completions for r in rollouts]

    first = completions(student)
    assert completions(student) == first  # the same weights and seeds: the same rollouts
    student.load_state_dict(tiny_llama(len(tokenizer), seed=1).state_dict())
    assert completions(student) != first  # other weights, the same seeds: other rollouts


def test_a_rollout_does_not_depend_on_what_shares_its_batch(tiny_model_dir, records_file, tokenizer):
    """Each row has its own seeded stream: drawn together, alone, in another order or another process, an item's
    rollout is the same (so 2 processes == 1 process accumulating 2, and packing changes nothing)."""
    from conftest import tiny_llama
    from ctxdistill.generation.rollouts import sample_rows, sampled_tokens

    model, (first, second) = tiny_llama(len(tokenizer)), prepared(sdft_config(tiny_model_dir, records_file), tokenizer)[1]
    prompts, kwargs = [list(first.prompt_ids), list(second.prompt_ids)], dict(max_new_tokens=10, stop_ids=[2], pad_id=0, precision="fp32")
    together = sample_rows(model, prompts, [11, 22], **kwargs)
    assert sample_rows(model, prompts[::-1], [22, 11], **kwargs) == together[::-1]
    assert [sample_rows(model, [p], [s], **kwargs)[0] for p, s in zip(prompts, [11, 22])] == together
    assert sample_rows(model, prompts, [12, 22], **kwargs)[0] != together[0]
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    assert sampled_tokens(logits, torch.tensor([0.0]), 1.0).item() == 3  # the most likely token first in the CDF
    assert sampled_tokens(logits, torch.tensor([0.999]), 1.0, top_k=2).item() == 2  # only the top 2 remain
    assert sampled_tokens(logits, torch.tensor([0.999]), 1.0, top_p=0.5).item() == 3  # p(3) = 0.64 covers top-p 0.5


def test_teacher_sees_the_privileged_context(tiny_model_dir, records_file, tokenizer):
    """Teacher = student weights: without the context the two distributions are equal (loss 0); with it they are not."""
    import dataclasses

    from conftest import tiny_llama
    from ctxdistill.teachers import Teacher

    student, frozen = tiny_llama(len(tokenizer)), tiny_llama(len(tokenizer))
    method, examples = prepared(sdft_config(tiny_model_dir, records_file), tokenizer)
    completion = tokenizer(" Anika Dros is the mayor.", add_special_tokens=False)["input_ids"]
    losses = {}
    for name, example in (("context", examples[0]), ("no context", dataclasses.replace(examples[0], teacher_prompt_ids=examples[0].prompt_ids))):
        method_items = items_of(method, [example])
        fixed_rollouts(method, method_items, completion)
        out = method.batch_loss(student, Teacher(model=frozen), method_items, CPU)
        assert out.student_tokens == len(completion) and not out.counts  # the fixed rollout, nothing drawn
        losses[name] = out.loss.item()
    assert losses["no context"] == pytest.approx(0.0, abs=1e-6)
    assert losses["context"] > 1e-4


@pytest.mark.parametrize("kind", ["base", "live", "ema"])
def test_teacher_kinds_lora(tiny_model_dir, records_file, tokenizer, kind):
    """Under LoRA all three teachers start as the initial model; ema follows the adapter once updated, and the
    student's own adapter weights are untouched by the teacher's pass."""
    from conftest import tiny_llama
    from ctxdistill.models import apply_lora
    from ctxdistill.teachers import Teacher

    cfg = sdft_config(tiny_model_dir, records_file, student="lora", sdft_teacher=kind, sdft_ema_rate=1.0)
    method, examples = prepared(cfg, tokenizer)
    assert method.needs_teacher() == (kind != "live")
    student = apply_lora(tiny_llama(len(tokenizer)), r=4, alpha=8, dropout=0.0)
    teacher = Teacher(student=student) if method.needs_teacher() else None
    with torch.no_grad():  # a trained adapter: B != 0
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.5)
    before = {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}
    completion = tokenizer(" Anika Dros.", add_special_tokens=False)["input_ids"]

    def loss_without_context():
        import dataclasses

        example = dataclasses.replace(examples[0], teacher_prompt_ids=examples[0].prompt_ids)
        its = items_of(method, [example])
        fixed_rollouts(method, its, completion)
        return method.batch_loss(student, teacher, its, CPU).loss.item()

    live_like = loss_without_context()
    assert all(torch.equal(p, before[n]) for n, p in student.named_parameters() if p.requires_grad)
    if kind == "live":
        assert live_like == pytest.approx(0.0, abs=1e-6)  # the teacher is the student
    else:
        assert live_like > 1e-5  # the initial model (base; ema before any update) differs from the trained adapter
    if kind == "ema":
        method.after_step(student, teacher, 1)  # rate 1: the shadow adapter becomes the student's
        assert loss_without_context() == pytest.approx(0.0, abs=1e-6)
        state = method.state_dict(teacher)
        assert set(state["tensors"]) == set(before)


def test_ema_full_finetuning_moves_the_frozen_copy(tiny_model_dir, records_file, tokenizer, tmp_path):
    from conftest import tiny_llama
    from ctxdistill.teachers import Teacher

    method, _ = prepared(sdft_config(tiny_model_dir, records_file, sdft_teacher="ema", sdft_ema_rate=0.25, sdft_teacher_sync_steps=2), tokenizer)
    student, teacher = tiny_llama(len(tokenizer), seed=1), Teacher(model=tiny_llama(len(tokenizer)))
    start = {n: p.clone() for n, p in teacher.model.named_parameters()}
    method.after_step(student, teacher, 1)  # not a sync step
    assert all(torch.equal(p, start[n]) for n, p in teacher.model.named_parameters())
    method.after_step(student, teacher, 2)
    target = dict(student.named_parameters())
    for n, p in teacher.model.named_parameters():
        assert torch.allclose(p, 0.75 * start[n] + 0.25 * target[n], atol=1e-6)
    from safetensors.torch import load_file, save_file

    save_file(method.state_dict(teacher)["tensors"], str(tmp_path / "method.safetensors"))  # as a checkpoint would
    fresh, again = prepared(method.cfg, tokenizer)[0], Teacher(model=tiny_llama(len(tokenizer)))
    fresh.load_state_dict({"tensors": load_file(str(tmp_path / "method.safetensors"))}, again)
    assert all(torch.equal(p, dict(teacher.model.named_parameters())[n]) for n, p in again.model.named_parameters())


def test_generate_every_reuses_the_window_and_checkpoints_it(tiny_model_dir, records_file, tokenizer):
    from conftest import tiny_llama
    from ctxdistill.teachers import Teacher

    cfg = sdft_config(tiny_model_dir, records_file, sdft_generate_every=2)
    method, examples = prepared(cfg, tokenizer)
    student, teacher = tiny_llama(len(tokenizer)), Teacher(model=tiny_llama(len(tokenizer)))
    first, second = items_of(method, examples)
    assert first.window is second.window  # two steps of one document each share one draw
    out = method.loss(student, teacher, first, CPU)
    assert out.counts["sdft_generated_sequences"] == 2
    state = method.state_dict()
    state["json"] = json.loads(json.dumps(state["json"]))  # what a checkpoint holds: the rollout not trained on yet
    assert len(state["json"]["rollouts"]) == 1 and not state["tensors"]
    resumed, examples = prepared(cfg, tokenizer)
    resumed.load_state_dict(state)
    _, again = items_of(resumed, examples)
    assert not resumed.loss(student, teacher, again, CPU).counts  # restored, not drawn anew
    assert not method.loss(student, teacher, second, CPU).counts
