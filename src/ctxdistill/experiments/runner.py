"""The one train-then-evaluate runner behind sweeps, study stages, continual rounds and the demo.

`Baseline` is the initial model: evaluated once per experiment directory (by shard 0 when several
processes share it, or by the first shard that needs it while no process is evaluating it), loaded once
per process, and its greedy chat replies are the reference every run's drift is measured against. `train_then_evaluate` trains one run, scores the model in memory
against that baseline and frees it, so a long sweep holds at most one trained model at a time.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import CtxDistillError
from ..runtime import release_memory


class Baseline:
    """The initial model of an experiment, its evaluation in `directory`/eval.json and its chat replies."""

    def __init__(self, model: str, directory: Path, eval_cfg, device, shard: int = 0):
        self.model_name, self.directory, self.eval_cfg, self.device, self.shard = model, Path(directory), eval_cfg, device, shard
        self._model = None
        self.tokenizer, self.label = None, ""  # set by evaluate_if_needed, before any wait
        self._responses: tuple | None = None
        self._loaded_responses = False

    @property
    def eval_path(self) -> Path:
        return self.directory / "eval.json"

    def model(self):
        """The initial model in fp32 on the experiment's device, loaded on first use."""
        if self._model is None:
            import torch

            from ..models import load_model

            self._model = load_model(self.model_name, dtype=torch.float32).to(self.device)
        return self._model

    def evaluate_if_needed(self, tokenizer, log=print, label: str = "") -> None:
        """Shard 0 evaluates the initial model once; other shards go on training and meet it in `responses`."""
        self.tokenizer, self.label = tokenizer, label
        if self.eval_path.is_file():
            log(f"{label}baseline already evaluated")
        elif self.shard == 0:
            self._evaluate_unless_locked(log)

    def _evaluate_unless_locked(self, log) -> bool:
        """Evaluate the initial model here unless another process holds the baseline directory's lock (it is
        evaluating it); False when it does. The kernel drops a dead holder's lock, so nobody waits on a corpse."""
        from ..evaluate.suite import evaluate_model
        from ..files import OutputLock

        try:
            lock = OutputLock(self.directory, "baseline directory").acquire()
        except CtxDistillError:
            return False
        try:
            if not self.eval_path.is_file():  # another process may have finished it between our look and the lock
                log(f"{self.label}evaluating the initial model {self.model_name} (baseline)")
                evaluate_model(self.model(), self.tokenizer, self.eval_cfg, run_info={"method": "initial", "lr": 0.0, "seed": None}, log=log)
        finally:
            lock.release()
        return True

    def wait_or_evaluate(self, log=print, poll_s: float = 10.0) -> None:
        """Return once the baseline's eval.json exists. A shard that needs it waits while another process
        evaluates it, and evaluates it itself when nobody does (shard 0 busy with a `one_process` domain,
        stopped, or never started), instead of idling."""
        waiting = False
        while not self.eval_path.is_file():
            if self._evaluate_unless_locked(log):
                return
            if not waiting:
                log(f"waiting for {self.eval_path} (another process is evaluating the initial model)")
                waiting = True
            time.sleep(poll_s)

    def responses(self, log=print) -> tuple | None:
        """The initial model's greedy chat replies, once its evaluation exists."""
        from ..evaluate.drift import load_responses

        if not self._loaded_responses:
            self.wait_or_evaluate(log)
            path = self.directory / "reference_responses.jsonl"
            self._responses = load_responses(path) if path.is_file() else None
            self._loaded_responses = True
        return self._responses


def train_then_evaluate(train_cfg, evaluate, progress: bool = True, log=print) -> dict:
    """Train one run with `train_cfg`, then `evaluate(result)` with the trained model in memory; frees it after.

    Returns what `evaluate` returned; `run_info(train_cfg, result)` gives the settings an evaluation records.
    """
    from ..training import train

    result = train(train_cfg, progress=progress, log=log)
    try:
        return evaluate(result)
    finally:
        del result
        release_memory()


def run_info(train_cfg, result, **extra) -> dict:
    """What an evaluation records about the run it scores (eval.json `run`)."""
    return {"base_method": train_cfg.method, "lr": train_cfg.lr, "seed": train_cfg.seed, "train_config": train_cfg.flat(),
            "train_s": result.summary["timings_s"]["train"], "steps": result.summary["counts"]["steps"]} | extra
