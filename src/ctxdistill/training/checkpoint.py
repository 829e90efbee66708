"""Crash-safe checkpoints and exact resume: safetensors and JSON only, written atomically.

A checkpoint is a directory `OUT/checkpoints/step-NNNNNNNN/` holding
- `model.safetensors`: the trainable parameters by name (all weights under full fine-tuning, the
  adapter under LoRA; frozen weights are reloaded from the model source on resume);
- `optimizer.safetensors`: the AdamW state tensors by parameter name (`NAME::exp_avg`, ...);
- `state.json`: step and data position, counters, the optimizer's hyper-parameters, the RNG states
  of every process (python, numpy, torch, CUDA), the settings that fix the trajectory and
  fingerprints of the corpus and of the epoch plans (document order and DiSC split points).

It is written to a hidden temporary directory next to the others, flushed to disk, and renamed in
one step, so a checkpoint directory either exists complete or not at all: a kill or a full disk
during the write leaves the previous checkpoints intact. The last `keep` are kept.

Nothing here unpickles: tensors go through safetensors, everything else through JSON.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CtxDistillError

FORMAT = 1
CHECKPOINTS = "checkpoints"
STEP_DIR = re.compile(r"^step-(\d{8})$")
RUN_MARKERS = ("run.json", "losses.jsonl", CHECKPOINTS, "model")

# Settings that may change between a run and its resume: they do not alter the trajectory of the
# steps already planned (max_steps and epochs only move the end).
# The corpus path may change too (a moved file): its content is checked by fingerprint instead.
RESUME_MAY_CHANGE = frozenset({
    "out", "overwrite", "resume", "save_model", "merge_lora", "log_every", "checkpoint_every", "keep_checkpoints",
    "max_steps", "epochs", "on_nonfinite", "device", "gen_batch_size", "gen_cache", "corpus",
})


# ----------------------------------------------------------------------------------------------
# paths


def confined(root: Path, *parts: str) -> Path:
    """`root/parts...`, refusing any path that resolves outside `root` (a symlink pointing away)."""
    base = Path(root).resolve()
    path = base.joinpath(*parts)
    resolved = path.resolve()
    if resolved != base and base not in resolved.parents:
        raise CtxDistillError(f"refusing to write {path}: it resolves to {resolved}, outside the output directory {base}")
    return path


def is_dangerous_to_delete(path: Path) -> str | None:
    """Why `path` must never be wiped by --overwrite (None when it may be)."""
    resolved = path.resolve()
    cwd = Path.cwd().resolve()
    if resolved == Path(resolved.anchor):
        return "it is a filesystem root"
    if resolved == Path.home().resolve():
        return "it is the home directory"
    if resolved == cwd or resolved in cwd.parents:
        return "it is the current directory or one of its parents"
    if (resolved / ".git").exists():
        return "it holds a git repository"
    return None


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every complete checkpoint under `out_dir`, oldest first."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = STEP_DIR.match(child.name)
        if match and child.is_dir() and (child / "state.json").is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def remove_stale_temporaries(out_dir: Path) -> None:
    """Temporary checkpoint directories left by a process killed while writing."""
    root = Path(out_dir) / CHECKPOINTS
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith(".tmp-"):
                shutil.rmtree(child, ignore_errors=True)


def is_run_dir(path: Path) -> bool:
    return any((path / marker).exists() for marker in RUN_MARKERS)


@dataclass
class RunDir:
    path: Path
    created: bool  # this call created the directory (removed again if the run fails before writing)
    resume_from: Path | None  # checkpoint directory to continue from


def open_run_dir(out: str, overwrite: bool, resume: bool | None) -> RunDir:
    """Decide between a fresh run, a resume and a refusal; never delete or overwrite silently.

    resume None (the default) continues from the latest checkpoint when `out` holds one; True
    requires one; False refuses a directory that holds checkpoints (unless `overwrite`).
    """
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise CtxDistillError(f"output path {path} exists and is not a directory; choose another --out")
    nonempty = path.is_dir() and any(path.iterdir())
    checkpoints = list_checkpoints(path) if nonempty else []
    if overwrite and resume:
        raise CtxDistillError("--resume and --overwrite contradict each other: resume continues the run in --out, overwrite deletes it")
    if nonempty and overwrite:
        why = is_dangerous_to_delete(path)
        if why:
            raise CtxDistillError(f"refusing to --overwrite {path}: {why}; choose a dedicated --out directory")
        shutil.rmtree(path)
        nonempty = False
        checkpoints = []
    if nonempty:
        if checkpoints and resume is not False:
            remove_stale_temporaries(path)
            return RunDir(path, False, checkpoints[-1][1])
        if checkpoints:
            raise CtxDistillError(f"output directory {path} holds checkpoints (latest: {checkpoints[-1][1].name}); "
                                  f"drop --no-resume to continue that run, or pass --overwrite to start again")
        if resume:
            raise CtxDistillError(f"--resume: {path} holds no checkpoint to continue from; pass --overwrite to start again or choose another --out")
        raise CtxDistillError(f"output directory {path} exists and is not empty; pass --overwrite or choose another --out")
    if resume:
        raise CtxDistillError(f"--resume: {path} holds no checkpoint to continue from")
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    return RunDir(path, created, None)


# ----------------------------------------------------------------------------------------------
# random number generators


def _b64(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode("ascii")


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def capture_rng() -> dict:
    """This process's RNG states as JSON-safe values (python, numpy, torch CPU and CUDA)."""
    import numpy as np

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss},
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict) -> None:
    import numpy as np

    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        states = [_unb64(s) for s in state["cuda"]]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


# ----------------------------------------------------------------------------------------------
# fingerprints


def corpus_fingerprint(examples: list) -> str:
    """sha256 over what training reads: every example's id and tokens (or its repr)."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(repr(ex).encode("utf-8", "surrogatepass"))
        digest.update(b"\x00")
    return digest.hexdigest()


def plan_fingerprint(plans: list[list]) -> list[str]:
    """One sha256 per epoch over the items' order and split points (doc ids and spans)."""
    out = []
    for items in plans:
        digest = hashlib.sha256()
        for item in items:
            digest.update(f"{getattr(item, 'doc_id', '?')}|{getattr(item, 'spans', '')}|{getattr(item, 'step', '')}\n".encode())
        out.append(digest.hexdigest())
    return out


def trajectory_config(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in RESUME_MAY_CHANGE}


# ----------------------------------------------------------------------------------------------
# writing


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
        tmp.replace(path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def disk_error(what: str, exc: OSError, keep: str) -> CtxDistillError:
    reason = exc.strerror or str(exc)
    hint = "free some space, then rerun the same command to resume" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "fix the cause, then rerun the same command to resume"
    return CtxDistillError(f"cannot write {what}: {reason}; {keep}; {hint}")


def save_checkpoint(out_dir: Path, step: int, trainable: dict[str, torch.Tensor], optimizer_state: dict | None,
                    state: dict, keep: int) -> Path:
    """Write a complete checkpoint for `step` atomically and prune to the last `keep`. Main process only.

    `optimizer_state` is {"state": {name: {key: tensor}}, "param_groups": [{..., "params": [names]}]}.
    A failure (disk full, ...) removes the partial directory and raises CtxDistillError naming the
    checkpoint that is still intact.
    """
    root = confined(out_dir, CHECKPOINTS)
    root.mkdir(exist_ok=True)
    final = confined(out_dir, CHECKPOINTS, f"step-{step:08d}")
    tmp = confined(out_dir, CHECKPOINTS, f".tmp-step-{step:08d}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "ctxdistill-checkpoint", "step": str(step)})
        meta = {"param_groups": [], "has_state": optimizer_state is not None}
        if optimizer_state is not None:
            tensors = {}
            for name, entry in optimizer_state["state"].items():
                for key, value in entry.items():
                    value = value if torch.is_tensor(value) else torch.tensor(value)
                    tensors[f"{name}::{key}"] = value.detach().contiguous().cpu()
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            meta["param_groups"] = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
                                    for g in optimizer_state["param_groups"]]
        write_json_atomic(tmp / "state.json", state | {"format": FORMAT, "step": step, "optimizer": meta, "saved_unix": time.time()})
        for f in tmp.iterdir():
            _fsync_file(f)
        _fsync_dir(tmp)
        if final.exists():  # a stale copy of the same step (e.g. re-saved after a resume)
            shutil.rmtree(final)
        tmp.rename(final)
        _fsync_dir(root)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = [p for _, p in list_checkpoints(out_dir)]
        keep_note = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        raise disk_error(f"checkpoint for step {step} in {root}", exc, keep_note) from exc
    for _, old in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------------------------
# reading


@dataclass
class Checkpoint:
    path: Path
    state: dict
    trainable: dict[str, torch.Tensor]
    optimizer: dict | None  # same shape as save_checkpoint's optimizer_state


def read_state(path: Path) -> dict:
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CtxDistillError(f"checkpoint {path} is unreadable ({exc}); delete it to resume from the one before, or pass --overwrite") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CtxDistillError(f"checkpoint {path} has an unknown format; pass --overwrite to start again")
    return state


def load_checkpoint(path: Path) -> Checkpoint:
    state = read_state(path)
    try:
        trainable = load_file(str(path / "model.safetensors"))
        optimizer = None
        if state["optimizer"]["has_state"]:
            flat = load_file(str(path / "optimizer.safetensors"))
            per_param: dict[str, dict] = {}
            for key, value in flat.items():
                name, _, field = key.rpartition("::")
                per_param.setdefault(name, {})[field] = value
            groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in state["optimizer"]["param_groups"]]
            optimizer = {"state": per_param, "param_groups": groups}
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        raise CtxDistillError(f"checkpoint {path} is damaged ({type(exc).__name__}: {str(exc)[:200]}); "
                              f"delete it to resume from the one before, or pass --overwrite") from None
    return Checkpoint(path, state, trainable, optimizer)


def check_compatible(state: dict, config: dict, path: Path) -> None:
    """Refuse a resume whose settings would change the trajectory of the checkpointed run."""
    import dataclasses

    from .config import TrainConfig

    saved = trajectory_config(state.get("config", {}))
    now = trajectory_config(config)
    # An option added after the checkpoint was written, left at its default, cannot change the trajectory.
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    added = {k for k in now if k not in saved and k in defaults and now[k] == defaults[k]}
    changed = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k) and k not in added]
    if changed:
        detail = ", ".join(f"{k} (checkpoint: {saved.get(k)!r}, now: {now.get(k)!r})" for k in changed[:4])
        raise CtxDistillError(f"cannot resume from {path}: settings differ: {detail}; rerun with the checkpoint's settings, "
                              f"or pass --overwrite (or another --out) to start a new run")


# ----------------------------------------------------------------------------------------------
# optimizer state by parameter name (layout independent: 1 process, DDP, FSDP full state)


def named_optimizer_state(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> dict:
    """The optimizer's state_dict with parameter indices replaced by parameter names."""
    sd = optimizer.state_dict()
    index_to_name = {}
    index = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            index_to_name[index] = names[id(p)]
            index += 1
    state = {index_to_name[i]: dict(v) for i, v in sd["state"].items()}
    groups = [dict(g, params=[index_to_name[i] for i in g["params"]]) for g in sd["param_groups"]]
    return {"state": state, "param_groups": groups}


def load_named_optimizer_state(optimizer: torch.optim.Optimizer, named: dict, names: dict[int, str]) -> None:
    """Inverse of `named_optimizer_state`, matching tensors to parameters by name, not position."""
    index_of, groups = {}, []
    for group, saved in zip(optimizer.param_groups, named["param_groups"]):
        indices = []
        for p in group["params"]:
            index_of[names[id(p)]] = len(index_of)
            indices.append(index_of[names[id(p)]])
        groups.append(dict(saved, params=indices))
    saved_names = [n for g in named["param_groups"] for n in g["params"]]
    if len(named["param_groups"]) != len(optimizer.param_groups) or sorted(saved_names) != sorted(index_of):
        raise CtxDistillError("the checkpoint's optimizer covers different parameters than this model; pass --overwrite to start again")
    optimizer.load_state_dict({"state": {index_of[n]: v for n, v in named["state"].items()}, "param_groups": groups})
