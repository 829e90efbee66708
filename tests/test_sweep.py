"""Sweep: config validation, methods x lrs trained and evaluated on a tiny model, resumable, report at the end."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from ctxdistill.errors import CtxDistillError
from ctxdistill.experiments.sweep import load_sweep_config, run_sweep


def write_config(tmp_path, tiny_model_dir, corpus_file, **extra):
    probes = tmp_path / "probes.jsonl"
    probes.write_text("".join(json.dumps({"id": f"q{i}", "question": f"Who leads Velmora {i}?", "options": ["Anika Dros", "Teodor Vask"],
                                          "answer": 0}) + "\n" for i in range(2)))
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"prompt": "Say hi."}) + "\n")
    config = {"out": str(tmp_path / "sweep"), "model": str(tiny_model_dir), "corpus": str(corpus_file), "probes": str(probes),
              "methods": ["ft", "disc"], "lrs": ["1e-3"], "seeds": [7],
              "train": {"max_steps": 1, "precision": "fp32", "teacher_dtype": "fp32", "max_length": 128},
              "method_overrides": {"disc": {"num_splits": 2}},
              "eval": {"tasks": "knowledge,drift,doc_kl", "mcq_samples": 2, "n_probes": 2, "batch_size": 4, "chat_prompts": str(chat)}}
    config.update(extra)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_sweep_config_errors(tmp_path, tiny_model_dir, corpus_file):
    with pytest.raises(CtxDistillError, match="unknown method"):
        load_sweep_config(str(write_config(tmp_path, tiny_model_dir, corpus_file, methods=["ft", "magic"]))).validate()
    with pytest.raises(CtxDistillError, match="set by the sweep"):
        load_sweep_config(str(write_config(tmp_path, tiny_model_dir, corpus_file, train={"lr": 1.0}))).validate()
    with pytest.raises(CtxDistillError, match="unknown option"):
        load_sweep_config(str(write_config(tmp_path, tiny_model_dir, corpus_file, eval={"no_such_option": 1}))).validate()
    with pytest.raises(CtxDistillError, match="unknown option"):
        load_sweep_config(str(write_config(tmp_path, tiny_model_dir, corpus_file, train={"no_such_option": 1}))).validate()


def test_sweep_trains_evaluates_resumes_and_reports(tmp_path, tiny_model_dir, corpus_file, monkeypatch, short_preset):
    quiet = dict(log=lambda *_: None, progress=False)
    cfg = load_sweep_config(str(write_config(tmp_path, tiny_model_dir, corpus_file)))
    status = run_sweep(cfg, **quiet)
    out = tmp_path / "sweep"
    assert set(status["runs"]) == {"ft_lr0.001_s7", "disc_lr0.001_s7"}
    baseline = json.loads((out / "baseline" / "eval.json").read_text())
    assert baseline["role"] == "baseline" and (out / "baseline" / "reference_responses.jsonl").is_file()
    run = json.loads((out / "runs" / "disc_lr0.001_s7" / "eval.json").read_text())
    assert run["run"]["method"] == "disc" and run["run"]["lr"] == 1e-3 and run["run"]["train_config"]["num_splits"] == 2
    assert run["metrics"]["drift.doc_kl"]["value"] > 0 and "drift.chat_kl" in run["metrics"]
    assert (out / "report.md").is_file() and (out / "frontier.png").is_file() and (out / "kl_vs_drop.png").is_file()

    # Resume: every run is finished, so nothing trains again and the baseline is not re-evaluated.
    import ctxdistill.training

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(ctxdistill.training, "train", no_training)
    status = run_sweep(cfg, **quiet)
    assert set(status["runs"].values()) == {"skipped (finished earlier)"}
    (out / "runs" / "ft_lr0.001_s7" / "eval.json").unlink()  # ...except one whose evaluation is missing
    calls = []
    monkeypatch.setattr(ctxdistill.training, "train", lambda cfg, **kw: calls.append(cfg.out) or (_ for _ in ()).throw(RuntimeError("stop")))
    with pytest.raises(RuntimeError, match="stop"):
        run_sweep(cfg, **quiet)
    assert calls == [str(out / "runs" / "ft_lr0.001_s7")]


def test_each_run_hands_its_memory_back_before_the_next_trains(tmp_path, tiny_model_dir, corpus_file, monkeypatch):
    """One process trains and evaluates run after run; what a finished run freed must leave the process before the
    next run's optimizer state arrives (a Qwen2.5-0.5B sweep otherwise grew by gigabytes per run)."""
    import ctxdistill.training
    from ctxdistill.experiments import runner

    events = []
    train = ctxdistill.training.train
    monkeypatch.setattr(ctxdistill.training, "train", lambda cfg, **kw: (events.append(f"train {cfg.method}"), train(cfg, **kw))[1])
    monkeypatch.setattr(runner, "release_memory", lambda: events.append("release"))
    run_sweep(load_sweep_config(str(write_config(tmp_path, tiny_model_dir, corpus_file, eval={"tasks": "knowledge", "n_probes": 2}))),
              log=lambda *_: None, progress=False)
    assert events == ["train ft", "release", "train disc", "release"]


def test_a_later_shard_trains_before_it_needs_the_baseline_and_waits_while_shard_0_evaluates_it(tmp_path, tiny_model_dir, corpus_file, monkeypatch):
    """Shard 0 evaluates the initial model; shard 1 uses that time to train, and meets the baseline only
    before its first drift score: while shard 0 holds the baseline's lock, it waits and evaluates nothing."""
    import ctxdistill.experiments.runner as runner
    import ctxdistill.training
    from ctxdistill.files import OutputLock

    events = []
    real_train = ctxdistill.training.train

    class Stop(Exception):
        pass

    def train(*args, **kwargs):
        events.append("train")
        return real_train(*args, **kwargs)

    def sleep(seconds):
        events.append("wait")
        raise Stop

    monkeypatch.setattr(ctxdistill.training, "train", train)
    monkeypatch.setattr(runner.time, "sleep", sleep)
    cfg = load_sweep_config(str(write_config(tmp_path, tiny_model_dir, corpus_file, shard="1/2")))
    with OutputLock(tmp_path / "sweep" / "baseline", "baseline directory"):  # "shard 0", evaluating it now
        with pytest.raises(Stop):
            run_sweep(cfg, log=lambda *_: None, progress=False)
    assert events == ["train", "wait"]
    assert not (tmp_path / "sweep" / "baseline" / "eval.json").exists()


def test_a_later_shard_evaluates_the_baseline_itself_when_no_process_is(tmp_path, tiny_model_dir, corpus_file, monkeypatch):
    """Shard 0 busy elsewhere (a one_process domain), stopped or never started: shard 1 does not idle for
    hours; it evaluates the initial model itself once its first run needs the reference replies."""
    import ctxdistill.experiments.runner as runner

    monkeypatch.setattr(runner.time, "sleep", lambda s: (_ for _ in ()).throw(AssertionError("waited with nobody evaluating")))
    logs = []
    cfg = load_sweep_config(str(write_config(tmp_path, tiny_model_dir, corpus_file, shard="1/2")))
    run_sweep(cfg, log=logs.append, progress=False)
    out = tmp_path / "sweep"
    assert json.loads((out / "baseline" / "eval.json").read_text())["role"] == "baseline"
    assert (out / "baseline" / "reference_responses.jsonl").is_file() and not (out / "baseline" / ".ctxdistill.lock").exists()
    first_eval = next(i for i, line in enumerate(logs) if "evaluating the initial model" in line)
    assert any("training" in line for line in logs[:first_eval])  # trained its first run before
    assert all((out / "runs" / name / "eval.json").is_file() for name in json.loads((out / "sweep.shard1of2.json").read_text())["runs"])




def test_a_run_another_process_is_training_is_skipped_not_fought_over(tmp_path, tiny_model_dir, corpus_file):
    """Two processes on the same runs (a second process given another process's shard with `--only`): the
    second leaves a run whose output lock a live process holds, trains the rest, and says which it left."""
    from ctxdistill.files import OutputLock, lock_holder

    cfg = load_sweep_config(str(write_config(tmp_path, tiny_model_dir, corpus_file)))
    busy = tmp_path / "sweep" / "runs" / "ft_lr0.001_s7"
    logs = []
    with OutputLock(busy, "output directory"):
        assert lock_holder(busy) == str(os.getpid())
        status = run_sweep(cfg, log=logs.append, progress=False)
    assert lock_holder(busy) is None  # released, and a dead holder's lock never counts
    assert status["runs"]["ft_lr0.001_s7"] == f"skipped (process {os.getpid()} was running it)"
    assert status["runs"]["disc_lr0.001_s7"] == "finished" and not (busy / "eval.json").exists()
    assert any("ft_lr0.001_s7: process" in line and "skipped" in line for line in logs)
