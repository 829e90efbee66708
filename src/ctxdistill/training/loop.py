"""The one training loop shared by every method: data order, precision, optimizer step, logging, saving.

Methods only return losses (`methods/base.py`); this file owns the optimizer and the device. Read
`Trainer` top to bottom: `setup` (models, teacher, data plan, optimizer, resume), `run` (epochs and
steps), `step` (one optimizer step over a global batch), `checkpoint` / `finish` (what is written).

The same loop runs in one process (`ctxdistill train`, the Python API) and in several (`torchrun`,
`accelerate launch`; training/distributed.py):

- Every process computes the same epoch plan (document order and split points depend only on seed
  and epoch). A step's global batch is `docs_per_step` consecutive items; process r takes items
  r, r+W, r+2W, ... of it and runs them one after another (gradient accumulation).
- Each item's loss is weighted so that the step's gradient is the mean over the GLOBAL batch:
  1/docs_per_step per item (`loss_normalization document`), or its distilled-token count divided by
  the global token count (`token`, counted across accumulation steps and processes). 2 processes
  x 1 item therefore give the same step as 1 process accumulating 2 items.
- FSDP and DeepSpeed: every process runs the same number of forward passes (short batches are padded
  with zero-weight items).
- Only the main process logs and writes; checkpoints carry every process's RNG state.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import TrainConfig
from ..errors import CtxDistillError, TrainingInterrupted
from ..files import fingerprint
from ..methods import Method, PrepareContext, get_method
from ..models import apply_lora, choose_attention, load_model, load_tokenizer
from ..runtime import autocast, launched_world_size, release_memory, set_threads, versions
from ..teachers import Teacher, build_teacher
from . import checkpoint as ckpt
from . import distributed as dist
from .extensions import DriftBudgetExceeded, Extensions, preflight
from .packing import forward_units
from .outputs import LossLog, open_output, run_summary, save_final, write_summary
from .resume import TrainState, check_compatible, load_trainable, plan_fingerprint, restore_random_state, restore_state
from .signals import StopSignals


@dataclass
class TrainResult:
    model: torch.nn.Module
    tokenizer: object
    summary: dict
    out_dir: Path | None


def epoch_items(method: Method, examples: list, seed: int, epoch: int) -> list:
    """The epoch's document order and split points, drawn from (seed, epoch) alone.

    Independent of anything that happened earlier in the run, so a resumed run, every process of a
    distributed run and a teacher cache see exactly the items training will read.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(examples)))
    rng.shuffle(order)
    return [item for i in order for item in method.plan(examples[i], rng)]


def build_student(cfg: TrainConfig, device: torch.device):
    model = load_model(cfg.model, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code, allow_pickle_weights=cfg.allow_pickle_weights)
    if cfg.student == "lora":
        targets = cfg.lora_targets if cfg.lora_targets == "all-linear" else [t.strip() for t in cfg.lora_targets.split(",")]
        model = apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, targets)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = model.to(device)
    model._ctxdistill_attention = choose_attention(model, device) if cfg.packing != "off" else model.config._attn_implementation
    if cfg.compile:  # the decoder: DiSC's chunked path calls it directly, the plain forward calls it too
        decoder = model.get_decoder()
        decoder.forward = torch.compile(decoder.forward, dynamic=True)
    return model


def train(cfg: TrainConfig, progress: bool = True, log=print) -> TrainResult:
    """Train a student with `cfg.method` on `cfg.corpus`; write model, run.json and losses.jsonl.

    Resumes from the latest checkpoint in `cfg.out` when there is one (see `TrainConfig.resume`).
    """
    cfg = cfg.validate()
    set_threads(cfg.threads)
    trainer = Trainer(cfg, progress, log)
    try:
        trainer.setup()
        trainer.run()
        result = trainer.finish()
    except BaseException:
        trainer.close(failed=True)  # OUT is released, and removed when this run created it and wrote nothing
        raise
    trainer.close()
    # The trainer sits in reference cycles, so without a collection its optimizer state, gradients and frozen
    # teacher outlive it, into the evaluation a sweep runs next (gigabytes for a full fine-tune of a 0.5B model).
    del trainer
    release_memory()
    return result


class Trainer:
    """One training run: setup, the steps, the outputs."""

    def __init__(self, cfg: TrainConfig, progress: bool = True, log=print):
        self.cfg, self.log = cfg, log
        self.started = time.perf_counter()
        self.method = get_method(cfg)
        self.documents, self.corpus_report = self.method.load()  # the input is validated before any model loads
        self.micro_steps = math.ceil(cfg.docs_per_step / launched_world_size())
        self.rt = dist.create_runtime(cfg.device, self.micro_steps, cfg.cudnn_attention)
        self.say = log if self.rt.is_main else (lambda *args, **kwargs: None)
        self.progress = progress and self.rt.is_main
        dist.check_engine_support(cfg, self.rt)
        for line in self.corpus_report.summary():
            self.say(f"corpus: {line}")
        # the model source exists before --out is touched
        self.tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
        preflight(cfg, self.tokenizer)  # trackers installed, the teacher's vocabulary, a possible upload
        self.run_dir, self.resume_from = open_output(cfg, self.rt)
        self.out_dir = self.run_dir.path if self.run_dir else None
        self.state = TrainState()
        self.signals: StopSignals | None = None
        self.stop_requested = False
        self.losses: LossLog | None = None
        self.extras: Extensions | None = None

    # -- setup ------------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg, rt, method = self.cfg, self.rt, self.method
        device = rt.device
        resumed = ckpt.load_checkpoint(self.resume_from) if self.resume_from is not None else None
        if resumed is not None:
            check_compatible(resumed.state, cfg.flat(), self.resume_from)
            if resumed.optimizer is None:
                raise CtxDistillError(f"checkpoint {self.resume_from} holds no optimizer state (written under DeepSpeed), so the run "
                                      f"cannot continue exactly; pass --overwrite to start again")
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)

        build_device = device if not rt.sharded else torch.device("cpu")
        with rt.accelerator.main_process_first():  # the first process fills shared caches (dequantized models, generations)
            student = build_student(cfg, build_device)
            ctx = PrepareContext(self.tokenizer, cfg, student, build_device, self.out_dir if rt.is_main else None, self.progress, self.say)
            prepared = method.prepare(self.documents, ctx)
        for reason, where in prepared.skipped.items():
            if where:
                self.say(f"{method.name}: skipped {len(where)} {reason} document(s): {', '.join(where[:3])}")
        if not prepared.examples:
            raise CtxDistillError(f"no document is usable by {method.name} ({method.input_format})")
        self.prepared = prepared

        self.plans = [epoch_items(method, prepared.examples, cfg.seed, e) for e in range(cfg.epochs)]
        steps_per_epoch = math.ceil(len(self.plans[0]) / cfg.docs_per_step) if self.plans[0] else 0
        self.total_steps = min(steps_per_epoch * cfg.epochs, cfg.max_steps or math.inf)
        self.fingerprints = {"corpus": fingerprint(prepared.examples), "plans": plan_fingerprint(self.plans)}

        self.names = {id(p): n for n, p in student.named_parameters()}
        self.trainable_names = [n for n, p in student.named_parameters() if p.requires_grad]
        # the teacher first: a teacher cache is checked against the INITIAL weights, before a checkpoint replaces them
        teacher = build_teacher(cfg, student, device, prepared.examples) if method.needs_teacher() else None
        self.extras = Extensions(self, student)  # before a checkpoint's weights: the check's reference is the initial model
        if resumed is not None:
            self.state = restore_state(resumed, self.fingerprints, self.resume_from)
            load_trainable(student, resumed.trainable, self.trainable_names, self.resume_from)
            method_json = resumed.state.get("method_state") or [{}] * rt.world
            method.load_state_dict({"tensors": resumed.method_tensors, "json": method_json[rt.rank % len(method_json)]}, teacher)
            self.say(f"resuming from {self.resume_from} (step {self.state.step} of {self.total_steps})")
        self.load_seconds = time.perf_counter() - self.started - prepared.generation.get("seconds", 0.0)

        trainable = [p for p in student.parameters() if p.requires_grad]
        # The fused AdamW kernel is ~5x faster than the foreach one on CPU for a 135M model, where the
        # optimizer step otherwise costs more than the forward+backward of a short document.
        optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay,
                                      fused=device.type in ("cpu", "cuda") and not rt.sharded)
        self.raw_optimizer, self.unwrapped = optimizer, student
        if rt.sharded:
            student, optimizer = dist.prepare_sharded(rt, cfg.docs_per_step, cfg.grad_clip, student, optimizer)
            self.raw_optimizer = getattr(optimizer, "optimizer", optimizer)
            if isinstance(teacher, Teacher) and teacher.student is not None:
                teacher = Teacher(student=student)  # the adapter-disabled pass goes through the sharding wrapper
            teacher = dist.shard_teacher(cfg, rt, teacher)  # FSDP2: a full-FT teacher is sharded too (docs/distributed.md)
        self.student, self.optimizer, self.teacher = student, optimizer, teacher
        self.params = list(student.parameters())
        if resumed is not None:
            dist.load_optimizer(rt, student, self.raw_optimizer, resumed.optimizer, self.names)
        restore_random_state(resumed, rt, self.cfg.seed, self.state.step, self.say)
        self.last_saved = self.state.step if self.out_dir else None
        self.losses = LossLog(self.out_dir if rt.is_main else None, self.state.step if resumed is not None else None)
        self.resumed = resumed
        self.extras.start(resumed)  # the LR schedule (restored), the trackers

    # -- the steps --------------------------------------------------------------------------------

    def run(self) -> None:
        cfg, state = self.cfg, self.state
        self.train_started = time.perf_counter()
        self.student.train()
        bar = tqdm(total=self.total_steps, initial=min(state.step, self.total_steps), desc=self.method.name, unit="step",
                   disable=not self.progress, dynamic_ncols=True)
        try:
            with StopSignals() as signals:
                self.signals = signals
                step_index = 0
                for epoch, items in enumerate(self.plans):
                    for first in range(0, len(items), cfg.docs_per_step):
                        if step_index >= self.total_steps:
                            break
                        step_index += 1
                        if step_index <= state.step:  # done before the checkpoint this run resumed from
                            continue
                        record = self.step(items[first : first + cfg.docs_per_step], epoch)
                        self.extras.on_step(record)  # lr, schedule, the check when due, trackers
                        elapsed = time.perf_counter() - self.train_started
                        bar.set_postfix(epoch=epoch + 1, loss=f"{record['loss']:.4f}", tok_s=f"{state.counts['student_tokens'] / max(elapsed, 1e-9):.0f}")
                        bar.update(1)
                        if state.step % cfg.log_every == 0 or "eval_chat_kl" in record:
                            self.losses.write(record | {"elapsed_s": round(elapsed, 3)})
                        self.extras.check_budget()
                        self.after_step()
        except DriftBudgetExceeded:
            pass  # the run ends here; finish() saves the last checkpoint under the budget
        finally:
            bar.close()
            self.losses.close()
        self.train_seconds = time.perf_counter() - self.train_started
        self.student.eval()

    def my_slots(self, group_size: int) -> list[int | None]:
        """Indices into the global batch that this process runs; None pads sharded engines to equal counts."""
        slots: list[int | None] = list(range(self.rt.rank, group_size, self.rt.world))
        if self.rt.sharded:
            slots += [None] * (math.ceil(self.cfg.docs_per_step / self.rt.world) - len(slots))
        return slots

    def step(self, group: list, epoch: int) -> dict:
        """One optimizer step over the global batch `group`: forward/backward of this process's share,
        gradients summed and normalised over the global batch, a non-finite check, the update."""
        cfg, rt, state = self.cfg, self.rt, self.state
        rng_before = ckpt.capture_rng() if self.out_dir is not None else None
        if any(self.method.resets_optimizer(item) for item in group):
            self.raw_optimizer.state.clear()
        self.optimizer.zero_grad(set_to_none=True)
        slots = self.my_slots(len(group))
        # [sum of weighted losses, sum of weights, student tokens, teacher tokens, stop requested, non-finite flag per item]
        info = torch.zeros(5 + len(group), dtype=torch.float64)
        metrics: dict[str, list[float]] = {}  # name -> [sum over items, items]
        counts: dict[str, int] = {}
        step_seconds: dict[str, float] = {}
        engine_scale = rt.world if rt.sharded else 1  # FSDP and DeepSpeed average gradients over processes
        if rt.mode == "deepspeed":
            engine_scale *= len(slots)  # DeepSpeed also divides by its accumulation steps
        token_mode = cfg.loss_normalization == "token"
        for unit in forward_units(cfg, self.method, rt, group, slots):  # this process's share of the global batch
            out = self.loss_step(group, unit, engine_scale, token_mode)
            if unit[0] is None:
                continue
            value = out.loss.item()
            if not math.isfinite(value):
                for slot in unit:
                    info[5 + slot] = 1
            weight = float(out.student_tokens) if token_mode else float(len(unit))
            info[0] += value * weight
            info[1] += weight
            info[2] += out.student_tokens
            info[3] += out.teacher_tokens
            for name, v in out.metrics.items():
                total = metrics.setdefault(name, [0.0, 0])
                total[0] += float(v) * len(unit)
                total[1] += len(unit)
            for name, n in out.counts.items():
                counts[name] = counts.get(name, 0) + int(n)
            for name, seconds in out.seconds.items():
                step_seconds[name] = step_seconds.get(name, 0.0) + float(seconds)
        if self.signals is not None and self.signals.received is not None:
            info[4] = 1
        info = rt.all_sum(info)
        if rt.world > 1:  # metric names differ between methods: merge them as JSON
            metrics, counts = dist.merge_step_logs(rt.gather_json({"metrics": metrics, "counts": counts}))
        if rt.mode == "data_parallel":
            dist.all_reduce_gradients(rt, self.params)
        if token_mode and rt.mode != "deepspeed":
            scale = 1.0 / max(info[1].item(), 1.0)
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(scale)
        grad_norm = self.clip()
        step_number = state.step + 1
        bad_docs = [group[i].doc_id for i in range(len(group)) if info[5 + i] > 0]
        grad_ok = grad_norm is None or math.isfinite(float(grad_norm))
        record = {"step": step_number, "epoch": epoch + 1, "loss": info[0].item() / max(info[1].item(), 1e-12),
                  "grad_norm": float(grad_norm) if grad_norm is not None else None, "tokens": int(info[2].item()),
                  "documents": [i.doc_id for i in group]}
        record |= {name: total / max(n, 1) for name, (total, n) in sorted(metrics.items())}
        self.stop_requested = bool(info[4].item())
        if bad_docs or not grad_ok:
            return self.nonfinite_step(record, bad_docs, rng_before)
        self.optimizer.step()
        state.step += 1
        self.method.after_step(self.unwrapped, self.teacher, state.step)
        for name, seconds in step_seconds.items():
            state.seconds[name] = state.seconds.get(name, 0.0) + seconds
        for name, n in (("steps", 1), ("optimizer_steps", 1), ("documents", len(group)), ("student_tokens", int(info[2].item())),
                        ("teacher_tokens", int(info[3].item()))):
            state.counts[name] += n
        for name, n in counts.items():  # counts the method reported (e.g. DiSC on context-sensitive positions)
            state.counts[name] = state.counts.get(name, 0) + n
        return record

    def loss_step(self, group: list, unit: list[int | None], engine_scale: int, token_mode: bool):
        """Forward and backward of one pass: one item, or several packed into the method's batched loss."""
        cfg, rt = self.cfg, self.rt
        if len(unit) > 1:  # several documents in one forward pass: the loss is their mean (Method.batch_loss)
            with autocast(rt.device, cfg.precision):
                out = self.method.batch_loss(self.student, self.teacher, [group[i] for i in unit], rt.device)
            self.backward(out.loss * (len(unit) / len(group)))
            return out
        slot = unit[0]
        with self.accumulate():
            with autocast(rt.device, cfg.precision):
                out = self.method.loss(self.student, self.teacher, group[slot if slot is not None else 0], rt.device)
            if slot is None:
                self.backward(out.loss * 0.0)  # padding: the same forward passes as the other processes, no contribution
            elif token_mode:  # weighted by its tokens; divided by the global token count once it is known
                self.backward(out.loss * (out.student_tokens * engine_scale))
            else:
                self.backward(out.loss / (len(group) / engine_scale))
        return out

    def nonfinite_step(self, record: dict, bad_docs: list[str], rng_before: dict | None) -> dict:
        state, step_number = self.state, record["step"]
        what = (f"non-finite loss at step {step_number} on document {', '.join(bad_docs)}" if bad_docs else
                f"non-finite gradient at step {step_number} (documents {', '.join(record['documents'])})")
        if self.cfg.on_nonfinite == "skip":
            self.optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.counts["steps"] += 1
            state.counts["skipped_steps"] += 1
            state.skipped.append({"step": step_number, "documents": bad_docs or record["documents"],
                                  "reason": "loss" if bad_docs else "gradient"})
            self.say(f"warning: {what}; step skipped (--on-nonfinite skip)")
            return record | {"skipped": True}
        where = self.save_last_good(rng_before)
        raise CtxDistillError(f"{what}; {where}lower the learning rate, or rerun with --on-nonfinite skip to skip such steps")

    def accumulate(self):
        if self.rt.mode == "deepspeed":
            return self.rt.accelerator.accumulate(self.student)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        if self.rt.sharded:
            self.rt.accelerator.backward(loss)
        else:
            loss.backward()

    def clip(self):
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        if self.rt.sharded:
            norm = self.rt.accelerator.clip_grad_norm_(self.student.parameters(), max_norm)
            return norm if norm is None or not torch.is_tensor(norm) else norm.item()
        grads = [p for p in self.params if p.grad is not None]
        if not grads:
            return 0.0
        return torch.nn.utils.clip_grad_norm_(grads, max_norm).item()

    # -- checkpoints and outputs ------------------------------------------------------------------

    def after_step(self) -> None:
        if self.out_dir is None:
            if self.stop_requested:
                raise TrainingInterrupted(self.signals.received, f"interrupted at step {self.state.step}; no --out, nothing saved")
            return
        every = self.cfg.checkpoint_every
        if self.stop_requested or (every and self.state.step % every == 0) or self.extras.checkpoint_now:
            path = self.checkpoint()
            if self.stop_requested:
                raise TrainingInterrupted(self.signals.received, f"stopped by {self.signals.name()} after step {self.state.step}; "
                                                                 f"checkpoint saved to {path}; rerun the same command to resume")

    def checkpoint(self, rng_local: dict | None = None) -> Path | None:
        """Write a checkpoint of the current state (collective: every process takes part)."""
        rt, state = self.rt, self.state
        rngs = rt.gather_json(rng_local if rng_local is not None else ckpt.capture_rng())
        trainable = dist.gather_trainable(rt, self.student, self.unwrapped, self.trainable_names)
        optimizer_state = dist.gather_optimizer(rt, self.student, self.raw_optimizer, self.names)
        method_state = self.method.state_dict(self.teacher)
        method_json = rt.gather_json(method_state["json"])
        path, error = None, None
        if rt.is_main:
            try:
                path = ckpt.save_checkpoint(self.out_dir, state.step, trainable, optimizer_state, {
                    "counts": state.counts, "nonfinite_skipped": state.skipped, "seconds": state.seconds, "rng": rngs,
                    "world_size": rt.world, "mode": rt.mode, "config": self.cfg.flat(), "fingerprints": self.fingerprints,
                    "versions": versions(), "method_state": method_json,
                } | self.extras.checkpoint_state(), self.cfg.keep_checkpoints, method_state["tensors"])
            except CtxDistillError as exc:
                error = exc
        rt.raise_if_any(error, "write a checkpoint")
        self.last_saved = state.step
        return path

    def save_last_good(self, rng_before: dict | None) -> str:
        """On a non-finite step: the weights are still those of the last good step; checkpoint them."""
        if self.out_dir is None or self.rt.mode == "deepspeed":  # DeepSpeed has already applied the step
            return ""
        if self.last_saved == self.state.step:
            return f"the last good state (step {self.state.step}) is in {self.out_dir / ckpt.CHECKPOINTS}; " if self.state.step else ""
        self.optimizer.zero_grad(set_to_none=True)
        path = self.checkpoint(rng_before)
        return f"the last good state (step {self.state.step}) is saved in {path}; " if self.rt.is_main else ""

    def finish(self) -> TrainResult:
        """The model, run.json and the result; the main process writes, every process takes part."""
        cfg, rt = self.cfg, self.rt
        summary = run_summary(self)
        self.extras.finish(summary)  # the checks; after a stop at the drift budget, the kept weights back in
        if self.out_dir:
            if cfg.save_model:
                save_started = time.perf_counter()
                summary["saved"] = save_final(cfg, rt, self.student, self.unwrapped, self.tokenizer, self.out_dir, build_student)
                summary["timings_s"]["save"] = round(time.perf_counter() - save_started, 3)
                self.extras.after_save(summary)  # model cards, --push-to-hub
            if rt.is_main:
                write_summary(self.out_dir, summary)
            rt.barrier()
        return TrainResult(self.unwrapped, self.tokenizer, summary, self.out_dir)

    def close(self, failed: bool = False) -> None:
        """Release OUT (removed again when this run created it and wrote nothing) and accelerate's memory."""
        if self.losses is not None:
            self.losses.close()
        if self.extras is not None:
            self.extras.close()
        if self.run_dir is not None and self.rt.is_main:
            self.run_dir.release(remove_if_empty=failed)
        self.rt.accelerator.free_memory()
