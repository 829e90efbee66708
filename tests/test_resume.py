"""Crash safety: checkpoints, SIGKILL/SIGTERM and exact resume, non-finite steps.

Every resumed run is compared with an uninterrupted run of the same settings: fp32 on CPU, the final
weights must be bit-identical (torch.equal), and so must the losses.jsonl records (timings aside).
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ctxdistill.training import checkpoint as ckpt
from ctxdistill.config import TrainConfig
from ctxdistill.errors import CtxDistillError, TrainingInterrupted
from ctxdistill.methods.disc import Disc
from ctxdistill.training import train

from conftest import cli_args, quiet


CHILD = """
import os, signal, sys
import torch
torch.set_num_threads(int(os.environ["TEST_THREADS"]))
from ctxdistill.cli import main
from ctxdistill.training import checkpoint
from ctxdistill.methods.disc import Disc

calls = {"loss": 0, "save": 0}
kill_loss, kill_save = int(os.environ.get("KILL_AT_LOSS", 0)), int(os.environ.get("KILL_AT_SAVE", 0))
loss, save_file = Disc.loss, checkpoint.save_file

def dying_loss(self, *args, **kwargs):
    calls["loss"] += 1
    if calls["loss"] == kill_loss:
        os.kill(os.getpid(), signal.SIGKILL)
    return loss(self, *args, **kwargs)

def dying_save(*args, **kwargs):
    calls["save"] += 1
    out = save_file(*args, **kwargs)
    if calls["save"] == kill_save:  # after one file of the checkpoint is written, before the rename
        os.kill(os.getpid(), signal.SIGKILL)
    return out

Disc.loss = dying_loss
checkpoint.save_file = dying_save
sys.exit(main(sys.argv[1:]))
"""


def settings(model_dir, corpus, **overrides):
    values = dict(method="disc", model=str(model_dir), corpus=str(corpus), device="cpu", precision="fp32", teacher_dtype="fp32",
                  lr=1e-3, seed=0, epochs=2, max_steps=4, checkpoint_every=2, keep_checkpoints=2)
    return values | overrides


def run_child(values, out, **kill):
    env = dict(os.environ, TEST_THREADS=str(torch.get_num_threads()), **{k: str(v) for k, v in kill.items()})
    return subprocess.run([sys.executable, "-c", CHILD, *cli_args(values, out)], env=env, capture_output=True, text=True, timeout=300)


def final_weights(out):
    name = "adapter_model.safetensors" if (out / "model" / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(out / "model" / name)


def records(out):
    return [{k: v for k, v in json.loads(line).items() if k != "elapsed_s"} for line in (out / "losses.jsonl").read_text().splitlines()]


def assert_same_run(a, b):
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), f"{key} differs after resume"
    assert records(a) == records(b)
    ca, cb = (json.loads((p / "run.json").read_text())["counts"] for p in (a, b))
    assert ca == cb


# LoRA with dropout, so that an exact resume also needs the restored torch RNG state
LORA = dict(student="lora", lora_r=4, lora_dropout=0.1, lora_targets="q_proj,v_proj", max_steps=3, checkpoint_every=1)


@pytest.fixture(scope="module")
def lora_reference(tiny_model_dir, corpus4, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref"
    train(TrainConfig.create(out=str(out), **settings(tiny_model_dir, corpus4, **LORA)), progress=False, log=quiet)
    return out


def test_sigkill_mid_training_then_resume_is_bit_identical(tiny_model_dir, corpus4, lora_reference, tmp_path):
    values = settings(tiny_model_dir, corpus4, **LORA)
    out = tmp_path / "killed"
    child = run_child(values, out, KILL_AT_LOSS=3)  # during step 3: steps 1-2 done and checkpointed
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert [p.name for _, p in ckpt.list_checkpoints(out)] == ["step-00000001", "step-00000002"]
    assert not (out / "run.json").exists() and not (out / "model").exists()

    result = train(TrainConfig.create(out=str(out), **values), progress=False, log=quiet)  # auto-resume
    assert result.summary["resumed_from"]["step"] == 2
    assert_same_run(lora_reference, out)


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one_and_resumes_exactly(tiny_model_dir, corpus4, lora_reference, tmp_path):
    values = settings(tiny_model_dir, corpus4, **LORA)
    out = tmp_path / "killed"
    child = run_child(values, out, KILL_AT_SAVE=5)  # checkpoints 1, 2 = saves 1-4; killed inside the one of step 3
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert [p.name for _, p in ckpt.list_checkpoints(out)] == ["step-00000001", "step-00000002"], "earlier checkpoints are intact"
    assert any(p.name.startswith(".tmp-") for p in (out / "checkpoints").iterdir()), "the kill hit the temporary directory"

    args = cli_args(values, out) + ["--resume"]
    from ctxdistill.cli import main

    assert main(args) == 0
    assert not any(p.name.startswith(".tmp-") for p in (out / "checkpoints").iterdir()), "stale temporaries are removed"
    assert_same_run(lora_reference, out)


def test_sigterm_and_sigint_checkpoint_then_resume_exactly(tiny_model_dir, corpus4, lora_reference, tmp_path, monkeypatch):
    values = settings(tiny_model_dir, corpus4, **(LORA | {"checkpoint_every": 0}))
    out = tmp_path / "stopped"
    loss = Disc.loss
    for signum, at_call in ((signal.SIGTERM, 1), (signal.SIGINT, 1)):
        calls = {"n": 0}

        def signalling_loss(self, *args, _signum=signum, _at=at_call, **kwargs):
            calls["n"] += 1
            if calls["n"] == _at:
                os.kill(os.getpid(), _signum)  # the handler only sets a flag; the step finishes
            return loss(self, *args, **kwargs)

        monkeypatch.setattr(Disc, "loss", signalling_loss)
        with pytest.raises(TrainingInterrupted) as stopped:
            train(TrainConfig.create(out=str(out), **values), progress=False, log=quiet)
        assert stopped.value.signum == signum and "rerun the same command to resume" in str(stopped.value)
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [1, 2]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, "handlers are restored"
    monkeypatch.setattr(Disc, "loss", loss)
    train(TrainConfig.create(out=str(out), **values), progress=False, log=quiet)
    assert_same_run(lora_reference, out)


def test_sigterm_through_the_cli_exits_143_with_one_line(tiny_model_dir, corpus4, tmp_path, monkeypatch, capsys):
    from ctxdistill.cli import main

    loss = Disc.loss

    def signalling_loss(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return loss(self, *args, **kwargs)

    monkeypatch.setattr(Disc, "loss", signalling_loss)
    out = tmp_path / "run"
    assert main(cli_args(settings(tiny_model_dir, corpus4), out)) == 128 + signal.SIGTERM
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stopped by SIGTERM after step 1" in err[0]
    assert (out / "checkpoints" / "step-00000001" / "state.json").is_file()


def test_checkpoint_contents_and_only_the_last_k_are_kept(lora_reference):
    found = ckpt.list_checkpoints(lora_reference)
    assert [s for s, _ in found] == [2, 3], "checkpoint_every 1, keep_checkpoints 2, 3 steps"
    last = found[-1][1]
    assert sorted(p.name for p in last.iterdir()) == ["model.safetensors", "optimizer.safetensors", "state.json"]
    state = json.loads((last / "state.json").read_text())
    assert state["step"] == 3 and state["counts"]["steps"] == 3 and len(state["rng"]) == 1
    assert set(state["rng"][0]) >= {"python", "numpy", "torch"}
    assert state["config"]["lr"] == 1e-3 and len(state["fingerprints"]["plans"]) == 2
    optimizer = load_file(last / "optimizer.safetensors")
    assert any(k.endswith("lora_A.default.weight::exp_avg_sq") for k in optimizer)
    weights = load_file(last / "model.safetensors")
    assert weights and all("lora_" in k for k in weights), "under LoRA a checkpoint holds the adapter only"
    final = final_weights(lora_reference)  # PEFT names: no adapter name in the key
    assert len(final) == len(weights)
    for key, value in weights.items():
        assert torch.equal(value, final[key.replace(".default.", ".")])


def test_resume_refuses_changed_settings_changed_corpus_and_finished_runs(tiny_model_dir, corpus4, tmp_path):
    values = settings(tiny_model_dir, corpus4, max_steps=2, checkpoint_every=1)
    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        _interrupt_after_first_step(values, out)
    with pytest.raises(CtxDistillError, match=r"settings differ: lr \(checkpoint: 0.001, now: 0.002\)"):
        train(TrainConfig.create(out=str(out), **(values | {"lr": 2e-3})), progress=False, log=quiet)
    changed = tmp_path / "changed.jsonl"
    changed.write_text(corpus4.read_text().replace("412", "413"), encoding="utf-8")
    with pytest.raises(CtxDistillError, match="corpus or its tokenisation changed"):
        train(TrainConfig.create(out=str(out), **(values | {"corpus": str(changed)})), progress=False, log=quiet)
    with pytest.raises(CtxDistillError, match="drop --no-resume"):
        train(TrainConfig.create(out=str(out), resume=False, **values), progress=False, log=quiet)
    train(TrainConfig.create(out=str(out), **values), progress=False, log=quiet)  # continues and finishes
    with pytest.raises(CtxDistillError, match="holds a finished run"):
        train(TrainConfig.create(out=str(out), **values), progress=False, log=quiet)
    with pytest.raises(CtxDistillError, match="holds no checkpoint"):
        train(TrainConfig.create(out=str(tmp_path / "fresh"), resume=True, **values), progress=False, log=quiet)
    assert not (tmp_path / "fresh").exists(), "a refused run leaves nothing behind"


def _interrupt_after_first_step(values, out):
    loss = Disc.loss

    def signalling_loss(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return loss(self, *args, **kwargs)

    Disc.loss = signalling_loss
    try:
        train(TrainConfig.create(out=str(out), **values), progress=False, log=quiet)
    finally:
        Disc.loss = loss


def test_a_damaged_checkpoint_is_a_clear_error(tiny_model_dir, corpus4, tmp_path):
    values = settings(tiny_model_dir, corpus4, max_steps=2, checkpoint_every=1)
    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        _interrupt_after_first_step(values, out)
    (out / "checkpoints" / "step-00000001" / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CtxDistillError, match="step-00000001 is damaged"):
        train(TrainConfig.create(out=str(out), **values), progress=False, log=quiet)


class NanGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def poison(monkeypatch, bad_doc: str, kind: str, at_epoch_pass: int = 0):
    loss = Disc.loss
    seen = {}

    def poisoned(self, student, teacher, item, *args, **kwargs):
        out = loss(self, student, teacher, item, *args, **kwargs)
        seen[item.doc_id] = seen.get(item.doc_id, -1) + 1
        if item.doc_id == bad_doc and seen[item.doc_id] == at_epoch_pass:
            out = dataclasses.replace(out, loss=out.loss * float("nan") if kind == "loss" else NanGradient.apply(out.loss))
        return out

    monkeypatch.setattr(Disc, "loss", poisoned)


@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_non_finite_step_stops_naming_step_and_document_and_keeps_the_last_good_state(kind, tiny_model_dir, corpus4, lora_reference,
                                                                                     tmp_path, monkeypatch):
    values = settings(tiny_model_dir, corpus4, **(LORA | {"checkpoint_every": 0}))
    bad = "doc-1"  # the document of step 3 under seed 0 (each document once per epoch)
    assert bad not in [d for r in records(lora_reference)[:2] for d in r["documents"]]
    assert records(lora_reference)[2]["documents"] == [bad]

    poison(monkeypatch, bad, kind)
    out = tmp_path / "run"
    with pytest.raises(CtxDistillError, match=f"non-finite {kind} at step 3 .*{bad}.*step 2.*--on-nonfinite skip"):
        train(TrainConfig.create(out=str(out), **values), progress=False, log=quiet)
    [(step, path)] = ckpt.list_checkpoints(out)
    assert step == 2 and not (out / "model").exists() and not (out / "run.json").exists()
    reference = lora_reference / "checkpoints" / "step-00000002"
    for name in ("model.safetensors", "optimizer.safetensors"):
        saved, expected = load_file(path / name), load_file(reference / name)
        assert saved.keys() == expected.keys()
        assert all(torch.equal(saved[k], expected[k]) for k in saved), f"{name}: the saved state is the one before the bad step"


def test_non_finite_steps_can_be_skipped_and_are_counted(tiny_model_dir, corpus4, tmp_path, monkeypatch):
    values = settings(tiny_model_dir, corpus4, max_steps=3, checkpoint_every=0, on_nonfinite="skip")
    poison(monkeypatch, "doc-1", "loss")
    result = train(TrainConfig.create(out=str(tmp_path / "run"), **values), progress=False, log=quiet)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["counts"]["skipped_steps"] == 1 and run["counts"]["optimizer_steps"] == 2 and run["counts"]["steps"] == 3
    assert run["nonfinite_skipped"][0]["documents"] == ["doc-1"]
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


def test_resume_with_a_teacher_cache_checks_the_cache_against_the_initial_weights(tiny_model_dir, corpus4, tmp_path):
    """Full fine-tuning changes every weight; the cache must still be matched to the initial model on resume."""
    from ctxdistill.teachers import cache_teacher

    values = settings(tiny_model_dir, corpus4, max_steps=2, checkpoint_every=1)
    cache_teacher(TrainConfig.create(**values), str(tmp_path / "cache"), k=8, progress=False, log=quiet)
    values["teacher_cache"] = str(tmp_path / "cache")
    with pytest.raises(TrainingInterrupted):
        _interrupt_after_first_step(values, tmp_path / "run")
    result = train(TrainConfig.create(out=str(tmp_path / "run"), **values), progress=False, log=quiet)
    assert result.summary["resumed_from"]["step"] == 1 and result.summary["counts"]["steps"] == 2
