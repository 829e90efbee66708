"""What a run writes to OUT, and the policy that protects what is already there.

OUT holds `model/` (or the LoRA adapter; `merged/` with --merge-lora), `run.json`, `losses.jsonl`,
`checkpoints/`, and the texts a method generated. The policy (`open_run_dir`):
- OUT is locked for the life of the run (a second process writing it gets one error line);
- a directory holding checkpoints resumes (unless --no-resume); one holding a finished run, or anything
  that is not ours, is refused unless --overwrite (never a root, the home, the current directory or a
  git repository);
- what a run killed before its first checkpoint leaves (losses.jsonl, generations, temporaries: only
  files this module writes, nothing else in OUT) is cleared, and the rerun starts over.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError

from ..errors import CtxDistillError
from ..files import LOCK_NAME, OutputLock, check_writable_location, confined, dangerous_to_delete, disk_error, write_json_atomic
from .checkpoint import CHECKPOINTS, list_checkpoints, remove_stale_temporaries

# Files and directories only a run writes into OUT: a directory holding nothing else is a run's.
RUN_FILES = ("losses.jsonl", "generations.jsonl", "replay_responses.jsonl", LOCK_NAME, "tensorboard", "wandb")  # + tracker logs
TEMPORARY_PREFIXES = (".model.tmp", ".merged.tmp", ".losses.jsonl.tmp", ".run.json.tmp", ".generations.jsonl.tmp",
                      ".replay_responses.jsonl.tmp")


@dataclass
class RunDir:
    path: Path
    created: bool  # this call created the directory (removed again if the run fails before writing)
    resume_from: Path | None  # checkpoint directory to continue from
    lock: OutputLock | None = None

    def release(self, remove_if_empty: bool = False) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if remove_if_empty and self.created and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()  # nothing was written: leave no empty directory behind


def unfinished_start(path: Path) -> bool:
    """OUT holds only what a run killed before its first checkpoint leaves: ours to clear."""
    for child in path.iterdir():
        if child.name in RUN_FILES or child.name.startswith(TEMPORARY_PREFIXES):
            continue
        if child.name == CHECKPOINTS and child.is_dir() and all(c.name.startswith(".tmp-") for c in child.iterdir()):
            continue
        return False
    return True


def clear_run_files(path: Path) -> None:
    """Remove what a run wrote (and nothing else): the unfinished start of `unfinished_start`, or a whole
    directory being replaced under --overwrite (the lock file stays, it is held)."""
    for child in path.iterdir():
        if child.name == LOCK_NAME:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def open_run_dir(out: str, overwrite: bool, resume: bool | None) -> RunDir:
    """Lock OUT, then decide between a fresh run, a resume and a refusal; never delete or overwrite silently.

    resume None (the default) continues from the latest checkpoint when `out` holds one; True
    requires one; False refuses a directory that holds checkpoints (unless `overwrite`).
    """
    path = Path(out).expanduser()
    check_writable_location(path)
    if path.exists() and not path.is_dir():
        raise CtxDistillError(f"output path {path} exists and is not a directory; choose another --out")
    if overwrite and resume:
        raise CtxDistillError("--resume and --overwrite contradict each other: resume continues the run in --out, overwrite deletes it")
    if overwrite and path.is_dir() and any(path.iterdir()):
        why = dangerous_to_delete(path)
        if why:
            raise CtxDistillError(f"refusing to --overwrite {path}: {why}; choose a dedicated --out directory")
    created = not path.exists()
    try:
        lock = OutputLock(path, "output directory").acquire()
    except PermissionError as exc:
        raise CtxDistillError(f"cannot create --out {path}: {exc.strerror}; choose a writable directory") from None
    run_dir = RunDir(path, created, None, lock)
    try:
        decide(run_dir, overwrite, resume)
    except BaseException:
        run_dir.release(remove_if_empty=True)
        raise
    return run_dir


def decide(run_dir: RunDir, overwrite: bool, resume: bool | None) -> None:
    path = run_dir.path
    nonempty = any(p.name != LOCK_NAME for p in path.iterdir())
    checkpoints = list_checkpoints(path) if nonempty else []
    if nonempty and overwrite:
        clear_run_files(path)
        return
    if nonempty and not checkpoints and resume is not True and unfinished_start(path):
        clear_run_files(path)  # killed before its first checkpoint: start over, as the same command promises
        return
    if nonempty:
        if checkpoints and resume is not False:
            if (path / "run.json").exists():
                raise CtxDistillError(f"output directory {path} holds a finished run (run.json); pass --overwrite to train again, or choose another --out")
            remove_stale_temporaries(path)
            run_dir.resume_from = checkpoints[-1][1]
            return
        if checkpoints:
            raise CtxDistillError(f"output directory {path} holds checkpoints (latest: {checkpoints[-1][1].name}); "
                                  f"drop --no-resume to continue that run, or pass --overwrite to start again")
        if resume:
            raise CtxDistillError(f"--resume: {path} holds no checkpoint to continue from; pass --overwrite to start again or choose another --out")
        raise CtxDistillError(f"output directory {path} exists and is not empty; pass --overwrite or choose another --out")
    if resume:
        raise CtxDistillError(f"--resume: {path} holds no checkpoint to continue from")


def open_output(cfg, rt) -> tuple[RunDir | None, Path | None]:
    """The main process decides (fresh, resume or refuse) and locks OUT; the others follow its decision."""
    if not cfg.out:
        return None, None
    run_dir, decision, error = None, -1, None
    if rt.is_main:
        try:
            run_dir = open_run_dir(cfg.out, cfg.overwrite, cfg.resume)
            decision = int(run_dir.resume_from.name.split("-")[1]) if run_dir.resume_from else -2
        except CtxDistillError as exc:
            error = exc
    decision = rt.broadcast_int(decision)
    if error is not None:
        raise error
    if decision == -1:
        raise CtxDistillError("the main process could not open the output directory (see its error)")
    if not rt.is_main:
        path = Path(cfg.out).expanduser()
        run_dir = RunDir(path, False, path / CHECKPOINTS / f"step-{decision:08d}" if decision >= 0 else None)
    return run_dir, run_dir.resume_from


class LossLog:
    """losses.jsonl: one JSON line per logged step, flushed as written; truncated to the checkpoint on resume."""

    def __init__(self, out_dir: Path | None, resumed_step: int | None):
        from .resume import truncate_losses

        self.file = None
        if out_dir is None:
            return
        path = confined(out_dir, "losses.jsonl")
        if resumed_step is not None:
            truncate_losses(path, resumed_step)
        self.file = open(path, "a" if resumed_step is not None else "w", encoding="utf-8")

    def write(self, record: dict) -> None:
        if self.file is not None:
            try:
                self.file.write(json.dumps(record) + "\n")
                self.file.flush()
            except OSError as exc:
                raise disk_error("losses.jsonl", exc, "the checkpoints written so far are intact") from exc

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def save_model(model, tokenizer, out_dir: Path, merge_lora: bool, state_dict: dict | None = None, merged_factory=None) -> dict:
    """`out/model` (full weights, or the PEFT adapter under LoRA) and optionally `out/merged`.

    Each is written to a hidden temporary directory and renamed; a failure (disk full) removes the
    temporary directory and raises CtxDistillError. `state_dict` is the gathered full state of a
    sharded model; `merged_factory` builds the merged model when the student must not be copied.
    """
    written = {}
    targets = [("model", model)]
    if merge_lora:
        targets.append(("merged", None))
    for name, to_save in targets:
        final, tmp = confined(out_dir, name), confined(out_dir, f".{name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            kwargs = {"state_dict": state_dict} if state_dict is not None and name == "model" else {}
            if to_save is None:  # merge a copy so the in-memory student keeps its adapter
                if merged_factory is not None:
                    to_save = merged_factory()
                else:
                    import copy

                    to_save = copy.deepcopy(model).merge_and_unload()
            to_save.save_pretrained(tmp, safe_serialization=True, **kwargs)
            tokenizer.save_pretrained(tmp)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        except (OSError, SafetensorError) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise disk_error(f"the trained model to {final}", exc, f"checkpoints under {out_dir / CHECKPOINTS} (if any) are intact") from exc
        written[name] = str(final)
    return written


def run_summary(trainer) -> dict:
    """run.json: the resolved config, versions, devices, corpus report, counts, timings, throughput."""
    from ..runtime import versions

    cfg, state, prepared = trainer.cfg, trainer.state, trainer.prepared
    out = {
        "config": cfg.flat(),
        "versions": versions(),
        "device": str(trainer.rt.device),
        "processes": {"world_size": trainer.rt.world, "mode": trainer.rt.mode},
        "corpus": trainer.corpus_report.to_dict() | {"examples": len(prepared.examples),
                                                     "skipped_by_method": {k: len(v) for k, v in prepared.skipped.items()}},
        "counts": state.counts,
        "nonfinite_skipped": state.skipped,
        "timings_s": {"load": round(trainer.load_seconds, 3), "generate": round(prepared.generation.get("seconds", 0.0), 3),
                      "train": round(trainer.train_seconds, 3)} | {name: round(v, 3) for name, v in sorted(state.seconds.items())},
        "throughput": {"documents_per_s": state.counts["documents"] / max(trainer.train_seconds, 1e-9),
                       "student_tokens_per_s": state.counts["student_tokens"] / max(trainer.train_seconds, 1e-9)},
    }
    if trainer.resumed is not None:
        out["resumed_from"] = {"checkpoint": str(trainer.resume_from), "step": trainer.resumed.state["step"]}
    if prepared.generation:
        out["generation"] = prepared.generation
    return out


def write_summary(out_dir: Path, summary: dict) -> None:
    try:
        write_json_atomic(confined(out_dir, "run.json"), summary)
    except OSError as exc:
        raise disk_error(f"{out_dir / 'run.json'}", exc, "the trained model and the checkpoints are intact") from exc


def save_final(cfg, rt, student, unwrapped, tokenizer, out_dir: Path, build_student) -> dict:
    """The trained model (or adapter), written by the main process; gathered first under sharding.

    Collective: every process takes part (and raises) when the main process fails to write."""
    import torch

    def rebuild_merged():  # never deep-copy a sharded student: rebuild from the source, load the gathered state
        base = build_student(cfg.replace(compile=False, gradient_checkpointing=False), torch.device("cpu"))
        base.load_state_dict(state_dict, strict=False)
        return base.merge_and_unload()

    state_dict = rt.accelerator.get_state_dict(student) if rt.sharded else None
    merged_factory = rebuild_merged if rt.sharded and cfg.student == "lora" and cfg.merge_lora else None
    written, error = {}, None
    if rt.is_main:
        try:
            written = save_model(unwrapped, tokenizer, out_dir, cfg.merge_lora and cfg.student == "lora", state_dict, merged_factory)
        except CtxDistillError as exc:
            error = exc
    rt.raise_if_any(error, "save the model")
    return written
