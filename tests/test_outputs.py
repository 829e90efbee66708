"""What a command may do to an output directory: lock it, resume it, replace only its own files, clean up.

The specification (docs/distributed.md, "Reliability"):
- a second process writing the same OUT gets one error line naming the holder and exit 2;
- `cache-teacher --out` never deletes a directory that is not a teacher cache (nor `.`);
- a run killed before its first checkpoint is started over by the same command;
- a full disk during a checkpoint, the final save or a cache build is one line, exit 2, no temporaries.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import SafetensorError

from ctxdistill.cli import main
from ctxdistill.files import LOCK_NAME, OutputLock

from conftest import NEWS


def run_main(capsys, *args):
    code = main(list(args))
    return code, capsys.readouterr().err.strip().splitlines()


def assert_one_line_error(code, err, message):
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("ctxdistill: error:") and message in err[0], err


def snapshot(root: Path) -> dict:
    """Every file under `root` with its bytes: 'unchanged' means byte for byte."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture()
def corpus4(tmp_path):
    path = tmp_path / "corpus4.jsonl"
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": NEWS[i % 2]}) + "\n" for i in range(4)), encoding="utf-8")
    return path


def train_args(model_dir, corpus, out, *extra):
    return ["train", "--quiet", "--model", str(model_dir), "--corpus", str(corpus), "--out", str(out), "--device", "cpu",
            "--precision", "fp32", "--lr", "1e-3", "--max-steps", "2", *extra]


# -- locks ------------------------------------------------------------------------------------------


def test_a_second_writer_of_the_same_out_is_refused_naming_the_holder(capsys, tiny_model_dir, corpus4, tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from ctxdistill.files import OutputLock; "
        f"held = OutputLock({str(out)!r}).acquire(); print('locked', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(out)
        code, err = run_main(capsys, *train_args(tiny_model_dir, corpus4, out))
        assert_one_line_error(code, err, f"is in use by process {holder.pid}")
        assert snapshot(out) == before
    finally:
        holder.kill()
        holder.wait()
    # the holder died: the kernel released its lock, and the same command now runs
    assert main(train_args(tiny_model_dir, corpus4, out)) == 0
    assert (out / "run.json").is_file() and not (out / LOCK_NAME).exists()


def test_lock_is_exclusive_within_one_process_too(tmp_path):
    with OutputLock(tmp_path / "d"):
        with pytest.raises(Exception, match=f"in use by process {os.getpid()}"):
            OutputLock(tmp_path / "d").acquire()
    OutputLock(tmp_path / "d").acquire().release()  # released: free again


# -- cache-teacher never deletes the user's files ------------------------------------------------------


def test_cache_teacher_refuses_a_directory_that_is_not_a_cache(capsys, tiny_model_dir, corpus4, tmp_path):
    thesis = tmp_path / "thesis"
    (thesis / ".git").mkdir(parents=True)
    (thesis / "chapter1.tex").write_text("Years of work.\n")
    before = snapshot(thesis)
    for extra in ([], ["--overwrite"]):
        code, err = run_main(capsys, "cache-teacher", "--quiet", "--model", str(tiny_model_dir), "--corpus", str(corpus4),
                             "--out", str(thesis), "--device", "cpu", *extra)
        assert_one_line_error(code, err, str(thesis))
        assert snapshot(thesis) == before


def test_cache_teacher_refuses_the_current_directory(capsys, tiny_model_dir, corpus4, tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("mine\n")
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    code, err = run_main(capsys, "cache-teacher", "--quiet", "--model", str(tiny_model_dir), "--corpus", str(corpus4), "--out", ".",
                         "--device", "cpu", "--overwrite")
    assert_one_line_error(code, err, "current directory")
    assert snapshot(tmp_path) == before


def test_cache_teacher_rebuilds_its_own_cache_only_with_overwrite(capsys, tiny_model_dir, corpus4, tmp_path):
    args = ["cache-teacher", "--quiet", "--model", str(tiny_model_dir), "--corpus", str(corpus4), "--out", str(tmp_path / "cache"),
            "--device", "cpu", "--k", "8"]
    assert main(args) == 0
    manifest = (tmp_path / "cache" / "manifest.json").read_bytes()
    code, err = run_main(capsys, *args)
    assert_one_line_error(code, err, "--overwrite")
    assert main(args + ["--overwrite"]) == 0
    assert json.loads((tmp_path / "cache" / "manifest.json").read_bytes())["key"] == json.loads(manifest)["key"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "corpus4.jsonl"], "no temporaries or lock files left"


# -- a run killed before its first checkpoint -----------------------------------------------------------


def test_rerun_after_a_kill_before_the_first_checkpoint_starts_over(tiny_model_dir, corpus4, tmp_path):
    out = tmp_path / "run"
    args = train_args(tiny_model_dir, corpus4, out, "--epochs", "200", "--max-steps", "0", "--checkpoint-every", "100000")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    child = subprocess.Popen([sys.executable, "-m", "ctxdistill.cli", *args], env=env, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not ((out / "losses.jsonl").is_file() and (out / "losses.jsonl").stat().st_size > 0):
            assert time.time() < deadline and child.poll() is None, "training never wrote a step"
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert not (out / "run.json").exists() and not list(out.glob("checkpoints/step-*")), "killed before any checkpoint"
    (out / "checkpoints").mkdir(exist_ok=True)
    (out / "checkpoints" / ".tmp-step-00000100-999").mkdir()  # what a kill during a checkpoint write leaves
    assert main(train_args(tiny_model_dir, corpus4, out)) == 0
    losses = [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses] == [1, 2], "started over: no stale lines"
    assert not list(out.glob("checkpoints/.tmp-*"))


def test_a_directory_with_other_files_is_still_refused(capsys, tiny_model_dir, corpus4, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "losses.jsonl").write_text('{"step": 1}\n')
    (out / "my_notes.md").write_text("keep me\n")
    before = snapshot(out)
    code, err = run_main(capsys, *train_args(tiny_model_dir, corpus4, out))
    assert_one_line_error(code, err, "not empty")
    assert snapshot(out) == before


# -- disk full --------------------------------------------------------------------------------------


def disk_full(*args, **kwargs):
    raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })")


def test_disk_full_during_a_checkpoint_is_one_line_and_leaves_no_temporaries(capsys, monkeypatch, tiny_model_dir, corpus4, tmp_path):
    import ctxdistill.training.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    out = tmp_path / "run"
    code, err = run_main(capsys, *train_args(tiny_model_dir, corpus4, out, "--checkpoint-every", "1"))
    assert_one_line_error(code, err, "No space left on device")
    assert "free some space" in err[0]
    assert not list((out / "checkpoints").iterdir()), "no partial checkpoint"


def test_disk_full_during_the_final_save_is_one_line_and_leaves_no_temporaries(capsys, monkeypatch, tiny_model_dir, corpus4, tmp_path):
    import transformers

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", disk_full)
    out = tmp_path / "run"
    code, err = run_main(capsys, *train_args(tiny_model_dir, corpus4, out, "--checkpoint-every", "0"))
    assert_one_line_error(code, err, "No space left on device")
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "no hidden temporaries"
    assert not (out / "model").exists() and not (out / "run.json").exists()


def test_disk_full_during_a_cache_build_leaves_nothing(capsys, monkeypatch, tiny_model_dir, corpus4, tmp_path):
    import ctxdistill.teacher_cache as teacher_cache

    monkeypatch.setattr(teacher_cache, "save_file", disk_full)
    code, err = run_main(capsys, "cache-teacher", "--quiet", "--model", str(tiny_model_dir), "--corpus", str(corpus4),
                         "--out", str(tmp_path / "cache"), "--device", "cpu")
    assert_one_line_error(code, err, "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus4.jsonl"], "no cache, no FILE.tmp, no lock file"
