"""Checkpoints: save, load and find them (nothing else: what a resume checks is in resume.py).

Safetensors and JSON only, written atomically.

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
import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import CtxDistillError
from ..files import confined, disk_error, write_json_atomic

FORMAT = 1
CHECKPOINTS = "checkpoints"
STEP_DIR = re.compile(r"^step-(\d{8})$")

# ----------------------------------------------------------------------------------------------
# finding


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


def save_checkpoint(out_dir: Path, step: int, trainable: dict[str, torch.Tensor], optimizer_state: dict | None,
                    state: dict, keep: int, method_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a complete checkpoint for `step` atomically and prune to the last `keep`. Main process only.

    `optimizer_state` is {"state": {name: {key: tensor}}, "param_groups": [{..., "params": [names]}]};
    `method_tensors` is what the method keeps besides the weights (e.g. SDFT's EMA teacher), in
    `method.safetensors`.
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
        if method_tensors:
            save_file({k: v.detach().contiguous().cpu() for k, v in method_tensors.items()}, str(tmp / "method.safetensors"))
        write_json_atomic(tmp / "state.json", state | {"format": FORMAT, "step": step, "optimizer": meta, "saved_unix": time.time()})
        for f in tmp.iterdir():
            _fsync_file(f)
        _fsync_dir(tmp)
        if final.exists():  # a stale copy of the same step (e.g. re-saved after a resume)
            shutil.rmtree(final)
        tmp.rename(final)
        _fsync_dir(root)
    except (OSError, SafetensorError) as exc:
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
    method_tensors: dict[str, torch.Tensor] = field(default_factory=dict)


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
                name, _, slot = key.rpartition("::")
                per_param.setdefault(name, {})[slot] = value
            groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in state["optimizer"]["param_groups"]]
            optimizer = {"state": per_param, "param_groups": groups}
        method_tensors = load_file(str(path / "method.safetensors")) if (path / "method.safetensors").is_file() else {}
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        raise CtxDistillError(f"checkpoint {path} is damaged ({type(exc).__name__}: {str(exc)[:200]}); "
                              f"delete it to resume from the one before, or pass --overwrite") from None
    return Checkpoint(path, state, trainable, optimizer, method_tensors)


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
