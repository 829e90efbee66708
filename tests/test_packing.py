"""Padding-free packing (`methods/heads.py: sequence_batch`, DiSC's `packed_teacher_batch`): several sequences in
ONE row with per-segment position ids give the same loss and gradients as right-padded rows (fp32, <= 1e-5), and
no token attends across a segment boundary."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import perturbed_teacher, tiny_llama

from ctxdistill.config import TrainConfig
from ctxdistill.inputs.segment import choose_spans, segment_document
from ctxdistill.methods.disc import Disc, DiscItem
from ctxdistill.methods.ft import FineTune, TokenExample
from ctxdistill.methods.ft_kl import FineTuneKL
from ctxdistill.methods.heads import sequence_batch
from ctxdistill.training.loop import train

VOCAB = 300


def loss_and_grads(student, compute):
    student.zero_grad()
    out = compute()
    out.loss.backward()
    return out.loss.detach(), [p.grad.clone() for p in student.parameters()]


def assert_equal(a, b, rtol=1e-5):
    torch.testing.assert_close(a[0], b[0], rtol=rtol, atol=1e-8)
    for x, y in zip(a[1], b[1]):
        torch.testing.assert_close(x, y, rtol=rtol, atol=1e-7)


def token_items(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [TokenExample(f"d{i}", tuple(torch.randint(0, VOCAB, (n,), generator=g).tolist())) for i, n in enumerate(lengths)]


def test_no_token_attends_across_a_segment_boundary():
    model = tiny_llama(VOCAB)
    items = token_items([9, 14, 6, 11])
    batch = sequence_batch([(i.ids, i.ids) for i in items], 0, "cpu", packed=True, multiple=16)
    assert batch.shape == (1, 48) and batch.inputs["position_ids"][0, :9].tolist() == list(range(9))
    with torch.no_grad():
        base = model(**batch.inputs, use_cache=False).logits[0]  # a KV cache turns the packed-sequence detection off
        for changed, start, n in ((0, 0, 9), (1, 9, 14), (2, 23, 6)):
            ids = batch.inputs["input_ids"].clone()
            ids[0, start : start + n] = (ids[0, start : start + n] + 7) % VOCAB
            logits = model(input_ids=ids, position_ids=batch.inputs["position_ids"], use_cache=False).logits[0]
            others = torch.ones(48, dtype=torch.bool)
            others[start : start + n] = False
            assert not torch.allclose(logits[start : start + n], base[start : start + n])
            assert torch.equal(logits[others], base[others]), f"segment {changed} leaked into another segment"
        # each segment's logits are those of the sequence run alone
        alone = model(input_ids=torch.tensor([items[1].ids])).logits[0]
        torch.testing.assert_close(base[9:23], alone, rtol=1e-5, atol=1e-6)


def test_ft_packed_equals_padded_equals_mean_of_single_items():
    student = tiny_llama(VOCAB)
    items = token_items([17, 40, 8, 25], seed=1)
    teacher = perturbed_teacher(student)
    run = lambda packing, multiple=0: lambda: FineTune(TrainConfig.create(packing=packing, pad_to_multiple=multiple, kl_chunk_size=16)
                                                       ).batch_loss(student, teacher, items, "cpu")
    packed = loss_and_grads(student, run("on", 32))
    assert_equal(packed, loss_and_grads(student, run("off")))
    assert_equal(packed, loss_and_grads(student, run("auto")))
    method = FineTune(TrainConfig.create())
    student.zero_grad()
    separate = sum(method.loss(student, teacher, i, "cpu").loss for i in items) / len(items)
    separate.backward()
    assert_equal(packed, (separate.detach(), [p.grad.clone() for p in student.parameters()]))


def test_ft_kl_packed_equals_padded():
    student = tiny_llama(VOCAB)
    items = token_items([30, 12, 21], seed=2)
    teacher = perturbed_teacher(student)
    run = lambda packing: lambda: FineTuneKL(TrainConfig.create(method="ft_kl", packing=packing, kl_beta=0.5, kl_chunk_size=16)
                                             ).batch_loss(student, teacher, items, "cpu")
    assert_equal(loss_and_grads(student, run("on")), loss_and_grads(student, run("off")))


@pytest.mark.parametrize("disc_positions", ["all", "context"])
def test_disc_packed_equals_padded(tiny_model, tokenizer, disc_positions):
    from conftest import NEWS as docs

    segmented = [segment_document(f"d{i}", text, tokenizer)[0] for i, text in enumerate(docs)]
    items = [DiscItem(d, tuple(choose_spans(d, "token_random_variable_suffix", random.Random(i), num_splits=3, suffix_tokens=0)))
             for i, d in enumerate(segmented)]
    teacher = perturbed_teacher(tiny_model)
    options = dict(disc_positions=disc_positions, context_kl_threshold=0.0 if disc_positions == "context" else 0.05, kl_chunk_size=64)
    run = lambda packing, multiple=0: lambda: Disc(TrainConfig.create(packing=packing, pad_to_multiple=multiple, **options)
                                                   ).batch_loss(tiny_model, teacher, items, "cpu")
    packed = loss_and_grads(tiny_model, run("on", 64))
    assert_equal(packed, loss_and_grads(tiny_model, run("off")))
    one_doc = lambda packing: lambda: Disc(TrainConfig.create(packing=packing, **options)).loss(tiny_model, teacher, items[0], "cpu")
    assert_equal(loss_and_grads(tiny_model, one_doc("on")), loss_and_grads(tiny_model, one_doc("off")))


def test_ft_training_with_packed_documents_equals_one_document_per_pass(tiny_model_dir, corpus_file, tmp_path):
    common = dict(method="ft", model=str(tiny_model_dir), corpus=str(corpus_file), lr=1e-3, epochs=1, docs_per_step=2, seed=0,
                  precision="fp32", save_model=False)
    packed = train(TrainConfig.create(**common, out=str(tmp_path / "packed"), packing="on", pad_to_multiple=8), progress=False)
    single = train(TrainConfig.create(**common, out=str(tmp_path / "single"), batch_tokens=0), progress=False)
    for a, b in zip(packed.model.parameters(), single.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    run = json.loads((tmp_path / "packed" / "run.json").read_text())
    assert run["packing"]["packed"] and run["packing"]["attention"] in ("sdpa", "eager", "flash_attention_2", "flex_attention")
    assert run["packing"]["distinct_pass_shapes"] == 1 and run["packing"]["pad_to_multiple"] == 8


def test_packing_auto_packs_with_varlen_attention_and_for_disc_on_cuda(monkeypatch):
    from ctxdistill.methods import heads
    from ctxdistill.methods.heads import packing_on

    model = tiny_llama(VOCAB)
    assert model.config._attn_implementation == "sdpa"
    assert not packing_on(TrainConfig.create(), model) and packing_on(TrainConfig.create(packing="on"), model)
    assert not packing_on(TrainConfig.create(), model, 2048), "on CPU auto keeps DiSC's padded passes (no faster packed)"
    monkeypatch.setattr(heads, "next", lambda params: type("P", (), {"device": torch.device("cuda")})(), raising=False)
    assert packing_on(TrainConfig.create(), model, 2048) and not packing_on(TrainConfig.create(), model, 2049)  # DiSC's passes on CUDA
    monkeypatch.undo()
    model._ctxdistill_attention = "flash_attention_2"  # what models.choose_attention sets on CUDA with flash-attn installed
    assert packing_on(TrainConfig.create(), model) and not packing_on(TrainConfig.create(packing="off"), model)
