"""What the Trainer does around its steps for the ecosystem's habits (docs/ecosystem.md): the LR schedule,
experiment trackers, the check during training and its forgetting budget, model cards, the Hub upload.

The Trainer calls, in order: `preflight` (before any model loads), `Extensions(trainer, student)`
(the initial weights are still in place: the check's reference is taken here), `start(resumed)` (after
the optimizer and a checkpoint are loaded), `on_step(record)` after every step, `checkpoint_state()`
in every checkpoint, `finish(summary)` before the model is saved, `after_save(summary)` after, and
`close()` always.
"""

from __future__ import annotations


import torch

from ..errors import CtxDistillError
from .schedule import LRSchedule
from .tracking import Trackers, check_available


class DriftBudgetExceeded(Exception):
    """Raised out of the step loop once the check's drift exceeds --stop-at-drift."""


def preflight(cfg, tokenizer) -> None:
    """One-line refusals before any weights load: a missing tracker, a teacher with another vocabulary,
    an upload that cannot happen."""
    from ..model_card import check_push
    from ..teachers import check_teacher_tokenizer

    check_available(cfg.report_to)
    check_teacher_tokenizer(cfg, tokenizer)
    check_push(cfg.push_to_hub)


class Extensions:
    def __init__(self, trainer, student):
        from .live_eval import DriftCheck

        self.trainer, self.cfg = trainer, trainer.cfg
        self.check = DriftCheck(self.cfg, student, trainer.tokenizer, trainer.rt.device, trainer.say) if self.cfg.eval_every else None
        self.evals: list[dict] = []  # {"step", "chat_kl", ...} of every check, restored on resume
        self.stopped: dict | None = None
        self.checkpoint_now = False
        self.schedule: LRSchedule | None = None
        self.trackers: Trackers | None = None

    def start(self, resumed) -> None:
        t, cfg = self.trainer, self.cfg
        if cfg.stop_at_drift and t.rt.sharded:
            raise CtxDistillError("--stop-at-drift reloads a checkpoint into the student at the end, which this version does under "
                                  "one process or data parallelism only (not FSDP / DeepSpeed)")
        self.schedule = LRSchedule(cfg, t.raw_optimizer, t.total_steps)
        if resumed is not None:
            self.schedule.restore(resumed.state, t.resume_from)
            self.evals = list(resumed.state.get("evals", []))
        self.trackers = Trackers(cfg, t.out_dir, t.rt.is_main, t.state.step if resumed is not None else None, t.say)

    # -- every step ---------------------------------------------------------------------------------

    def on_step(self, record: dict) -> None:
        """The step's learning rate into its record, the schedule's step, the check when due, the trackers."""
        t, cfg = self.trainer, self.cfg
        record["lr"] = t.raw_optimizer.param_groups[0]["lr"]
        self.schedule.step()
        self.checkpoint_now = False
        step = t.state.step
        if self.check is not None and step % cfg.eval_every == 0:
            metrics = self.check.run(t.student)
            values = torch.tensor([metrics[k] for k in sorted(metrics)], dtype=torch.float64)
            values = t.rt.all_sum(values) / t.rt.world  # the same on every process; averaged so all decide alike
            metrics = dict(zip(sorted(metrics), values.tolist()))
            record |= metrics
            entry = {"step": step} | {k[len("eval_"):]: v for k, v in metrics.items()}
            self.evals.append(entry)
            t.say(f"step {step}: chat drift KL {entry['chat_kl']:.4f} nats/token" +
                  (f", probe accuracy {entry['probe_acc']:.3f}" if "probe_acc" in entry else ""))
            if cfg.stop_at_drift:
                if entry["chat_kl"] > cfg.stop_at_drift:
                    self.stopped = {"step": step, "chat_kl": entry["chat_kl"], "threshold": cfg.stop_at_drift}
                elif t.out_dir is not None:
                    self.checkpoint_now = True  # a step under the budget: the model to fall back to
        self.trackers.log(record)

    def check_budget(self) -> None:
        if self.stopped is not None:
            raise DriftBudgetExceeded()

    def checkpoint_state(self) -> dict:
        return self.schedule.checkpoint_state() | {"evals": self.evals}

    # -- the end ------------------------------------------------------------------------------------

    def finish(self, summary: dict) -> None:
        """Record the checks; after a stop at the drift budget, put the kept weights back into the student."""
        if self.evals:
            summary["evaluations"] = self.evals
        if self.stopped is None:
            return
        from . import checkpoint as ckpt
        from .resume import load_trainable

        t, budget = self.trainer, self.cfg.stop_at_drift
        good = {e["step"]: e["chat_kl"] for e in self.evals if e["chat_kl"] <= budget}
        kept = [(step, path) for step, path in ckpt.list_checkpoints(t.out_dir) if step in good]
        if kept:
            step, path = kept[-1]
            load_trainable(t.unwrapped, ckpt.load_checkpoint(path).trainable, t.trainable_names, path)
            reason = (f"the check at step {self.stopped['step']} measured {self.stopped['chat_kl']:.4f} nats/token > {budget}; "
                      f"the model saved is the checkpoint of step {step} ({good[step]:.4f} nats/token)")
        elif good and max(good) > 0:
            raise CtxDistillError(f"--stop-at-drift: the checkpoint of step {max(good)} (the last under the budget) was pruned; "
                                  f"raise --keep-checkpoints; the checkpoints in {t.out_dir / ckpt.CHECKPOINTS} are intact")
        else:
            step = 0
            self.restore_initial_weights()
            reason = (f"the first check, at step {self.stopped['step']}, measured {self.stopped['chat_kl']:.4f} nats/token > {budget}; "
                      f"the model saved is the initial model (step 0)")
        summary["stopped_at_drift"] = self.stopped | {"kept_step": step, "kept_chat_kl": good.get(step, 0.0), "reason": reason}
        t.say(f"stopped at the drift budget: {reason}")

    def restore_initial_weights(self) -> None:
        from .loop import build_student

        t = self.trainer
        fresh = dict(build_student(self.cfg.replace(compile=False, gradient_checkpointing=False), torch.device("cpu")).named_parameters())
        with torch.no_grad():
            for name, p in t.unwrapped.named_parameters():
                if p.requires_grad:
                    p.copy_(fresh[name].to(p.device))

    def after_save(self, summary: dict) -> None:
        """Model cards in every saved directory (main process), then the Hub upload. Collective.

        An upload failure after a finished training is a warning recorded in run.json `push_to_hub`,
        not an error: the model, its card and run.json are all written."""
        from ..files import disk_error
        from ..model_card import corpus_info, push_to_hub, write_cards

        t, error = self.trainer, None
        if t.rt.is_main and summary.get("saved"):
            try:
                summary["model_cards"] = write_cards(self.cfg, summary, corpus_info(self.cfg.corpus, t.documents))
            except OSError as exc:
                error = disk_error("the model card", exc, "the saved model is intact")
            if error is None and self.cfg.push_to_hub:
                try:
                    summary["push_to_hub"] = {"repo": self.cfg.push_to_hub, "commit": push_to_hub(summary["saved"]["model"], self.cfg.push_to_hub, t.say)}
                except CtxDistillError as exc:
                    summary["push_to_hub"] = {"repo": self.cfg.push_to_hub, "error": str(exc)}
                    t.say(f"warning: {exc}")
        t.rt.raise_if_any(error, "write the model cards")

    def close(self) -> None:
        if self.trackers is not None:
            self.trackers.close()

