"""Experiment trackers (`--report-to tensorboard,wandb,trackio`) through accelerate's tracker classes.

Only the main process tracks. Each step logs `train/loss`, the method's own metrics (`train/ce`,
`train/kl`, `train/tau`, ... as they arrive in the step record), `train/lr`, `train/grad_norm`,
`train/tokens_per_s` and, at `--eval-every` steps, `eval/chat_kl`, `eval/probe_acc`, ...; the run's
flat config is stored as hyper-parameters.

Where they write, all offline-capable:
- tensorboard: event files under OUT/tensorboard/ (read them with `tensorboard --logdir OUT/tensorboard`).
  A resumed run purges the events after its checkpoint's step, so a curve has no doubled steps.
- wandb: run files under OUT/wandb/; offline (`wandb sync` later) when WANDB_MODE=offline, or when
  HF_HUB_OFFLINE=1 and WANDB_MODE is unset.
- trackio: its local database (trackio's own default location), project `--tracker-project`.

The backends are optional extras (`pip install 'ctxdistill[tensorboard]'`, `[wandb]`, `[trackio]`); a
missing one is a one-line error naming the extra, raised before any model loads.
"""

from __future__ import annotations

import importlib.util
import math
import os
import time
from pathlib import Path

from ..errors import CtxDistillError

BACKENDS = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}  # --report-to name -> module to import
NOT_METRICS = ("step", "epoch", "documents", "skipped", "elapsed_s")


def requested(report_to: str) -> list[str]:
    names = [t.strip() for t in report_to.split(",") if t.strip()]
    return [] if names == ["none"] else names


def check_available(report_to: str) -> None:
    """One line naming the extra to install for every requested backend that is missing."""
    for name in requested(report_to):
        if importlib.util.find_spec(BACKENDS[name]) is None:
            raise CtxDistillError(f"--report-to {name} needs the {name} package: pip install 'ctxdistill[{name}]'")


def step_metrics(record: dict, seconds: float | None) -> dict:
    """A losses.jsonl record as tracker scalars: train/* for the step, eval/* for the check."""
    out = {}
    for key, value in record.items():
        if key in NOT_METRICS or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        out[f"eval/{key[len('eval_'):]}" if key.startswith("eval_") else f"train/{key}"] = float(value)
    if seconds and record.get("tokens"):
        out["train/tokens_per_s"] = record["tokens"] / seconds
    return out


class Trackers:
    """The started trackers of one run (empty on other processes and under --report-to none)."""

    def __init__(self, cfg, out_dir: Path | None, is_main: bool, resumed_step: int | None, say=print):
        self.trackers = []
        self.last = time.perf_counter()
        names = requested(cfg.report_to)
        if not names or not is_main:
            return
        check_available(cfg.report_to)
        from accelerate import tracking

        run_name = Path(cfg.out).name if cfg.out else "run"
        for name in names:
            if name == "tensorboard":
                if out_dir is None:
                    raise CtxDistillError("--report-to tensorboard writes its event files under --out; give --out")
                kwargs = {"purge_step": resumed_step + 1} if resumed_step else {}
                tracker = tracking.TensorBoardTracker("", str(out_dir / "tensorboard"), **kwargs)
            elif name == "wandb":
                kwargs = {"name": run_name, "dir": str(out_dir) if out_dir else None}
                if "WANDB_MODE" not in os.environ and os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
                    kwargs["mode"] = "offline"
                if out_dir is not None:
                    (out_dir / "wandb").mkdir(exist_ok=True)
                tracker = tracking.WandBTracker(cfg.tracker_project, **kwargs)
            else:
                tracker = tracking.TrackioTracker(cfg.tracker_project, name=run_name)
            try:
                tracker.start()
            except Exception as exc:  # a tracker's own failure (login, network) stops the run before training, in one line
                raise CtxDistillError(f"--report-to {name}: could not start the tracker: {type(exc).__name__}: "
                                      f"{(str(exc).splitlines() or [''])[0][:200]}") from None
            self.trackers.append(tracker)
            try:
                tracker.store_init_configuration({k: v for k, v in cfg.flat().items() if isinstance(v, (int, float, str, bool))})
            except Exception as exc:  # the hyper-parameters are a convenience (run.json has them): warn, go on
                say(f"warning: --report-to {name}: the config was not stored as hyper-parameters ({type(exc).__name__})")

    def log(self, record: dict) -> None:
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        if not self.trackers:
            return
        values = step_metrics(record, seconds)
        for tracker in self.trackers:
            tracker.log(values, step=record["step"])

    def log_values(self, values: dict, step: int) -> None:
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def close(self) -> None:
        for tracker in self.trackers:
            try:
                tracker.finish()
            except Exception:  # closing must not hide the run's own result or error
                pass
        self.trackers = []
