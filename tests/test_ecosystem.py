"""The ecosystem's habits (issue 16): LR schedules, trackers, the check during training and its forgetting
budget, model cards, Hub / save_to_disk datasets, safe teachers, launching under accelerate.

All on the tiny random-init Llama (conftest), fp32 on CPU, a few steps each.
"""

import json
import os
import signal
import sys

import pytest
import torch
from safetensors.torch import load_file

from ctxdistill.config import TrainConfig
from ctxdistill.errors import CtxDistillError, TrainingInterrupted
from ctxdistill.training import train

from conftest import NEWS


def quiet(*args, **kwargs):
    pass


def base(model_dir, corpus, **overrides):
    values = dict(method="ft", model=str(model_dir), corpus=str(corpus), device="cpu", precision="fp32", lr=1e-3, seed=0,
                  epochs=3, checkpoint_every=0, threads=1)
    return values | overrides


def losses(out):
    return [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]


def weights(out):
    return load_file(out / "model" / "model.safetensors")


# -- learning-rate schedules --------------------------------------------------------------------------


def test_cosine_with_warmup_resumes_bit_identically(monkeypatch, tiny_model_dir, corpus_file, tmp_path):
    """SIGTERM during step 3 (checkpointed after it), then resume: same weights, same losses, lrs and
    drift checks (the check's reference is rebuilt from the initial weights on resume)."""
    from ctxdistill.methods.ft import FineTune

    values = base(tiny_model_dir, corpus_file, lr_scheduler="cosine", warmup_steps=2,  # 2 documents x 3 epochs = 6 steps
                  eval_every=2, eval_prompts=2, eval_max_new_tokens=6)
    train(TrainConfig.create(out=str(tmp_path / "ref"), **values), progress=False, log=quiet)
    loss, calls = FineTune.loss, {"n": 0}

    def signalling_loss(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss(self, *args, **kwargs)

    monkeypatch.setattr(FineTune, "loss", signalling_loss)
    with pytest.raises(TrainingInterrupted):
        train(TrainConfig.create(out=str(tmp_path / "resumed"), **values), progress=False, log=quiet)
    state = json.loads((tmp_path / "resumed" / "checkpoints" / "step-00000003" / "state.json").read_text())
    assert state["lr_scheduler"]["state"]["last_epoch"] == 3 and state["lr_scheduler"]["total_steps"] == 6
    monkeypatch.setattr(FineTune, "loss", loss)
    resumed = train(TrainConfig.create(out=str(tmp_path / "resumed"), **values), progress=False, log=quiet)
    assert resumed.summary["resumed_from"]["step"] == 3
    ref, res = weights(tmp_path / "ref"), weights(tmp_path / "resumed")
    assert all(torch.equal(ref[k], res[k]) for k in ref), "weights differ after a resume under cosine + warm-up"
    strip = lambda out: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in losses(out)]
    assert strip(tmp_path / "ref") == strip(tmp_path / "resumed")
    assert [r.get("eval_chat_kl") is not None for r in losses(tmp_path / "ref")] == [False, True, False, True, False, True]
    lrs = [r["lr"] for r in losses(tmp_path / "ref")]
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(5e-4) and lrs[2] == pytest.approx(1e-3), "linear warm-up over 2 steps"
    assert lrs[2] > lrs[3] > lrs[4] > lrs[5] > 0, "then the cosine decay"
    # the decay depends on the run's length: resuming with another --max-steps is refused
    cfg = TrainConfig.create(out=str(tmp_path / "other"), **values | {"checkpoint_every": 2, "max_steps": 2, "save_model": False, "eval_every": 0})
    train(cfg, progress=False, log=quiet)
    (tmp_path / "other" / "run.json").unlink()  # as if killed after its checkpoint
    with pytest.raises(CtxDistillError, match="keep --max-steps"):
        train(cfg.replace(max_steps=5), progress=False, log=quiet)


def test_constant_is_the_default_and_logs_its_lr(tiny_model_dir, corpus_file, tmp_path):
    values = base(tiny_model_dir, corpus_file, epochs=1, save_model=False, checkpoint_every=1)
    result = train(TrainConfig.create(out=str(tmp_path / "run"), **values), progress=False, log=quiet)
    assert result.summary["config"]["lr_scheduler"] == "constant"
    assert [r["lr"] for r in losses(tmp_path / "run")] == [1e-3, 1e-3]
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-00000002" / "state.json").read_text())
    assert "lr_scheduler" not in state, "constant builds no scheduler: the default run is unchanged"


@pytest.mark.parametrize("options, message", [
    (dict(lr_scheduler="constant", warmup_steps=5), "has no warm-up"),
    (dict(lr_scheduler="cosine", warmup_ratio=1.5), "warmup_ratio must be in"),
    (dict(lr_scheduler="cosine", warmup_steps=-1), "warmup_steps must be >= 0"),
])
def test_bad_schedule_options_are_one_line(options, message):
    with pytest.raises(CtxDistillError, match=message):
        TrainConfig.create(**options).validate()


# -- experiment trackers --------------------------------------------------------------------------------


def test_tensorboard_event_files_hold_the_logged_losses(tiny_model_dir, corpus_file, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    values = base(tiny_model_dir, corpus_file, method="ft_kl", teacher_dtype="fp32", epochs=1, report_to="tensorboard", save_model=False)
    train(TrainConfig.create(out=str(out), **values), progress=False, log=quiet)
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    scalars = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/ce", "train/kl"} <= set(scalars), scalars
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert logged == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in losses(out)]


def test_a_missing_tracker_names_the_extra_to_install(tiny_model_dir, corpus_file, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(CtxDistillError, match=r"pip install 'ctxdistill\[wandb\]'"):
        train(TrainConfig.create(out=str(tmp_path / "run"), **base(tiny_model_dir, corpus_file, report_to="tensorboard,wandb")),
              progress=False, log=quiet)
    assert not (tmp_path / "run").exists(), "refused before OUT was created"


@pytest.mark.parametrize("value", ["tensorbord", "none,wandb", ""])
def test_bad_report_to_is_one_line(value):
    with pytest.raises(CtxDistillError, match="report_to"):
        TrainConfig.create(report_to=value).validate()


# -- the check during training, the forgetting budget -----------------------------------------------------


def test_eval_every_logs_drift_without_changing_training_and_stop_at_drift_keeps_the_last_good_step(tiny_model_dir, corpus_file, tmp_path):
    values = base(tiny_model_dir, corpus_file, epochs=2, eval_every=1, eval_prompts=3, eval_max_new_tokens=8,
                  eval_probes="bundled:news_updates_probes", eval_probe_limit=4)
    watched = train(TrainConfig.create(out=str(tmp_path / "watched"), **values), progress=False, log=quiet)
    records = losses(tmp_path / "watched")
    drift = [r["eval_chat_kl"] for r in records]
    assert len(drift) == 4 and all("eval_probe_acc" in r for r in records)
    assert 0 < drift[0] < drift[1] < drift[2], drift  # forgetting grows with the steps at this learning rate
    assert [e["chat_kl"] for e in watched.summary["evaluations"]] == drift

    # the check does not move the training: the first 2 steps equal a run without it
    plain = train(TrainConfig.create(out=str(tmp_path / "plain"), **base(tiny_model_dir, corpus_file, max_steps=2)), progress=False, log=quiet)
    assert [r["loss"] for r in losses(tmp_path / "plain")] == [r["loss"] for r in records[:2]]

    # a budget between the drift of step 2 and step 3: stops at 3, saves step 2
    budget = (drift[1] + drift[2]) / 2
    stopped = train(TrainConfig.create(out=str(tmp_path / "budget"), **values | {"stop_at_drift": budget}), progress=False, log=quiet)
    info = json.loads((tmp_path / "budget" / "run.json").read_text())["stopped_at_drift"]
    assert info["step"] == 3 and info["kept_step"] == 2 and info["chat_kl"] == pytest.approx(drift[2]) and "step 2" in info["reason"]
    assert len(losses(tmp_path / "budget")) == 3 and stopped.summary["counts"]["steps"] == 3
    kept, two_steps = weights(tmp_path / "budget"), weights(tmp_path / "plain")
    assert all(torch.equal(kept[k], two_steps[k]) for k in kept), "the saved model is the step-2 checkpoint"
    assert "stopped by the forgetting budget" in (tmp_path / "budget" / "model" / "README.md").read_text()


def test_a_budget_exceeded_at_the_first_check_saves_the_initial_model(tiny_model_dir, corpus_file, tmp_path):
    values = base(tiny_model_dir, corpus_file, eval_every=1, eval_prompts=2, eval_max_new_tokens=6, stop_at_drift=1e-9)
    result = train(TrainConfig.create(out=str(tmp_path / "run"), **values), progress=False, log=quiet)
    assert result.summary["stopped_at_drift"]["kept_step"] == 0
    saved, initial = weights(tmp_path / "run"), load_file(tiny_model_dir / "model.safetensors")
    assert all(torch.equal(saved[k], initial[k]) for k in saved)


@pytest.mark.parametrize("options, message", [
    (dict(stop_at_drift=0.1), "needs --eval-every"),
    (dict(stop_at_drift=0.1, eval_every=3, checkpoint_every=2), "multiple of --eval-every"),
    (dict(stop_at_drift=0.1, eval_every=3, checkpoint_every=10, keep_checkpoints=1), "keep-checkpoints >= 2"),
    (dict(stop_at_drift=0.1, eval_every=5, out=""), "needs --out"),
    (dict(eval_every=-1), "eval_every must be >= 0"),
])
def test_bad_check_options_are_one_line(options, message):
    with pytest.raises(CtxDistillError, match=message):
        TrainConfig.create(**options).validate()


def test_the_default_checkpoint_interval_suits_any_shorter_check_interval():
    TrainConfig.create(stop_at_drift=0.15, eval_every=20).validate()  # 250 is not a multiple of 20: fine with 2 kept


# -- model cards, --push-to-hub ------------------------------------------------------------------------------


@pytest.fixture()
def licensed_model_dir(tiny_model_dir, tmp_path):
    """The tiny model with a card of its own (license: mit), as a base model on disk would have."""
    import shutil

    path = tmp_path / "base-model"
    shutil.copytree(tiny_model_dir, path)
    (path / "README.md").write_text("---\nlicense: mit\n---\n\n# a base model\n", encoding="utf-8")
    return path


def test_every_saved_model_gets_a_hub_model_card_and_eval_adds_its_results(licensed_model_dir, corpus_file, tmp_path, capsys, short_preset):
    from huggingface_hub import ModelCard

    from ctxdistill.cli import main

    out = tmp_path / "lora"
    argv = ["train", "--method", "lora", "--model", str(licensed_model_dir), "--corpus", str(corpus_file), "--out", str(out), "--device", "cpu",
            "--precision", "fp32", "--lr", "1e-3", "--lora-r", "4", "--lora-targets", "q_proj,v_proj", "--merge-lora", "--quiet", "--threads", "1"]
    assert main(argv) == 0
    adapter, merged = ModelCard.load(out / "model" / "README.md"), ModelCard.load(out / "merged" / "README.md")
    assert adapter.data.library_name == "peft" and merged.data.library_name == "transformers"
    assert adapter.data.license == "mit" and {"ctxdistill", "lora"} <= set(adapter.data.tags)
    text = adapter.text
    digest = __import__("hashlib").sha256(corpus_file.read_bytes()).hexdigest()
    assert "by method `lora`" in text and digest in text and "2 documents" in text
    assert "ctxdistill train --method lora" in text and "--merge-lora" in text, "the command line as typed"
    assert "| `lora_r` | `4` |" in text and "| `lr` | `0.001` |" in text and "| `beta2` | `0.999` |" in text
    from ctxdistill import __version__

    assert f"ctxdistill/) {__version__}" in text

    # `ctxdistill eval` on the merged model puts a results table with intervals into its card
    assert main(["eval", "--model", str(out / "merged"), "--tasks", "drift", "--out", str(tmp_path / "eval"), "--device", "cpu",
                 "--threads", "1", "--quiet", "--probes", ""]) == 0
    card = (out / "merged" / "README.md").read_text()
    assert "| `drift.chat_logprob` |" in card and "95 % interval" in card and "No evaluation yet" not in card
    assert ModelCard.load(out / "merged" / "README.md").data.library_name == "transformers", "front matter intact"


def test_a_full_fine_tune_card_from_the_python_api(tiny_model_dir, corpus_file, tmp_path):
    from huggingface_hub import ModelCard

    train(TrainConfig.create(out=str(tmp_path / "ft"), **base(tiny_model_dir, corpus_file, max_steps=1)), progress=False, log=quiet)
    card = ModelCard.load(tmp_path / "ft" / "model" / "README.md")
    assert card.data.library_name == "transformers" and card.data.license is None, "no license is invented"
    assert "equivalent of the Python API call" in card.text and "--max-steps 1" in card.text


def test_push_to_hub_offline_is_refused_in_one_line_before_training(tiny_model_dir, corpus_file, tmp_path, monkeypatch, capsys):
    from ctxdistill.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["train", "--model", str(tiny_model_dir), "--corpus", str(corpus_file), "--out", str(tmp_path / "run"), "--device", "cpu",
            "--push-to-hub", "someone/updated-model", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "HF_HUB_OFFLINE is set" in err[0] and "someone/updated-model" in err[0]
    assert not (tmp_path / "run").exists()
    assert main(argv[:-3] + ["--push-to-hub", "not-a-repo-id"]) == 2
    assert "OWNER/NAME" in capsys.readouterr().err


# -- safe teachers ---------------------------------------------------------------------------------------------


def test_a_teacher_with_another_vocabulary_is_refused_before_training(tiny_model_dir, tokenizer, corpus_file, tmp_path, capsys):
    import shutil

    from conftest import tiny_llama
    from ctxdistill.cli import main

    grown = tmp_path / "teacher-more-tokens"
    shutil.copytree(tiny_model_dir, grown)
    extended = type(tokenizer).from_pretrained(tiny_model_dir)
    extended.add_tokens(["<|new-token|>"])
    extended.save_pretrained(grown)
    wider = tmp_path / "teacher-wider-head"  # same tokenizer, 64 more rows in the LM head (TRL#2215's case)
    tiny_llama(len(tokenizer) + 64).save_pretrained(wider)
    tokenizer.save_pretrained(wider)
    capsys.readouterr()
    for teacher, message in ((grown, f"{len(tokenizer) + 1} vs {len(tokenizer)} tokens"), (wider, "config vocab_size")):
        argv = ["train", "--method", "ft_kl", "--model", str(tiny_model_dir), "--teacher-model", str(teacher), "--corpus", str(corpus_file),
                "--out", str(tmp_path / "run"), "--device", "cpu", "--quiet"]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0] and "--teacher-model" in err[0], err
        assert not (tmp_path / "run").exists(), "refused before OUT was created or any weights loaded"


def test_the_vocabulary_hash_tells_same_sized_vocabularies_apart():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from ctxdistill.teachers import vocabulary_signature

    make = lambda vocab: PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="a")))
    one, same, swapped = make({"a": 0, "b": 1}), make({"a": 0, "b": 1}), make({"a": 1, "b": 0})
    assert vocabulary_signature(one) == vocabulary_signature(same)
    assert vocabulary_signature(one)[0] == vocabulary_signature(swapped)[0] and vocabulary_signature(one) != vocabulary_signature(swapped)


# -- Hub and save_to_disk corpora ----------------------------------------------------------------------------------


def test_a_save_to_disk_corpus_trains_with_its_own_field_names(tiny_model_dir, tmp_path, monkeypatch):
    import datasets

    from ctxdistill.inputs import hub
    from ctxdistill.inputs.corpus import load_corpus

    rows = {"body": NEWS + ["", NEWS[0]], "uid": ["a", "b", "c", "d"], "other": [1, 2, 3, 4]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "saved_dict"))
    monkeypatch.setattr(hub, "BATCH", 3)  # rows arrive in batches, not all at once
    for spec in (tmp_path / "saved", tmp_path / "saved_dict"):
        documents, report = load_corpus(str(spec), text_field="body", id_field="uid")
        assert [d.id for d in documents] == ["a", "b"] and documents[0].text == NEWS[0]
        assert report.read == 4 and dict(report.skipped.items()).keys() == {"empty", "duplicate"}
    with pytest.raises(CtxDistillError, match="no field 'text'"):
        load_corpus(str(tmp_path / "saved"))
    result = train(TrainConfig.create(out=str(tmp_path / "run"), **base(tiny_model_dir, tmp_path / "saved", text_field="body",
                                                                         id_field="uid", max_steps=1, save_model=False)), progress=False, log=quiet)
    assert result.summary["corpus"]["kept"] == 2 and losses(tmp_path / "run")[0]["documents"][0] in ("a", "b")


def test_hub_corpora_go_through_load_dataset_and_name_the_cache_when_offline(monkeypatch, tmp_path):
    import datasets

    from ctxdistill.inputs import hub
    from ctxdistill.inputs.corpus import load_corpus

    calls = []

    def fake_load_dataset(repo, config=None, split=None):
        calls.append((repo, config, split))
        return datasets.Dataset.from_dict({"text": NEWS, "id": ["x", "y"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    documents, _ = load_corpus("hf:someone/news:2026@validation")
    assert calls == [("someone/news", "2026", "validation")] and [d.id for d in documents] == ["x", "y"]
    load_corpus("hf:someone/news")
    assert calls[-1] == ("someone/news", None, "train")

    def offline_load_dataset(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/news' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline_load_dataset)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CtxDistillError, match="offline") as info:
        load_corpus("hf:someone/news")
    assert str(datasets.config.HF_DATASETS_CACHE) in str(info.value)


@pytest.mark.parametrize("spec", ["hf:", "hf:a/b/c", "hf:owner/name:", "hf:owner/name@"])
def test_bad_hub_specs_are_one_line(spec):
    from ctxdistill.inputs.corpus import load_corpus

    with pytest.raises(CtxDistillError, match="hf:OWNER/NAME"):
        load_corpus(spec)


# -- launching ------------------------------------------------------------------------------------------------------


def test_the_accelerate_launch_command_line():
    from ctxdistill.cli import launch_command

    argv = ["train", "--num-processes", "4", "--corpus", "c.jsonl", "--accelerate-config=fsdp2.yaml", "--lr", "1e-5"]
    assert launch_command(argv, 4, None, None) == [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "4",
                                                   "--multi_gpu", "-m", "ctxdistill.cli", "train", "--corpus", "c.jsonl", "--lr", "1e-5"]
    assert launch_command(argv, None, "fsdp2.yaml", 29511)[3:8] == ["--config_file", "fsdp2.yaml", "--main_process_port", "29511", "-m"]


def test_num_processes_two_runs_under_accelerate_on_cpu(tiny_model_dir, corpus_file, tmp_path):
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "two"
    argv = ["train", "--num-processes", "2", "--main-process-port", str(port), "--method", "ft", "--model", str(tiny_model_dir),
            "--corpus", str(corpus_file), "--out", str(out), "--device", "cpu", "--precision", "fp32", "--docs-per-step", "2",
            "--threads", "1", "--quiet"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTXDISTILL_LAUNCHED")}
    result = subprocess.run([sys.executable, "-m", "ctxdistill.cli", *argv], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["processes"] == {"world_size": 2, "mode": "data_parallel"} and run["counts"]["documents"] == 2
    assert "--num-processes 2" in (out / "model" / "README.md").read_text(), "the card shows the command as typed"


def test_bad_launch_values_are_one_line(capsys, tmp_path):
    from ctxdistill.cli import main

    assert main(["train", "--num-processes", "0", "--out", str(tmp_path / "x")]) == 2
    assert "--num-processes must be >= 1" in capsys.readouterr().err
    assert main(["train", "--accelerate-config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_failed_upload_after_training_is_a_warning_recorded_in_run_json(tiny_model_dir, corpus_file, tmp_path, monkeypatch):
    import huggingface_hub

    def no_network(self, *args, **kwargs):
        raise ConnectionError("no route to huggingface.co")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", no_network)
    said = []
    train(TrainConfig.create(out=str(tmp_path / "run"), **base(tiny_model_dir, corpus_file, max_steps=1, push_to_hub="someone/m")),
          progress=False, log=said.append)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["push_to_hub"]["repo"] == "someone/m" and "no route" in run["push_to_hub"]["error"]
    assert any(line.startswith("warning: --push-to-hub someone/m: upload failed") for line in said)
    assert run["model_cards"] == [str(tmp_path / "run" / "model" / "README.md")]
