"""SDFT (methods/sdft.py) end to end: bad input before any model loads, generated questions for documents,
the training loop, exact resume (EMA and rollout buffer through the method hooks), 2 processes == 1, sharded
engines refused, and the demo's optional `--also sdft`."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ctxdistill.errors import CtxDistillError
from sdft_helpers import RECORDS, loop_train, prepared, quiet, records_file, sdft_config, write_jsonl  # noqa: F401  (records_file: a fixture)


# -- bad input ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("record, message", [
    ({"id": "x", "privileged_context": "Some facts."}, "needs field 'prompt'"),
    ({"id": "x", "prompt": "What happened?"}, "needs field 'privileged_context'"),
    ({"id": "x", "prompt": "What happened?", "privileged_context": "   "}, "'privileged_context' is empty"),
    ({"id": "x", "prompt": "word " * 80, "privileged_context": "Some facts."}, "leaves no room for a completion within max_length 64"),
    ({"id": "x", "prompt": "What happened?", "document_id": "d1"}, "pass the documents with --sdft-documents"),
])
def test_bad_records_fail_before_any_model_loads(tiny_model_dir, tmp_path, monkeypatch, record, message):
    import ctxdistill.models as models
    from ctxdistill.methods.base import get_method

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    corpus = write_jsonl(tmp_path / "bad.jsonl", [RECORDS[1], record])
    with pytest.raises(CtxDistillError, match=message):
        get_method(sdft_config(tiny_model_dir, corpus, max_length=64)).load()


def test_user_questions_about_documents(tiny_model_dir, corpus_file, tokenizer, tmp_path):
    """{prompt, document_id} records: the named document is the privileged context."""
    from conftest import NEWS
    from ctxdistill.methods.base import get_method

    questions = write_jsonl(tmp_path / "q.jsonl", [{"id": "q1", "prompt": "Who runs Quillon Robotics?", "document_id": "doc-1"}])
    method, (example,) = prepared(sdft_config(tiny_model_dir, questions, sdft_documents=str(corpus_file)), tokenizer)
    assert tokenizer.decode(example.teacher_prompt_ids) == "Who runs Quillon Robotics?\n\n" + NEWS[1]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": "q1", "prompt": "Who?", "document_id": "doc-9"}])
    with pytest.raises(CtxDistillError, match="document_id 'doc-9' is not in --sdft-documents"):
        get_method(sdft_config(tiny_model_dir, bad, sdft_documents=str(corpus_file))).load()


def test_contradictory_teacher_options_are_refused(tiny_model_dir, records_file):
    with pytest.raises(CtxDistillError, match="teacher_cache"):  # rollouts are drawn during training: nothing to cache
        sdft_config(tiny_model_dir, records_file, teacher_cache="somewhere")
    with pytest.raises(CtxDistillError, match="sdft_teacher ema is built from the student"):
        sdft_config(tiny_model_dir, records_file, sdft_teacher="ema", teacher_model=str(tiny_model_dir))
    with pytest.raises(CtxDistillError, match="sdft_beta must be in"):
        sdft_config(tiny_model_dir, records_file, sdft_beta=1.5)
    with pytest.raises(CtxDistillError, match="must contain"):
        sdft_config(tiny_model_dir, records_file, sdft_teacher_template="{prompt} only")


def test_bad_record_is_one_line_and_exit_2(tiny_model_dir, tmp_path, capsys):
    try:
        from ctxdistill import cli
    except ImportError as exc:  # the CLI is being ported to the new method contract
        pytest.skip(f"ctxdistill.cli does not import yet: {exc}")
    corpus = write_jsonl(tmp_path / "bad.jsonl", [{"id": "x", "prompt": "What happened?"}])
    code = cli.main(["train", "--method", "sdft", "--model", str(tiny_model_dir), "--corpus", str(corpus), "--out", str(tmp_path / "out"),
                     "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("ctxdistill: error:") and "privileged_context" in err[0]


def test_documents_get_generated_questions(tiny_model_dir, corpus_file, tokenizer, tmp_path):
    from conftest import tiny_llama
    from ctxdistill.methods.base import PrepareContext, get_method

    cfg = sdft_config(tiny_model_dir, corpus_file, sdft_questions_per_document=2, sdft_question_max_tokens=8)
    method = get_method(cfg)
    documents, _ = method.load()
    out = tmp_path / "out"
    out.mkdir()
    prep = method.prepare(documents, PrepareContext(tokenizer, cfg, model=tiny_llama(len(tokenizer)), out_dir=out, progress=False, log=lambda *a: None))
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert prep.generation["sequences"] == 4 and len(rows) == len(prep.examples) > 0
    assert {r["document_id"] for r in rows} <= {"doc-0", "doc-1"}
    example = prep.examples[0]
    assert "Velmora" in tokenizer.decode(example.teacher_prompt_ids) or "Quillon" in tokenizer.decode(example.teacher_prompt_ids)
    assert not any(name in tokenizer.decode(example.prompt_ids) for name in ("Sarn river", "740 people"))


def test_two_steps_through_the_loop(tiny_model_dir, records_file, tmp_path):
    train = loop_train()
    out = tmp_path / "run"
    cfg = sdft_config(tiny_model_dir, records_file, out=str(out), lr=1e-3, max_steps=2, sdft_max_completion_tokens=4)
    result = train(cfg, progress=False, log=quiet)
    steps = [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]
    assert len(steps) == 2 and all(math.isfinite(s["loss"]) for s in steps)
    counts = json.loads((out / "run.json").read_text())["counts"]
    assert counts["sdft_generated_sequences"] == 2 and counts["sdft_generated_tokens"] > 0
    assert all(s["generation_s"] >= 0 for s in steps)  # the rollouts' share of the step time, per step
    timings = json.loads((out / "run.json").read_text())["timings_s"]
    assert 0 < timings["rollouts"] <= timings["train"]  # generation apart, and part of the training time
    assert not any("second" in name or name.endswith("_s") for name in counts)  # counts stay deterministic
    assert result.summary["counts"]["optimizer_steps"] == 2


RESUME_CASES = {  # teacher, student, rollout window, the optimizer step during which SIGTERM arrives
    "base-lora": dict(sdft_teacher="base", student="lora"),
    "ema-lora": dict(sdft_teacher="ema", student="lora"),  # the shadow adapter in method.safetensors
    # the EMA'd frozen copy in method.safetensors, and step 2's rollout (drawn at step 1, with its logprobs for
    # the IS ratio) in state.json method_state
    "ema-full-window": dict(sdft_teacher="ema", student="full", sdft_generate_every=2, stop_during=1),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_draws_the_same_rollouts_and_ends_bit_identical(tiny_model_dir, records_file, tmp_path, monkeypatch, case):
    """SIGTERM during a step (the step finishes and is checkpointed), rerun: the same weights, losses and counts
    as an uninterrupted run (LoRA with dropout, so the restored torch RNG matters too)."""
    import os
    import signal

    from ctxdistill.errors import TrainingInterrupted
    from ctxdistill.methods.sdft import Sdft

    train = loop_train()
    values = dict(lr=1e-3, max_steps=3, checkpoint_every=0, lora_r=4, lora_dropout=0.1, lora_targets="q_proj,v_proj",
                  sdft_max_completion_tokens=4, sdft_ema_rate=0.5, epochs=2) | RESUME_CASES[case]
    stop_during = values.pop("stop_during", 2)
    reference = tmp_path / "reference"
    train(sdft_config(tiny_model_dir, records_file, out=str(reference), **values), progress=False, log=quiet)
    out, original, calls = tmp_path / "stopped", Sdft.batch_loss, {"n": 0}

    def signalling(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == stop_during:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler only sets a flag; the step finishes
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Sdft, "batch_loss", signalling)
    with pytest.raises(TrainingInterrupted):
        train(sdft_config(tiny_model_dir, records_file, out=str(out), **values), progress=False, log=quiet)
    monkeypatch.setattr(Sdft, "batch_loss", original)
    from safetensors.torch import load_file

    (saved,) = (out / "checkpoints").glob("step-*")
    assert bool((saved / "method.safetensors").is_file()) == (values["sdft_teacher"] == "ema")  # the EMA, not rebuilt from the start
    pending = json.loads((saved / "state.json").read_text())["method_state"][0]["rollouts"]
    assert len(pending) == (1 if "sdft_generate_every" in values else 0)  # drawn at step 1, trained on at step 2
    train(sdft_config(tiny_model_dir, records_file, out=str(out), **values), progress=False, log=quiet)

    weights = "adapter_model.safetensors" if values["student"] == "lora" else "model.safetensors"
    a, b = (load_file(p / "model" / weights) for p in (reference, out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = [[{k: v for k, v in json.loads(line).items() if not k.endswith("_s") and k != "elapsed_s"}
              for line in (p / "losses.jsonl").read_text().splitlines()] for p in (reference, out)]
    assert lines[0] == lines[1]
    counts = [json.loads((p / "run.json").read_text())["counts"] for p in (reference, out)]
    # 3 steps: one rollout each, or two windows of 2 steps (the second window is drawn whole at step 3)
    assert counts[0] == counts[1] and counts[0]["sdft_generated_sequences"] == (4 if "sdft_generate_every" in values else 3)


def test_two_processes_equal_one_process_accumulating_two(tiny_model_dir, records_file, tmp_path):
    """torchrun, 2 CPU processes (gloo): each process draws only its own items' rollouts, with the same seeds as
    one process running both, so losses, weights and counts match (as tests/test_distributed.py for DiSC)."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    train = loop_train()
    values = dict(lr=1e-3, docs_per_step=2, checkpoint_every=0, sdft_max_completion_tokens=4)
    train(sdft_config(tiny_model_dir, records_file, out=str(tmp_path / "one"), **values), progress=False, log=quiet)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = dict(method="sdft", model=str(tiny_model_dir), corpus=str(records_file), device="cpu", precision="fp32", teacher_dtype="fp32",
                 seed=0, gen_cache=False, **values)
    args = [a for k, v in flags.items() for a in (f"--{k.replace('_', '-')}", str(v)) if k != "gen_cache"] + ["--no-gen-cache"]
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port", str(port)]
    import ctxdistill

    source = str(Path(ctxdistill.__file__).resolve().parents[1])  # the code under test, whatever PYTHONPATH says relative to cwd
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join([source, os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([*torchrun, "-m", "ctxdistill.cli", "train", "--out", str(tmp_path / "two"), "--quiet", *args],
                            env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [[json.loads(line) for line in (tmp_path / p / "losses.jsonl").read_text().splitlines()] for p in ("one", "two")]
    assert [(s["documents"], s["tokens"]) for s in steps[0]] == [(s["documents"], s["tokens"]) for s in steps[1]]
    torch.testing.assert_close(torch.tensor([s["loss"] for s in steps[1]]), torch.tensor([s["loss"] for s in steps[0]]), rtol=1e-4, atol=1e-6)
    a, b = (load_file(tmp_path / p / "model" / "model.safetensors") for p in ("one", "two"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)
    counts = [json.loads((tmp_path / p / "run.json").read_text())["counts"] for p in ("one", "two")]
    assert counts[0] == counts[1] and counts[0]["sdft_generated_sequences"] == 2, "no process draws another's rollouts"


def test_sharded_engines_are_refused_in_one_line(tiny_model_dir, records_file):
    from types import SimpleNamespace

    from ctxdistill.training.distributed import check_engine_support

    cfg = sdft_config(tiny_model_dir, records_file)
    for mode in ("fsdp", "deepspeed"):
        with pytest.raises(CtxDistillError, match=f"sharded training \\({mode}\\)") as info:
            check_engine_support(cfg, SimpleNamespace(sharded=True, mode=mode))
        assert "\n" not in str(info.value)
    check_engine_support(cfg, SimpleNamespace(sharded=False, mode="data_parallel"))


# -- the demo's optional method -------------------------------------------------------------------------------


def test_demo_also_sdft_builds_the_extra_run(tmp_path, monkeypatch):
    import ctxdistill.experiments.demo as demo

    trained = []
    monkeypatch.setattr(demo, "load_tokenizer", lambda *a, **k: None)
    monkeypatch.setattr(demo, "load_model", lambda *a, **k: torch.nn.Linear(1, 1))
    monkeypatch.setattr(demo, "greedy_responses", lambda *a, **k: [])
    monkeypatch.setattr(demo, "save_responses", lambda *a, **k: None)
    score = {"accuracy": 0.5, "stderr": 0.1, "n": 2, "mean_gold_logprob": -1.0}
    monkeypatch.setattr(demo, "evaluate_model", lambda *a, **k: {"knowledge": score, "general": score, "chat_kl": 0.0})

    def train_then_evaluate(run_cfg, evaluate, log=print):
        trained.append(run_cfg)
        return {"name": run_cfg.method, "train_s": 1.0, "knowledge": score, "general": score, "chat_kl": 0.0}

    monkeypatch.setattr(demo, "train_then_evaluate", train_then_evaluate)
    demo.run_demo(demo.DemoConfig(out=str(tmp_path / "demo"), also="sdft", sdft_lr=2e-5), log=quiet)
    assert [c.method for c in trained] == ["ft", "disc", "sdft"]
    sdft = trained[-1]
    assert (sdft.lr, sdft.epochs, sdft.sdft.sdft_questions_per_document, sdft.sdft.sdft_max_completion_tokens) == (2e-5, 1, 2, 64)
    assert sdft.out == str(tmp_path / "demo" / "sdft") and sdft.corpus == "bundled:news_updates"
    trained.clear()
    (tmp_path / "demo" / "sdft").mkdir()  # what a real --also sdft run leaves: part of an earlier demo, replaced
    demo.run_demo(demo.DemoConfig(out=str(tmp_path / "demo")), log=quiet)
    assert [c.method for c in trained] == ["ft", "disc"] and not (tmp_path / "demo" / "sdft").exists()  # not in the default demo


def test_demo_unknown_extra_method_is_one_line(tmp_path, monkeypatch, capsys):
    import ctxdistill.experiments.demo as demo
    from ctxdistill import cli

    monkeypatch.setattr(demo, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    code = cli.main(["demo", "--also", "sdft,rephrase", "--out", str(tmp_path / "demo")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--also 'rephrase' is not an optional demo method" in err[0]
    assert not (tmp_path / "demo").exists()
