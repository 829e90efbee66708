"""Exact resume: what a checkpoint must restore besides tensors, and what must match before it may.

A run resumes only when nothing that shapes its trajectory changed: the settings (all but the ones in
`RESUME_MAY_CHANGE`), the prepared corpus (fingerprint of every example) and the epoch plans (document
order and split points, which depend on seed and epoch alone).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import TrainConfig
from ..errors import CtxDistillError
from ..files import write_text_atomic
from .checkpoint import Checkpoint

# Settings that may change between a run and its resume: they do not alter the trajectory of the
# steps already planned (max_steps and epochs only move the end).
# The corpus path may change too (a moved file): its content is checked by fingerprint instead.
RESUME_MAY_CHANGE = frozenset({
    "out", "overwrite", "resume", "save_model", "merge_lora", "log_every", "checkpoint_every", "keep_checkpoints",
    "max_steps", "epochs", "on_nonfinite", "device", "gen_batch_size", "gen_cache", "corpus", "allow_pickle_weights", "threads",
    # watching the run (trackers, the check during training, where the model goes) does not steer it
    "report_to", "tracker_project", "eval_every", "eval_prompts", "eval_max_new_tokens", "eval_probes", "eval_probe_limit",
    "stop_at_drift", "push_to_hub",
})


@dataclass
class TrainState:
    """The loop's position and tallies: what a checkpoint restores besides tensors and RNG states."""

    step: int = 0
    counts: dict = field(default_factory=lambda: {"steps": 0, "optimizer_steps": 0, "skipped_steps": 0, "documents": 0,
                                                  "student_tokens": 0, "teacher_tokens": 0})
    skipped: list = field(default_factory=list)  # [{"step", "documents", "reason"}] under on_nonfinite skip
    seconds: dict = field(default_factory=dict)  # LossOutput.seconds summed over the run (this process)


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


def check_compatible(state: dict, config: dict, path: Path) -> None:
    """Refuse a resume whose settings would change the trajectory of the checkpointed run."""
    saved = trajectory_config(state.get("config", {}))
    now = trajectory_config(config)
    # An option added after the checkpoint was written, left at its default, cannot change the trajectory.
    defaults = TrainConfig().flat()
    added = {k for k in now if k not in saved and k in defaults and now[k] == defaults[k]}
    changed = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k) and k not in added]
    if changed:
        detail = ", ".join(f"{k} (checkpoint: {saved.get(k)!r}, now: {now.get(k)!r})" for k in changed[:4])
        raise CtxDistillError(f"cannot resume from {path}: settings differ: {detail}; rerun with the checkpoint's settings, "
                              f"or pass --overwrite (or another --out) to start a new run")


def restore_state(resumed: Checkpoint, fingerprints: dict, path: Path) -> TrainState:
    saved = resumed.state
    if saved.get("fingerprints", {}).get("corpus") != fingerprints["corpus"]:
        raise CtxDistillError(f"cannot resume from {path}: the corpus or its tokenisation changed since the checkpoint was written; "
                              f"restore the original input, or pass --overwrite to start again")
    old_plans, new_plans = saved["fingerprints"]["plans"], fingerprints["plans"]
    if new_plans[: len(old_plans)] != old_plans[: len(new_plans)]:
        raise CtxDistillError(f"cannot resume from {path}: the document order or split points would differ from the checkpointed run")
    return TrainState(step=saved["step"], counts=dict(saved["counts"]), skipped=list(saved.get("nonfinite_skipped", [])),
                      seconds=dict(saved.get("seconds", {})))


def restore_random_state(resumed: Checkpoint | None, rt, seed: int, step: int, say) -> None:
    """The checkpoint's RNG states when the process count matches; otherwise fresh per-process streams.

    Data order and split points never depend on these (epoch plans come from (seed, epoch) alone); dropout
    masks and sampling do."""
    from .checkpoint import restore_rng

    rng_states = resumed.state.get("rng") if resumed is not None else None
    if rng_states and len(rng_states) == rt.world:
        restore_rng(rng_states[rt.rank])
        return
    if rng_states:
        say(f"warning: the checkpoint was written by {len(rng_states)} process(es), this run has {rt.world}: "
            f"data order and split points continue exactly, dropout masks do not")
    # dropout and sampling streams: per process, and independent of how much randomness loading consumed
    random.seed(seed + rt.rank)
    torch.manual_seed(seed + rt.rank + 1_000_003 * step)


def load_trainable(model, tensors: dict, trainable_names: list[str], path: Path) -> None:
    params = dict(model.named_parameters())
    if sorted(tensors) != sorted(trainable_names):
        missing = sorted(set(trainable_names) - set(tensors))[:3]
        extra = sorted(set(tensors) - set(trainable_names))[:3]
        raise CtxDistillError(f"checkpoint {path} does not match this model (missing {missing}, unexpected {extra}); "
                              f"resume with the same --model and --student, or pass --overwrite")
    with torch.no_grad():
        for name, value in tensors.items():
            if params[name].shape != value.shape:
                raise CtxDistillError(f"checkpoint {path}: {name} has shape {tuple(value.shape)}, the model {tuple(params[name].shape)}")
            params[name].copy_(value)


def truncate_losses(path: Path, step: int) -> None:
    """Drop losses.jsonl lines written after the checkpoint (the steps will be run again)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            break  # a line cut by the kill: everything after it is stale
    write_text_atomic(path, "".join(line + "\n" for line in kept))
