"""Paths that must agree: each fast or alternative path against its reference, on the code training calls.

- the batched teacher pass training runs (`teacher_batch`) == the authors' one pass per split point;
- DiSC's dense-logits path (sharded students, soft-capped heads) == the chunked LM-head path;
- a merged LoRA model == the base model with its adapter;
- resume == uninterrupted across an epoch boundary (full fine-tune) and for a method that generates text.
"""

import json
import os
import random
import signal

import pytest
import torch

from ctxdistill.config import TrainConfig
from ctxdistill.errors import TrainingInterrupted
from ctxdistill.methods import PrepareContext
from ctxdistill.methods.disc import Disc, DiscItem, per_split_teacher_logits, teacher_batch
from ctxdistill.models import mark_sharded
from ctxdistill.teachers import Teacher
from ctxdistill.training import train

from conftest import NEWS, tiny_llama


def quiet(*args, **kwargs):
    pass


@pytest.fixture()
def items(tokenizer):
    from ctxdistill.inputs.corpus import Document

    cfg = TrainConfig.create(num_splits=3)
    method = Disc(cfg)
    examples = method.prepare([Document(f"d{i}", t) for i, t in enumerate(NEWS)], PrepareContext(tokenizer, cfg)).examples
    rng = random.Random(0)
    return [item for example in examples for item in method.plan(example, rng)]


def test_the_batched_teacher_pass_training_runs_equals_one_pass_per_split(tokenizer, items):
    teacher = tiny_llama(len(tokenizer), seed=1)
    batch = teacher_batch(items, pad_id=0, device="cpu")
    with torch.no_grad():
        logits = teacher(input_ids=batch.input_ids, attention_mask=batch.attention, logits_to_keep=batch.keep).logits
        gathered = logits.reshape(-1, logits.shape[-1])[batch.rows]
        reference = torch.cat([per_split_teacher_logits(teacher, i.doc.token_ids, i.spans, "cpu") for i in items])
    assert gathered.shape == reference.shape
    torch.testing.assert_close(gathered, reference, rtol=1e-4, atol=1e-5)


def loss_and_grads(student, teacher, items, cfg):
    student.zero_grad()
    out = Disc(cfg).batch_loss(student, teacher, items, "cpu")
    out.loss.backward()
    return out.loss.detach(), [p.grad.clone() for p in student.parameters() if p.grad is not None]


def test_the_dense_logits_path_equals_the_chunked_lm_head_path(tokenizer, items):
    student, teacher = tiny_llama(len(tokenizer), seed=0), Teacher(model=tiny_llama(len(tokenizer), seed=1))
    cfg = TrainConfig.create(kl_chunk_size=16)
    chunked, chunked_grads = loss_and_grads(student, teacher, items, cfg)
    mark_sharded(student)  # what FSDP / DeepSpeed students are: the head is not read directly, logits come from forward
    try:
        dense, dense_grads = loss_and_grads(student, teacher, items, cfg)
    finally:
        del student._ctxdistill_sharded
    torch.testing.assert_close(dense, chunked, rtol=1e-5, atol=1e-6)
    assert len(dense_grads) == len(chunked_grads)
    for d, c in zip(dense_grads, chunked_grads):
        torch.testing.assert_close(d, c, rtol=1e-4, atol=1e-6)


def test_a_merged_lora_model_equals_base_plus_adapter(tiny_model_dir, corpus_file, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = TrainConfig.create(method="lora", model=str(tiny_model_dir), corpus=str(corpus_file), out=str(tmp_path / "run"), device="cpu",
                             precision="fp32", lr=1e-2, max_steps=2, lora_r=4, lora_dropout=0.0, merge_lora=True)
    result = train(cfg, progress=False, log=quiet)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "merged").eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        adapted = result.model.eval()(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(ids).logits
        torch.testing.assert_close(merged(ids).logits, adapted, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(adapted, base), "the adapter changed the model, so the comparison means something"


def run_stopped_then_resumed(monkeypatch, method_cls, values, out, stop_at_call: int):
    """SIGTERM during the `stop_at_call`-th loss call (the step finishes and is checkpointed), then resume."""
    loss = method_cls.loss
    calls = {"n": 0}

    def signalling_loss(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == stop_at_call:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss(self, *args, **kwargs)

    monkeypatch.setattr(method_cls, "loss", signalling_loss)
    with pytest.raises(TrainingInterrupted):
        train(TrainConfig.create(out=str(out), **values), progress=False, log=quiet)
    monkeypatch.setattr(method_cls, "loss", loss)
    return train(TrainConfig.create(out=str(out), **values), progress=False, log=quiet)


def assert_same_run(a, b):
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), "weights differ after resume"
    strip = lambda p: [{k: v for k, v in json.loads(line).items() if k != "elapsed_s"} for line in (p / "losses.jsonl").read_text().splitlines()]
    assert strip(a) == strip(b)


def test_resume_of_a_full_fine_tune_across_an_epoch_boundary_is_bit_identical(monkeypatch, tiny_model_dir, corpus_file, tmp_path):
    values = dict(method="disc", model=str(tiny_model_dir), corpus=str(corpus_file), device="cpu", precision="fp32", teacher_dtype="fp32",
                  lr=1e-3, seed=0, epochs=3, checkpoint_every=0)  # 2 documents: steps 1-2 are epoch 1, 3-4 epoch 2, ...
    train(TrainConfig.create(out=str(tmp_path / "ref"), **values), progress=False, log=quiet)
    resumed = run_stopped_then_resumed(monkeypatch, Disc, values, tmp_path / "resumed", stop_at_call=1)
    assert resumed.summary["resumed_from"]["step"] == 1 and resumed.summary["counts"]["steps"] == 6
    assert resumed.summary["config"]["student"] == "full"
    assert_same_run(tmp_path / "ref", tmp_path / "resumed")


def test_resume_of_a_method_that_generates_text_is_bit_identical(monkeypatch, tiny_model_dir, corpus_file, tmp_path):
    from ctxdistill.methods.ft import FineTune

    values = dict(method="rephrase", model=str(tiny_model_dir), corpus=str(corpus_file), device="cpu", precision="fp32", lr=1e-3, seed=0,
                  epochs=2, checkpoint_every=0, rephrase_max_new_tokens=12, gen_cache=False)
    ref = train(TrainConfig.create(out=str(tmp_path / "ref"), **values), progress=False, log=quiet)
    assert ref.summary["generation"]["sequences"] == 2
    resumed = run_stopped_then_resumed(monkeypatch, FineTune, values, tmp_path / "resumed", stop_at_call=2)
    assert resumed.summary["resumed_from"]["step"] == 2
    assert (tmp_path / "ref" / "generations.jsonl").read_text() == (tmp_path / "resumed" / "generations.jsonl").read_text()
    assert_same_run(tmp_path / "ref", tmp_path / "resumed")
