"""Learning-rate schedules through transformers' `get_scheduler`, checkpointed with the run.

`--lr-scheduler constant` (the default, the DiSC authors') builds no scheduler at all, so a default run
is the same computation it always was. The others (`linear`, `cosine`, `constant_with_warmup`) are the
`LambdaLR` schedules of `transformers.get_scheduler`, with `--warmup-steps` (or `--warmup-ratio` of the
run's optimizer steps, rounded up) of linear warm-up. The scheduler steps once per optimizer step,
skipped non-finite steps included, so the learning rate of step k is the schedule's value at k.

A checkpoint stores the scheduler's `state_dict` (JSON: its step count and last rates) and the total
it was built for; a resume rebuilds the same schedule and loads that state, so the learning rates after
a resume are exactly those of an uninterrupted run. A linear or cosine decay depends on the run's
length: resuming with a different `--max-steps` / `--epochs` is refused for those.
"""

from __future__ import annotations

import math

from ..errors import CtxDistillError


def warmup_steps(cfg, total_steps: int) -> int:
    if cfg.warmup_steps > 0:
        return cfg.warmup_steps
    return math.ceil(cfg.warmup_ratio * total_steps)


class LRSchedule:
    """The run's scheduler (None under `constant`), its checkpoint form and its restore."""

    def __init__(self, cfg, optimizer, total_steps: int):
        self.name, self.total = cfg.lr_scheduler, int(total_steps)
        self.warmup = warmup_steps(cfg, total_steps)
        self.scheduler = None
        if self.name != "constant":
            from transformers import get_scheduler

            self.scheduler = get_scheduler(self.name, optimizer, num_warmup_steps=self.warmup, num_training_steps=max(self.total, 1))

    def step(self) -> None:
        if self.scheduler is not None:
            self.scheduler.step()

    def checkpoint_state(self) -> dict:
        if self.scheduler is None:
            return {}
        return {"lr_scheduler": {"name": self.name, "warmup_steps": self.warmup, "total_steps": self.total,
                                 "state": _json_safe(self.scheduler.state_dict())}}

    def restore(self, saved: dict, path) -> None:
        """Load the checkpoint's scheduler state (the optimizer's current rates come with its own state)."""
        if self.scheduler is None:
            return
        entry = saved.get("lr_scheduler")
        if entry is None:
            raise CtxDistillError(f"cannot resume from {path}: it was written without a learning-rate scheduler; rerun with its settings, "
                                  f"or pass --overwrite to start again")
        decays = self.name in ("linear", "cosine")
        if entry["warmup_steps"] != self.warmup or (decays and entry["total_steps"] != self.total):
            raise CtxDistillError(f"cannot resume from {path}: the {self.name} schedule was built for {entry['total_steps']} steps with "
                                  f"{entry['warmup_steps']} warm-up steps, this run has {self.total} and {self.warmup}; keep --max-steps, "
                                  f"--epochs and the warm-up of the checkpointed run, or pass --overwrite")
        self.scheduler.load_state_dict(entry["state"])
        # building the scheduler set the rates to the schedule's start; put back those of the checkpointed step
        for group, lr in zip(self.scheduler.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr


def _json_safe(state: dict) -> dict:
    """LambdaLR's state_dict holds plain numbers and lists (its lambdas are stored as None)."""
    return {k: v for k, v in state.items() if isinstance(v, (int, float, str, bool, list, type(None)))}
