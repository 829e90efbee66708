"""The shared training loop: steps change weights, outputs reload, bookkeeping is written."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ctxdistill.config import TrainConfig
from ctxdistill.errors import CtxDistillError
from ctxdistill.training.loop import epoch_items, train


def config(tiny_model_dir, corpus_file, out, **overrides):
    values = dict(model=str(tiny_model_dir), corpus=str(corpus_file), out=str(out), lr=1e-3, epochs=1, seed=0)
    return TrainConfig.create(**(values | overrides))


@pytest.mark.parametrize("method", ["disc", "ft"])
def test_one_step_changes_parameters_and_saved_model_reloads(method, tiny_model_dir, corpus_file, tmp_path):
    from transformers import AutoModelForCausalLM

    result = train(config(tiny_model_dir, corpus_file, tmp_path / "run", method=method, max_steps=1), progress=False)
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(tmp_path / "run" / "model" / "model.safetensors")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "one optimizer step must move the weights"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(reloaded(ids).logits, result.model(ids).logits)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["config"]["method"] == method and run["counts"]["steps"] == 1
    assert run["counts"]["student_tokens"] > 0 and run["versions"]["torch"] == torch.__version__
    [line] = (tmp_path / "run" / "losses.jsonl").read_text().splitlines()
    assert json.loads(line)["loss"] > 0


def test_lora_student_trains_only_the_adapter_and_saves_a_peft_adapter(tiny_model_dir, corpus_file, tmp_path):
    from peft import AutoPeftModelForCausalLM

    cfg = config(tiny_model_dir, corpus_file, tmp_path / "run", method="disc", student="lora", lora_r=4, lora_alpha=8,
                 lora_targets="q_proj,v_proj", max_steps=2, merge_lora=True)
    result = train(cfg, progress=False)
    base = load_file(tiny_model_dir / "model.safetensors")
    state = result.model.state_dict()
    lora_b = [v for k, v in state.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b), "LoRA B starts at zero; training must move it"
    for name, value in state.items():
        if "lora_" not in name:
            key = name.replace("base_model.model.", "").replace(".base_layer", "")
            if key in base:
                assert torch.equal(value, base[key]), f"{name} is frozen under LoRA"
    assert (tmp_path / "run" / "model" / "adapter_config.json").is_file()
    merged = (tmp_path / "run" / "merged" / "model.safetensors")
    assert merged.is_file()
    reloaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(reloaded(ids).logits, result.model(ids).logits, rtol=1e-4, atol=1e-5)


def test_lora_teacher_is_the_adapter_disabled_student(tiny_model_dir, corpus_file, tmp_path):
    from ctxdistill.training.loop import build_student
    from ctxdistill.teachers import build_teacher

    cfg = config(tiny_model_dir, corpus_file, tmp_path / "x", student="lora", lora_r=4)
    student = build_student(cfg.validate(), torch.device("cpu"))
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)
    teacher = build_teacher(cfg, student, torch.device("cpu"))
    assert teacher.model is None, "no second copy of the weights"
    ids = torch.tensor([[3, 4, 5, 6]])
    from ctxdistill.models import load_model
    base = load_model(str(tiny_model_dir))
    torch.testing.assert_close(teacher(input_ids=ids).logits, base(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(student(input_ids=ids).logits, base(input_ids=ids).logits)


def test_epoch_plan_depends_only_on_seed_and_epoch(tiny_model_dir, corpus_file, tokenizer):
    from ctxdistill.inputs.corpus import load_corpus
    from ctxdistill.methods import PrepareContext, get_method

    cfg = TrainConfig.create(split_strategy="sentence_boundary", num_splits=2, seed=5).validate()
    method = get_method(cfg)
    docs, _ = load_corpus(str(corpus_file))
    examples = method.prepare(docs, PrepareContext(tokenizer, cfg, progress=False)).examples
    assert epoch_items(method, examples, cfg.seed, 1) == epoch_items(method, examples, cfg.seed, 1)
    plans = [[(i.doc_id, i.spans) for i in epoch_items(method, examples, cfg.seed, e)] for e in range(4)]
    assert len({tuple(p) for p in plans}) > 1, "split points and order are redrawn every epoch"


def test_docs_per_step_and_max_steps(tiny_model_dir, corpus_file, tmp_path):
    result = train(config(tiny_model_dir, corpus_file, tmp_path / "r", method="ft", epochs=3, docs_per_step=2), progress=False)
    assert result.summary["counts"] == result.summary["counts"] | {"steps": 3, "documents": 6}
    result = train(config(tiny_model_dir, corpus_file, tmp_path / "s", method="ft", epochs=3, max_steps=4), progress=False)
    assert result.summary["counts"]["steps"] == 4


def test_existing_output_is_never_overwritten_silently(tiny_model_dir, corpus_file, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(CtxDistillError, match="--overwrite"):
        train(config(tiny_model_dir, corpus_file, out, max_steps=1), progress=False)
    assert (out / "keep.txt").read_text() == "precious"


def test_fp32_training_is_deterministic(tiny_model_dir, corpus_file, tmp_path):
    runs = [train(config(tiny_model_dir, corpus_file, tmp_path / f"r{i}", precision="fp32", teacher_dtype="fp32", max_steps=2,
                         save_model=False), progress=False) for i in range(2)]
    for a, b in zip(runs[0].model.parameters(), runs[1].model.parameters()):
        assert torch.equal(a, b)


def test_teacher_model_loads_another_frozen_model_and_lora_refuses_it(tmp_path, tiny_model_dir, tokenizer):
    """`teacher_model` (continual updates with the original model as teacher) replaces the initial model as teacher."""
    import torch

    from conftest import tiny_llama
    from ctxdistill.config import TrainConfig
    from ctxdistill.errors import CtxDistillError
    from ctxdistill.models import load_model
    from ctxdistill.teachers import build_teacher

    other = tmp_path / "other"
    tiny_llama(len(tokenizer), seed=1).save_pretrained(other)
    tokenizer.save_pretrained(other)
    student = load_model(str(tiny_model_dir), dtype=torch.float32)
    default = build_teacher(TrainConfig.create(model=str(tiny_model_dir), teacher_dtype="fp32"), student, torch.device("cpu"))
    swapped = build_teacher(TrainConfig.create(model=str(tiny_model_dir), teacher_model=str(other), teacher_dtype="fp32"), student, torch.device("cpu"))
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.allclose(default(input_ids=ids).logits, student(input_ids=ids).logits)
    assert not torch.allclose(swapped(input_ids=ids).logits, student(input_ids=ids).logits)
    with pytest.raises(CtxDistillError, match="full fine-tuning only"):
        build_teacher(TrainConfig.create(model=str(tiny_model_dir), teacher_model=str(other), student="lora", method="lora"), student, torch.device("cpu"))


def test_compile_reaches_the_decoder_the_chunked_path_calls(tiny_model_dir, corpus_file, tmp_path, monkeypatch):
    """`--compile` wraps the decoder's forward (what DiSC's chunked LM-head path calls), not only model.forward."""
    from ctxdistill.training.loop import build_student

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compiled.append(fn) or fn)
    student = build_student(config(tiny_model_dir, corpus_file, tmp_path, compile=True).validate(), torch.device("cpu"))
    assert len(compiled) == 1 and compiled[0].__self__ is student.get_decoder()


def test_threads_sets_torch_threads_for_the_run(tiny_model_dir, corpus_file, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "set_num_threads", seen.append)
    train(config(tiny_model_dir, corpus_file, tmp_path / "run", threads=1, max_steps=1), progress=False, log=lambda *a: None)
    assert seen == [1]


@pytest.mark.parametrize("method", ["ft", "disc"])
def test_the_trainer_is_freed_when_train_returns(method, tiny_model_dir, corpus_file, tmp_path, monkeypatch):
    """Its optimizer state, gradients and frozen teacher must not live on into what the caller does next (a
    sweep evaluates the returned model right away, and a full fine-tune's optimizer state is the largest thing in memory)."""
    import weakref

    from ctxdistill.training import loop

    trainers = []
    setup = loop.Trainer.setup
    monkeypatch.setattr(loop.Trainer, "setup", lambda self: (trainers.append(weakref.ref(self)), setup(self))[1])
    result = train(config(tiny_model_dir, corpus_file, tmp_path / "out", method=method, max_steps=1), progress=False, log=lambda *_: None)
    assert trainers and trainers[0]() is None  # no gc.collect() here: train() must have dropped it already
    assert isinstance(result.model, torch.nn.Module)


def test_release_memory_returns_freed_heap_pages_to_the_os():
    """A sweep process trains and evaluates one model after another; with glibc the pages freed between runs
    stayed resident (its RSS grew run by run with a 0.5B model) until they are trimmed. Fresh interpreter:
    the heap's state must not depend on the tests that ran before."""
    import platform
    import subprocess
    import sys

    from ctxdistill.runtime import _glibc

    if platform.system() != "Linux" or _glibc() is None:
        pytest.skip("malloc_trim is glibc's")
    probe = """
import os, torch
from ctxdistill.runtime import release_memory
rss = lambda: int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
big = torch.empty(6 * 2**20); del big  # freeing a 24 MB mapping raises glibc's mmap threshold: what follows is heap
before = rss()
held = [torch.ones(2**19) for _ in range(100)]  # 2 MB each
pin = torch.ones(2**18)  # a live chunk above them: freeing them cannot shrink the heap from its top
grown = rss() - before
del held
freed = rss() - before
release_memory()
print(grown, freed, rss() - before)
"""
    grown, freed, released = map(int, subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split())
    assert grown > 150 * 2**20 and freed > grown // 2, "the probe must leave freed pages resident for this test to mean anything"
    assert released < grown // 4
