"""Bad input never loses work: one clear error line, exit code 2, no traceback (unless --debug), no partial output.

Cases covered elsewhere and not repeated here: missing corpus, lr 0, missing model path, missing
config file (tests/test_cli.py, through `main`); unknown method/flag (tests/test_cli.py, subprocess);
bad YAML values at the config level (tests/test_cli.py); HF id without network and GGUF checksum
mismatch (tests/test_models.py); probe file schema (tests/test_eval_suite.py); corpus parsing details
(tests/test_corpus.py); existing output directory without --overwrite (tests/test_train.py).
"""

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

from ctxdistill.training import checkpoint as ckpt
from ctxdistill.cli import main
from ctxdistill.errors import CtxDistillError

from conftest import NEWS


def run_main(capsys, *args):
    code = main(list(args))
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def assert_one_line_error(code, err, message):
    assert code == 2
    assert len(err) == 1, err
    assert err[0].startswith("ctxdistill: error:") and message in err[0], err[0]
    assert "Traceback" not in err[0]


def assert_no_output(out: Path):
    assert not out.exists() or not any(out.iterdir()), f"partial output: {list(out.iterdir())}"


def write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


ONE_SENTENCE = "".join(json.dumps({"id": f"s{i}", "text": f"Velmora opened bridge number {i} over the river Sarn today."}) + "\n" for i in range(3))

CORPUS_CASES = {
    "empty corpus": ("\n\n", "the corpus is empty"),
    "line that is not JSON": ('{"text": "Velmora opened a bridge. It is long."}\n{not json}\n', "corpus.jsonl:2: not valid JSON"),
    "missing text field": ('{"body": "Velmora opened a bridge. It is long."}\n', "no field 'text'"),
    "non-UTF-8 bytes only": (b'{"text": "caf\xe9 au lait in Velmora. It is good."}\n', "non-UTF-8"),
    "one-sentence documents only (DiSC needs two)": (ONE_SENTENCE, "no document is usable by disc"),
}


@pytest.mark.parametrize("case", list(CORPUS_CASES))
def test_bad_corpus(case, tiny_model_dir, tmp_path, capsys):
    content, message = CORPUS_CASES[case]
    corpus = write(tmp_path / "corpus.jsonl", content)
    out = tmp_path / "out"
    code, err = run_main(capsys, "train", "--model", str(tiny_model_dir), "--corpus", str(corpus), "--out", str(out), "--quiet")
    assert_one_line_error(code, err, message)
    assert_no_output(out)


def test_unreadable_corpus(tiny_model_dir, corpus_file, tmp_path, capsys, monkeypatch):
    path_open = Path.open

    def forbidden(self, *args, **kwargs):  # chmod 000 does not stop root, so the refusal is simulated
        if self == corpus_file:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return path_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", forbidden)
    out = tmp_path / "out"
    code, err = run_main(capsys, "train", "--model", str(tiny_model_dir), "--corpus", str(corpus_file), "--out", str(out), "--quiet")
    assert_one_line_error(code, err, "cannot read")
    assert "Permission denied" in err[0]
    assert_no_output(out)


@pytest.mark.parametrize("yaml_text, message", [
    ("lr: [1\n", "invalid YAML"),
    ("epochs: two\n", "option 'epochs' must be int"),
])
def test_bad_yaml_through_the_cli(yaml_text, message, tiny_model_dir, corpus_file, tmp_path, capsys):
    config = write(tmp_path / "run.yaml", yaml_text)
    out = tmp_path / "out"
    code, err = run_main(capsys, "train", "--config", str(config), "--model", str(tiny_model_dir), "--corpus", str(corpus_file),
                         "--out", str(out), "--quiet")
    assert_one_line_error(code, err, message)
    assert_no_output(out)


@pytest.mark.parametrize("args, message", [
    (["--lr", "nan"], "lr must be a finite number > 0"),
    (["--lr=-1e-5"], "lr must be a finite number > 0"),
    (["--keep-checkpoints", "0"], "keep_checkpoints must be >= 1"),
    (["--resume", "--overwrite"], "contradict"),
])
def test_bad_values(args, message, tiny_model_dir, corpus_file, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_main(capsys, "train", "--model", str(tiny_model_dir), "--corpus", str(corpus_file), "--out", str(out), "--quiet", *args)
    assert_one_line_error(code, err, message)
    assert_no_output(out)


def test_unknown_flag_and_method_are_one_line(capsys):
    for args, message in ((["train", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
                          (["train", "--method", "sgd"], "invalid choice: 'sgd'")):
        with pytest.raises(SystemExit) as exited:
            main(args)
        err = capsys.readouterr().err.strip().splitlines()
        assert exited.value.code == 2 and len(err) == 1 and message in err[0] and err[0].startswith("ctxdistill: error:")


def test_tokenizer_without_chat_template_where_one_is_needed(tiny_model_dir, corpus_file, tmp_path, capsys):
    plain = tmp_path / "plain-model"
    shutil.copytree(tiny_model_dir, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    code, err = run_main(capsys, "train", "--method", "rephrase", "--model", str(plain), "--corpus", str(corpus_file), "--out", str(out),
                         "--quiet", "--no-gen-cache")
    assert_one_line_error(code, err, "chat template")
    assert_no_output(out)


def test_debug_shows_the_traceback(tiny_model_dir, tmp_path):
    with pytest.raises(CtxDistillError, match="does not exist"):
        main(["train", "--model", str(tiny_model_dir), "--corpus", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o"), "--debug"])


def test_overwrite_refuses_the_current_directory(tiny_model_dir, corpus_file, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "precious.txt").write_text("keep me")
    code, err = run_main(capsys, "train", "--model", str(tiny_model_dir), "--corpus", str(corpus_file), "--out", ".", "--overwrite", "--quiet")
    assert_one_line_error(code, err, "current directory")
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_writes_are_confined_to_the_output_directory(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoints").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(CtxDistillError, match="outside the output directory"):
        ckpt.confined(out, "checkpoints", "step-00000001")
    assert ckpt.confined(out, "model") == out.resolve() / "model"


def _train_args(tiny_model_dir, corpus_file, out, *extra):
    return ["train", "--model", str(tiny_model_dir), "--corpus", str(corpus_file), "--out", str(out), "--quiet", "--device", "cpu",
            "--precision", "fp32", "--lr", "1e-3", "--epochs", "2", "--max-steps", "3", "--checkpoint-every", "1", *extra]


def test_disk_full_while_writing_a_checkpoint_keeps_the_previous_one(tiny_model_dir, corpus_file, tmp_path, capsys, monkeypatch):
    save_file, calls = ckpt.save_file, {"n": 0}

    def full_disk(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # the first file of the second checkpoint
            raise OSError(errno.ENOSPC, "No space left on device")
        return save_file(*args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    out = tmp_path / "out"
    args = _train_args(tiny_model_dir, corpus_file, out, "--max-steps", "2")
    code, err = run_main(capsys, *args)
    assert_one_line_error(code, err, "cannot write checkpoint for step 2")
    assert "No space left on device" in err[0] and "step-00000001 is intact" in err[0] and "rerun the same command" in err[0]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000001"], "no temporary directory left"
    assert not (out / "model").exists() and not (out / "run.json").exists()

    monkeypatch.setattr(ckpt, "save_file", save_file)  # space freed: the same command resumes and finishes
    code, err = run_main(capsys, *args)
    assert code == 0
    run = json.loads((out / "run.json").read_text())
    assert run["resumed_from"]["step"] == 1 and run["counts"]["steps"] == 2


def test_disk_full_while_saving_the_model_keeps_the_checkpoints(tiny_model_dir, corpus_file, tmp_path, capsys, monkeypatch):
    from transformers import PreTrainedModel

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    out = tmp_path / "out"
    code, err = run_main(capsys, *_train_args(tiny_model_dir, corpus_file, out, "--max-steps", "1"))
    assert_one_line_error(code, err, "cannot write the trained model")
    assert "No space left on device" in err[0]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "losses.jsonl"], "no half-written model, no run.json"
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [1]


def test_one_sentence_documents_are_skipped_and_counted_when_others_remain(tiny_model_dir, tmp_path):
    from ctxdistill.config import TrainConfig
    from ctxdistill.training import train

    corpus = write(tmp_path / "mixed.jsonl", ONE_SENTENCE + json.dumps({"id": "long", "text": NEWS[0]}) + "\n")
    train(TrainConfig.create(model=str(tiny_model_dir), corpus=str(corpus), out=str(tmp_path / "run"), max_steps=1, save_model=False,
                      checkpoint_every=0), progress=False, log=lambda *a: None)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["corpus"]["skipped_by_method"] == {"one-sentence (DiSC needs >= 2)": 3}
    assert run["corpus"]["examples"] == 1


def test_a_document_longer_than_the_context_is_windowed_not_truncated(tiny_model_dir, tmp_path):
    from ctxdistill.config import TrainConfig
    from ctxdistill.training import train

    corpus = write(tmp_path / "long.jsonl", json.dumps({"id": "long", "text": " ".join(NEWS)}) + "\n")
    train(TrainConfig.create(model=str(tiny_model_dir), corpus=str(corpus), out=str(tmp_path / "run"), max_length=48, epochs=1,
                      save_model=False, checkpoint_every=0, split_strategy="all_sentences"), progress=False, log=lambda *a: None)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    documents = [d for line in (tmp_path / "run" / "losses.jsonl").read_text().splitlines() for d in json.loads(line)["documents"]]
    assert run["corpus"]["kept"] == 1 and run["corpus"]["examples"] >= 3
    assert sorted(documents) == [f"long#w{i}" for i in range(run["corpus"]["examples"])], "every window is trained"


# --- Loaders: corpus lines, weight files, LoRA targets, sandbox limits ----------------------------------
# Each case builds its input under tmp_path and returns the command line; every one must give exactly one
# `ctxdistill: error:` line, exit 2, and leave --out absent.

def _model_copy(tiny_model_dir, tmp_path, name):
    copy = tmp_path / name
    shutil.copytree(tiny_model_dir, copy)
    return copy


def truncated_weights(tiny_model_dir, tmp_path):
    model = _model_copy(tiny_model_dir, tmp_path, "truncated-model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return model


def pickle_only_weights(tiny_model_dir, tmp_path):
    model = _model_copy(tiny_model_dir, tmp_path, "bin-model")
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(b"never unpickled")  # refused before it is opened
    return model


def _corpus_case(content):
    return lambda model, corpus, tmp: ["train", "--model", str(model), "--corpus", str(write(tmp / "bad.jsonl", content))]


def _train_case(*extra, model=None):
    return lambda m, corpus, tmp: ["train", "--model", str(model(m, tmp) if model else m), "--corpus", str(corpus), *extra]


def _eval_case(*extra, model=None):
    return lambda m, corpus, tmp: ["eval", "--model", str(model(m, tmp) if model else m), "--tasks", "knowledge", "--device", "cpu", *extra]


LOADER_CASES = {
    "JSONL line of 200,000 '['": (_corpus_case("[" * 200_000 + "\n"), "bad.jsonl:1: JSON nested too deeply"),
    "JSONL text with a lone surrogate": (_corpus_case('{"text": "Velmora \\ud800 opened a bridge. It is 412 metres long."}\n'),
                                         "skipped 1 non-UTF-8 document(s): bad.jsonl:1"),
    "--corpus /dev/zero": (lambda m, c, tmp: ["train", "--model", str(m), "--corpus", "/dev/zero"], "/dev/zero is not a regular file"),
    "train: truncated model.safetensors": (_train_case(model=truncated_weights), "are damaged"),
    "eval: truncated model.safetensors": (_eval_case(model=truncated_weights), "are damaged"),
    "train: only pytorch_model.bin": (_train_case(model=pickle_only_weights), "--allow-pickle-weights"),
    "eval: only pytorch_model.bin": (_eval_case(model=pickle_only_weights), "--allow-pickle-weights"),
    "--student lora --lora-targets nosuch_proj": (_train_case("--student", "lora", "--lora-targets", "nosuch_proj"),
                                                 "'nosuch_proj' not in the model; its linear modules are: down_proj, gate_proj"),
    "eval --sandbox-timeout 0": (_eval_case("--sandbox-timeout", "0"), "sandbox_timeout (seconds) and sandbox_memory_mb must be > 0"),
    "eval --sandbox-timeout -5": (_eval_case("--sandbox-timeout=-5"), "must be > 0"),
    "eval --sandbox-memory-mb 0": (_eval_case("--sandbox-memory-mb", "0"), "must be > 0"),
    "eval --sandbox-memory-mb -1": (_eval_case("--sandbox-memory-mb=-1"), "must be > 0"),
}


@pytest.mark.parametrize("case", list(LOADER_CASES))
def test_bad_loader_input(case, tiny_model_dir, corpus_file, tmp_path, capsys):
    build, message = LOADER_CASES[case]
    out = tmp_path / "out"
    code, err = run_main(capsys, *build(tiny_model_dir, corpus_file, tmp_path), "--out", str(out), "--quiet")
    assert_one_line_error(code, err, message)
    assert not out.exists()


def test_humaneval_without_isolation_is_refused_in_one_line(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """No namespaces (here: `unshare` missing), no HumanEval: never an unsandboxed fallback."""
    from ctxdistill.evaluate import sandbox

    monkeypatch.setattr(sandbox, "_privileged", None)
    which = sandbox.shutil.which
    monkeypatch.setattr(sandbox.shutil, "which", lambda name, path=None: None if name == "unshare" else which(name, path=path))
    out = tmp_path / "out"
    code, err = run_main(capsys, "eval", "--model", str(tiny_model_dir), "--tasks", "humaneval", "--device", "cpu", "--out", str(out), "--quiet")
    assert_one_line_error(code, err, "HumanEval runs model-written code only inside an isolated sandbox")
    assert "unshare is missing; install util-linux" in err[0] and "leave humaneval out of --tasks" in err[0]
    assert not out.exists()


# -- options, output locations, teacher caches, sweeps and reports ------------------------------------------


def _cache_case(damage):
    """A teacher cache for the corpus, damaged by `damage(cache_dir)`, given to a DiSC run."""
    def build(model, corpus, tmp):
        from ctxdistill.config import TrainConfig
        from ctxdistill.teachers import cache_teacher

        cache = tmp / "cache"
        cache_teacher(TrainConfig.create(model=str(model), corpus=str(corpus), device="cpu"), str(cache), k=4, progress=False,
                      log=lambda *a: None)
        damage(cache)
        return ["train", "--model", str(model), "--corpus", str(corpus), "--device", "cpu", "--teacher-cache", str(cache)]
    return build


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


OPTION_CASES = {
    "--seed beyond 64 bits": (_train_case("--seed", str(2**70)), "seed must be an integer in [0, 2^63)"),
    "--device tpu9": (_train_case("--device", "tpu9"), "unknown device 'tpu9'; use auto, cpu, cuda or cuda:N"),
    "--max-length 1": (_train_case("--max-length", "1"), "max_length must be >= 2 (a sequence needs a token to predict from"),
    "teacher cache with a truncated manifest.json": (_cache_case(lambda c: _truncate(c / "manifest.json", 40)), "manifest.json is corrupt"),
    "teacher cache with a corrupted shard header": (
        _cache_case(lambda c: (c / "shard-00000.safetensors").write_bytes(
            b"\xff" * 8 + (c / "shard-00000.safetensors").read_bytes()[8:])), "shard-00000.safetensors is damaged"),
}


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_bad_options_and_caches(case, tiny_model_dir, corpus_file, tmp_path, capsys):
    build, message = OPTION_CASES[case]
    out = tmp_path / "out"
    args = build(tiny_model_dir, corpus_file, tmp_path)
    cache = tmp_path / "cache"
    before = {p: p.read_bytes() for p in cache.rglob("*") if p.is_file()} if cache.exists() else {}
    code, err = run_main(capsys, *args, "--out", str(out), "--quiet")
    assert_one_line_error(code, err, message)
    assert not out.exists()
    assert {p: p.read_bytes() for p in cache.rglob("*") if p.is_file()} == before, "the cache is left as it was"


@pytest.mark.parametrize("where, message", [
    (lambda tmp: Path("/proc/ctxdistill-test-out"), "kernel filesystem"),
    (lambda tmp: Path("/sys/ctxdistill-test-out"), "kernel filesystem"),
    (lambda tmp: write(tmp / "a-file", "x") / "out", "is a file, not a directory"),
])
def test_impossible_output_locations(where, message, tiny_model_dir, corpus_file, tmp_path, capsys):
    out = where(tmp_path)
    code, err = run_main(capsys, "train", "--model", str(tiny_model_dir), "--corpus", str(corpus_file), "--out", str(out), "--quiet")
    assert_one_line_error(code, err, message)
    assert not out.exists()


def test_sweep_method_overrides_that_are_not_a_mapping(tiny_model_dir, corpus_file, tmp_path, capsys):
    config = write(tmp_path / "sweep.yaml", f"out: {tmp_path / 'sweep'}\nmodel: {tiny_model_dir}\ncorpus: {corpus_file}\n"
                                            "methods: [ft]\nmethod_overrides: {ft: [1, 2]}\n")
    code, err = run_main(capsys, "sweep", "--config", str(config), "--quiet")
    assert_one_line_error(code, err, "method_overrides.ft must be a mapping of TrainConfig options")
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("content, message", [("[1, 2]\n", "holds a list, not an evaluation"),
                                              ('{"role": "run", "run": {}}\n', "has no `metrics` mapping")])
def test_report_on_files_that_are_not_evaluations(content, message, tmp_path, capsys):
    runs = tmp_path / "runs"
    (runs / "a").mkdir(parents=True)
    write(runs / "a" / "eval.json", content)
    before = sorted(p.name for p in runs.rglob("*"))
    code, err = run_main(capsys, "report", str(runs))
    assert_one_line_error(code, err, message)
    assert sorted(p.name for p in runs.rglob("*")) == before, "no report.md, no plots"
