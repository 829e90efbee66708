"""Chunked LM head + CE/KL (`losses.chunked_head_kl_ce`, `methods/heads.py`) equals the dense logits, for every
method that uses it: the loss and every gradient, fp32, against the methods' reference formulas on full logits
(the losses.py functions the methods called before) and against the dense fallback of non-plain heads."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from conftest import perturbed_teacher, tiny_llama

from ctxdistill.config import TrainConfig
from ctxdistill.losses import (chunked_head_kl, chunked_head_kl_ce, chunked_kl, distill_with_ce, forward_kl_per_position, ft_kl_loss,
                               masked_kl_loss, replay_loss, token_cross_entropy)
from ctxdistill.methods import heads
from ctxdistill.methods.cd_base import CdBase, CdDocExample, EntityStep, TransferSentence
from ctxdistill.methods.ft import FineTune, TokenExample
from ctxdistill.methods.ft_kl import FineTuneKL
from ctxdistill.methods.icl_distill import IclDistill, IclItem
from ctxdistill.methods.mixsd import MixSD, SftExample
from ctxdistill.methods.replay import Replay, ReplayExample

VOCAB = 300
CHUNK = 7  # positions per chunk: every sequence below spans several chunks


def ids(n: int, seed: int) -> tuple[int, ...]:
    return tuple(torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist())


@pytest.fixture()
def pair():
    student = tiny_llama(VOCAB)
    return student, perturbed_teacher(student)


def logits(model, seq):
    return model(input_ids=torch.tensor([list(seq)])).logits


def value_and_grads(student, compute):
    student.zero_grad()
    loss = compute()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in student.parameters() if p.requires_grad]


def assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-7)
    for x, y in zip(a[1], b[1]):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-7)


def check(student, method_loss, reference, monkeypatch):
    chunked = value_and_grads(student, method_loss)
    assert_same(chunked, value_and_grads(student, reference))
    with monkeypatch.context() as m:  # a head that is not a plain linear map: the dense fallback
        m.setattr(heads, "plain_lm_head", lambda model: False)
        import ctxdistill.methods.cd_base as cd_base
        m.setattr(cd_base, "plain_lm_head", lambda model: False)
        assert_same(value_and_grads(student, method_loss), chunked)


def test_chunked_head_kl_ce_equals_dense_and_generalises_chunked_head_kl():
    torch.manual_seed(0)
    n, hidden, vocab = 23, 16, 50
    h_s, h_t = torch.randn(n, hidden, requires_grad=True), torch.randn(n, hidden)
    head_s, head_t = torch.randn(vocab, hidden, requires_grad=True), torch.randn(vocab, hidden)
    targets, w_kl, w_ce = torch.randint(0, vocab, (n,)), torch.rand(n), torch.rand(n)
    kl, ce = chunked_head_kl_ce(h_s, head_s, targets, w_ce, h_t, head_t, w_kl, 2.0, chunk_size=5)
    grads = torch.autograd.grad(kl + 3 * ce, (h_s, head_s))
    s_logits = h_s @ head_s.T
    dense_kl = (forward_kl_per_position(h_t @ head_t.T, s_logits, 2.0) * w_kl).sum()
    dense_ce = (F.cross_entropy(s_logits, targets, reduction="none") * w_ce).sum()
    for a, b in zip(grads, torch.autograd.grad(dense_kl + 3 * dense_ce, (h_s, head_s))):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close((kl, ce), (dense_kl, dense_ce))
    torch.testing.assert_close(chunked_head_kl(h_s, h_t, head_s, head_t, w_kl, 2.0, 5), kl)


def test_ft_and_lora_chunked_ce_equals_the_dense_token_cross_entropy(pair, monkeypatch):
    from ctxdistill.models import apply_lora

    student, teacher = pair
    item = TokenExample("d", ids(40, 1))
    method = FineTune(TrainConfig.create(kl_chunk_size=CHUNK))
    check(student, lambda: method.loss(student, teacher, item, "cpu").loss,
          lambda: token_cross_entropy(logits(student, item.ids), torch.tensor([item.ids])), monkeypatch)
    lora = apply_lora(student, r=4, alpha=8, dropout=0.0)
    check(lora, lambda: method.loss(lora, teacher, item, "cpu").loss,
          lambda: token_cross_entropy(logits(lora, item.ids), torch.tensor([item.ids])), monkeypatch)


def test_ft_kl_chunked_equals_ft_kl_loss(pair, monkeypatch):
    student, teacher = pair
    item = TokenExample("d", ids(33, 2))
    method = FineTuneKL(TrainConfig.create(method="ft_kl", kl_chunk_size=CHUNK, kl_temperature=1.5))
    out = method.loss(student, teacher, item, "cpu")
    ref = ft_kl_loss(logits(student, item.ids), logits(teacher.model, item.ids).detach(), torch.tensor([item.ids]), 0.1, 1.5)
    assert out.metrics["ce"] == pytest.approx(ref[1].item(), rel=1e-5) and out.metrics["kl"] == pytest.approx(ref[2].item(), rel=1e-5)
    check(student, lambda: method.loss(student, teacher, item, "cpu").loss,
          lambda: ft_kl_loss(logits(student, item.ids), logits(teacher.model, item.ids).detach(), torch.tensor([item.ids]), 0.1, 1.5)[0],
          monkeypatch)


@pytest.mark.parametrize("ce_weight", [1.0, 0.0])
def test_replay_chunked_ce_and_kl_equal_replay_loss(pair, monkeypatch, ce_weight):
    student, teacher = pair
    seq = ids(30, 3)
    item = ReplayExample("replay:x", seq, (-100,) * 9 + seq[9:])
    method = Replay(TrainConfig.create(method="replay", replay_kl_weight=0.5, replay_ce_weight=ce_weight, kl_chunk_size=CHUNK))
    labels = torch.tensor([item.labels])
    check(student, lambda: method.loss(student, teacher, item, "cpu").loss,
          lambda: replay_loss(logits(student, seq), logits(teacher.model, seq).detach(), labels, ce_weight, 0.5), monkeypatch)


def test_mixsd_chunked_ce_equals_the_masked_token_cross_entropy(pair, monkeypatch):
    student, teacher = pair
    item = SftExample("m", ids(28, 4), 10)
    method = MixSD(TrainConfig.create(method="mixsd", corpus="unused.jsonl", kl_chunk_size=CHUNK))
    labels = torch.tensor([item.ids])
    labels[:, :10] = -100
    check(student, lambda: method.loss(student, teacher, item, "cpu").loss,
          lambda: token_cross_entropy(logits(student, item.ids), labels), monkeypatch)


@pytest.mark.parametrize("reduction", ["chunk_sum", "mean"])
def test_cd_base_document_chunked_equals_the_authors_chunk_reduction(pair, monkeypatch, reduction):
    student, teacher = pair
    item = CdDocExample("c", ids(12, 5), ids(31, 6))
    method = CdBase(TrainConfig.create(method="cd_base", cd_reduction=reduction, cd_chunk=8, cd_temperature=2.0, kl_chunk_size=CHUNK))

    def reference():
        t = teacher.model(input_ids=torch.tensor([item.context_ids + item.generation_ids]), logits_to_keep=31).logits[0, :-1].detach()
        return chunked_kl(forward_kl_per_position(t, logits(student, item.generation_ids)[0, :-1], 2.0), 8, reduction)

    check(student, lambda: method.loss(student, teacher, item, "cpu").loss, reference, monkeypatch)


def test_cd_base_entity_chunked_equals_the_masked_kl(pair, monkeypatch):
    student, teacher = pair
    definition, sentence = ids(15, 7), ids(20, 8)
    keep = tuple(i >= 6 for i in range(20))
    item = EntityStep("e", 0, definition, TransferSentence("s", sentence, keep), 0)
    method = CdBase(TrainConfig.create(method="cd_base", cd_mode="entity", corpus="unused.jsonl", kl_chunk_size=CHUNK))

    def reference():
        t = teacher.model(input_ids=torch.tensor([definition + sentence]), logits_to_keep=20).logits[0].detach()
        return masked_kl_loss(t, logits(student, sentence)[0], torch.tensor(keep), 2.0)

    check(student, lambda: method.loss(student, teacher, item, "cpu").loss, reference, monkeypatch)


def test_icl_distill_chunked_equals_distill_with_ce(pair, monkeypatch):
    student, teacher = pair
    answer = ids(9, 9)
    item = IclItem("i", ids(25, 10) + answer, ids(6, 11) + answer, 9)
    method = IclDistill(TrainConfig.create(method="icl_distill", corpus="unused.jsonl", icl_ce_weight=0.3, icl_temperature=1.5,
                                           kl_chunk_size=4))

    def reference():
        t = teacher.model(input_ids=torch.tensor([item.teacher_ids]), logits_to_keep=10).logits[0, :-1].detach()
        s = student(input_ids=torch.tensor([item.student_ids]), logits_to_keep=10).logits[0, :-1]
        return distill_with_ce(t, s, torch.ones(9, dtype=torch.bool), torch.tensor(answer), 1.5, 0.3)[0]

    check(student, lambda: method.loss(student, teacher, item, "cpu").loss, reference, monkeypatch)


@pytest.mark.parametrize("tau", [0.0, 0.7])
def test_talr_chunked_equals_talr_loss(pair, monkeypatch, tau):
    from ctxdistill.losses import talr_loss
    from ctxdistill.methods import talr
    from ctxdistill.methods.talr import Talr

    student, teacher = pair
    item = TokenExample("t", ids(35, 12))
    method = Talr(TrainConfig.create(method="talr", talr_tau=tau, kl_chunk_size=CHUNK))
    assert method.loss(student, teacher, item, "cpu").metrics["tau"] == pytest.approx(
        talr_loss(logits(student, item.ids), torch.tensor([item.ids]), tau or None)[1], rel=1e-5)
    check(student, lambda: method.loss(student, teacher, item, "cpu").loss,
          lambda: talr_loss(logits(student, item.ids), torch.tensor([item.ids]), tau or None)[0], monkeypatch)
    monkeypatch.setattr(talr, "plain_lm_head", lambda model: False)  # the dense path is talr_loss itself
    assert_same(value_and_grads(student, lambda: method.loss(student, teacher, item, "cpu").loss),
                value_and_grads(student, lambda: talr_loss(logits(student, item.ids), torch.tensor([item.ids]), tau or None)[0]))


def test_kernels_liger_is_refused_with_one_line_where_it_cannot_run():
    import importlib.util

    from ctxdistill.errors import CtxDistillError

    if torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None:
        pytest.skip("Liger can run here")
    with pytest.raises(CtxDistillError, match="--kernels liger needs"):
        TrainConfig.create(kernels="liger").validate()
    with pytest.raises(CtxDistillError, match="--kernels liger needs"):
        TrainConfig.create(kernels="liger", device="cpu").validate()


def _liger_available() -> bool:
    import importlib.util

    return torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None


liger_only = pytest.mark.skipif(not _liger_available(), reason="Liger's kernels need CUDA and liger-kernel (benchmarks/gpu_suite.sh runs these)")


@liger_only
def test_liger_head_kl_ce_equals_the_chunked_reference_with_per_position_weights():
    from ctxdistill.kernels import liger_head_kl_ce

    torch.manual_seed(0)
    n, hidden, vocab = 300, 64, 1000
    h_s = torch.randn(n, hidden, device="cuda", requires_grad=True)
    h_t = torch.randn(n, hidden, device="cuda")
    head_s = torch.randn(vocab, hidden, device="cuda", requires_grad=True)
    head_t = torch.randn(vocab, hidden, device="cuda")
    targets = torch.randint(0, vocab, (n,), device="cuda")
    groups = torch.randint(0, 7, (n,), device="cuda")  # weights constant per group, as DiSC's per split point
    w_kl, w_ce = (torch.rand(7, device="cuda")[groups] for _ in range(2))
    results = []
    for fn in (chunked_head_kl_ce, liger_head_kl_ce):
        kl, ce = fn(h_s, head_s, targets, w_ce, h_t, head_t, w_kl, 2.0, 64)
        results.append((kl.detach(), ce.detach(), *torch.autograd.grad(kl + ce, (h_s, head_s))))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@liger_only
def test_disc_and_ft_kl_with_liger_equal_the_chunked_path_on_cuda(tokenizer):
    from conftest import NEWS as docs
    import random

    from ctxdistill.inputs.segment import choose_spans, segment_document
    from ctxdistill.methods.disc import Disc, DiscItem

    student = tiny_llama(len(tokenizer)).cuda()
    teacher = perturbed_teacher(student)
    segmented = [segment_document(f"d{i}", text, tokenizer)[0] for i, text in enumerate(docs)]
    items = [DiscItem(d, tuple(choose_spans(d, "sentence_boundary", random.Random(i), num_splits=3))) for i, d in enumerate(segmented)]
    run = lambda kernels: value_and_grads(student, lambda: Disc(TrainConfig.create(kernels=kernels)).batch_loss(student, teacher, items, "cuda").loss)
    assert_same(run("liger"), run("torch"))
    item = TokenExample("d", tuple(segmented[0].token_ids))
    run = lambda kernels: value_and_grads(student, lambda: FineTuneKL(TrainConfig.create(method="ft_kl", kernels=kernels)).loss(
        student, teacher, item, "cuda").loss)
    assert_same(run("liger"), run("torch"))
