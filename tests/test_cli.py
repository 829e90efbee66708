"""The CLI: help, YAML config with flag overrides, and one clear error line for bad input."""

import json
import subprocess
import sys

import pytest

from ctxdistill.cli import main
from ctxdistill.config import TrainConfig
from ctxdistill.options import build_config
from ctxdistill.errors import CtxDistillError


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "ctxdistill.cli", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_commands_and_options():
    out = run_cli("--help").stdout
    assert "train" in out and "demo" in out
    train_help = run_cli("train", "--help").stdout
    assert "--split-strategy" in train_help and "--teacher-mode" in train_help and "methods and the input" in train_help


def test_yaml_config_then_flags_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: ft\nlr: 3e-5\nepochs: 2\nsplit-strategy: all_sentences\n")
    cfg = build_config(TrainConfig, str(path), {"epochs": 4})
    assert (cfg.method, cfg.lr, cfg.epochs, cfg.disc.split_strategy) == ("ft", 3e-5, 4, "all_sentences")


@pytest.mark.parametrize("yaml_text, message", [
    ("lr: [1\n", "invalid YAML"),
    ("learning_rate: 1e-5\n", "unknown option 'learning_rate'"),
    ("epochs: two\n", "option 'epochs' must be int"),
    ("lr: .nan\n", "lr must be a finite number > 0"),
    ("method: sgd\n", "unknown method 'sgd'"),
    ("- a list\n", "must hold a mapping"),
])
def test_bad_yaml_is_rejected_with_one_clear_line(tmp_path, yaml_text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(CtxDistillError, match=message):
        build_config(TrainConfig, str(path))


@pytest.mark.parametrize("args, message", [
    (["--lr", "0"], "lr must be a finite number > 0"),
    (["--corpus", "/nonexistent/corpus.jsonl"], "corpus /nonexistent/corpus.jsonl does not exist"),
    (["--model", "./no/such/model"], "model path ./no/such/model does not exist"),
    (["--config", "/nonexistent.yaml"], "config file /nonexistent.yaml does not exist"),
])
def test_bad_input_exits_2_with_one_error_line_and_no_output(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    code = main(["train", "--out", str(out), "--quiet", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("ctxdistill: error:") and message in err[0]
    assert not out.exists() or not any(out.iterdir()), "no half-written output"


def test_unknown_option_and_method_exit_2():
    assert run_cli("train", "--no-such-flag").returncode == 2
    result = run_cli("train", "--method", "sgd")
    assert result.returncode == 2 and "invalid choice: 'sgd'" in result.stderr


def test_train_from_cli_writes_a_loadable_model(tiny_model_dir, corpus_file, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    code = main(["train", "--method", "disc", "--model", str(tiny_model_dir), "--corpus", str(corpus_file),
                 "--out", str(out), "--lr", "1e-4", "--max-steps", "2", "--quiet"])
    assert code == 0
    assert json.loads((out / "run.json").read_text())["counts"]["steps"] == 2
    AutoModelForCausalLM.from_pretrained(out / "model")
