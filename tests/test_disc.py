"""DiSC's loss: one teacher pass == the authors' per-split passes; batched student == one suffix at a time."""

import copy
import random

import pytest
import torch

from ctxdistill.config import TrainConfig
from ctxdistill.methods import PrepareContext
from ctxdistill.methods.disc import Disc, DiscItem, per_split_teacher_logits, single_pass_teacher_logits
from ctxdistill.teachers import Teacher
from ctxdistill.inputs.segment import choose_spans, segment_document

from conftest import NEWS


@pytest.fixture()
def doc(tokenizer):
    [segmented] = segment_document("news", NEWS[0], tokenizer)
    return segmented


def test_single_teacher_pass_equals_per_split_passes(tiny_model, doc):
    spans = choose_spans(doc, "all_sentences", random.Random(0))
    assert len(spans) == 4
    with torch.no_grad():
        one = single_pass_teacher_logits(tiny_model, doc.token_ids, spans, "cpu")
        each = per_split_teacher_logits(tiny_model, doc.token_ids, spans, "cpu")
    assert one.shape == each.shape == (sum(e - s - 1 for s, e in spans), tiny_model.config.vocab_size)
    torch.testing.assert_close(one, each, rtol=0, atol=1e-5)


def test_overlapping_spans_reuse_teacher_positions(tiny_model, doc):
    spans = choose_spans(doc, "token_random_variable_suffix", random.Random(0), num_splits=4, suffix_tokens=0)
    assert len(spans) == 4 and all(e == len(doc.token_ids) for _, e in spans), "every suffix runs to the end: they overlap"
    with torch.no_grad():
        torch.testing.assert_close(single_pass_teacher_logits(tiny_model, doc.token_ids, spans, "cpu"),
                                   per_split_teacher_logits(tiny_model, doc.token_ids, spans, "cpu"), rtol=0, atol=1e-5)


def loss_and_grads(student, teacher, item, mode):
    cfg = TrainConfig.create(teacher_mode=mode, temperature=2.0)
    student.zero_grad()
    out = Disc(cfg).loss(student, teacher, item, "cpu")
    out.loss.backward()
    return out.loss.detach(), [p.grad.clone() for p in student.parameters()], out


def test_default_mode_matches_the_authors_reference_loss_and_gradient(tiny_model, tokenizer, doc):
    teacher = Teacher(model=copy.deepcopy(tiny_model))
    student = tiny_model.train()
    with torch.no_grad():  # move the student away from the teacher so the loss is not zero
        for p in student.parameters():
            p.add_(0.02 * torch.randn_like(p))
    item = DiscItem(doc, tuple(choose_spans(doc, "sentence_boundary", random.Random(3), num_splits=3)))
    fast_loss, fast_grads, out = loss_and_grads(student, teacher, item, "single_pass")
    ref_loss, ref_grads, _ = loss_and_grads(student, teacher, item, "per_split")
    assert fast_loss.item() > 0
    torch.testing.assert_close(fast_loss, ref_loss, rtol=1e-5, atol=1e-7)
    for a, b in zip(fast_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert (out.student_tokens, out.teacher_tokens) == (item.student_tokens, item.teacher_tokens)
    assert out.counts == {} and out.metrics == {}


def test_loss_equals_a_direct_computation_over_the_full_vocabulary(tiny_model, doc):
    teacher_model = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for p in teacher_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    spans = tuple(choose_spans(doc, "all_sentences", random.Random(0))[:2])
    item = DiscItem(doc, spans)
    loss = Disc(TrainConfig.create(temperature=2.0)).loss(tiny_model, Teacher(model=teacher_model), item, "cpu").loss
    ids = doc.token_ids
    per_split = []
    with torch.no_grad():
        for s, e in spans:
            t = teacher_model(torch.tensor([ids[:e]])).logits[0, s : e - 1] / 2.0
            st = tiny_model(torch.tensor([ids[s:e]])).logits[0, : e - s - 1] / 2.0
            p_t = torch.softmax(t, -1)
            kl = (p_t * (torch.log_softmax(t, -1) - torch.log_softmax(st, -1))).sum(-1) * 4.0
            per_split.append(kl.mean())
    torch.testing.assert_close(loss.detach(), torch.stack(per_split).mean(), rtol=1e-5, atol=1e-7)


def test_zero_length_prefix_gives_zero_loss_and_zero_gradient(tiny_model, doc):
    """With no context the teacher sees what the student sees: nothing to distil."""
    teacher = Teacher(model=copy.deepcopy(tiny_model))
    student = tiny_model.train()
    item = DiscItem(doc, ((0, 8),))
    loss, grads, _ = loss_and_grads(student, teacher, item, "single_pass")
    assert abs(loss.item()) < 1e-6
    assert max(g.abs().max().item() for g in grads) < 1e-6


def test_one_sentence_documents_are_skipped_and_reported(tokenizer):
    from ctxdistill.inputs.corpus import Document

    cfg = TrainConfig.create()
    prepared = Disc(cfg).prepare([Document("one", "Just one sentence here."), Document("two", NEWS[1])], PrepareContext(tokenizer, cfg, progress=False))
    assert [d.doc_id for d in prepared.examples] == ["two"]
    assert prepared.skipped["one-sentence (DiSC needs >= 2)"] == ["one"]
