"""The one training loop shared by every method: data order, precision, optimizer step, logging, saving.

Methods only return losses; this file owns the optimizer and the device, so DiSC and its baselines
are compared with the same data order, optimizer and bookkeeping.

The same loop runs in one process (`python -m ctxdistill.cli train`, the Python API) and in several
(`torchrun`, `accelerate launch` with a config from configs/accelerate/), through `accelerate`:

- Every process computes the same epoch plan (document order and split points depend only on seed
  and epoch). A step's global batch is `docs_per_step` consecutive items; process r takes items
  r, r+W, r+2W, ... of it and runs them one after another (gradient accumulation).
- Each item's loss is weighted so that the step's gradient is the mean over the GLOBAL batch:
  1/docs_per_step per item (`loss_normalization document`), or its distilled-token count divided by
  the global token count (`token`, counted across accumulation steps and processes). 2 processes
  x 1 item therefore give the same step as 1 process accumulating 2 items.
- Data parallel (several processes, no sharding): every process holds the whole model and the
  summed gradients are all-reduced once per step. Methods may call any submodule of the student
  (DiSC's chunked LM head does), which a DDP wrapper would not see.
- FSDP and DeepSpeed: `accelerator.prepare` shards the student and optimizer; every process runs the
  same number of forward passes (short batches are padded with zero-weight items).
- Only the main process logs and writes; checkpoints (checkpoint.py) carry every process's RNG state.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import random
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import __version__
from . import checkpoint as ckpt
from .config import TrainConfig, to_dict
from .errors import CtxDistillError, TrainingInterrupted
from .methods import get_method
from .models import Teacher, apply_lora, load_model, load_tokenizer

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class TrainResult:
    model: torch.nn.Module
    tokenizer: object
    summary: dict
    out_dir: Path | None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CtxDistillError(f"device {name} requested but CUDA is not available; use --device cpu")
    return torch.device(name)


def autocast(device: torch.device, precision: str):
    """bf16 autocast over fp32 master weights (sound on CPUs with bf16 matmuls and on GPUs)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_output_dir(out: str, overwrite: bool) -> Path:
    """Never overwrite silently: an existing non-empty directory needs `overwrite` (used by the demo)."""
    path = Path(out)
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise CtxDistillError(f"output directory {path} exists and is not empty; pass --overwrite or choose another --out")
        why = ckpt.is_dangerous_to_delete(path)
        if why:
            raise CtxDistillError(f"refusing to --overwrite {path}: {why}; choose a dedicated --out directory")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def epoch_items(method, examples: list, cfg: TrainConfig, epoch: int) -> list:
    """The epoch's document order and split points, drawn from (seed, epoch) alone.

    Independent of anything that happened earlier in the run, so a resumed run, every process of a
    distributed run and a teacher cache see exactly the items training will read.
    """
    rng = random.Random(cfg.seed * 1_000_003 + epoch)
    order = list(range(len(examples)))
    rng.shuffle(order)
    items = []
    for i in order:
        item = method.plan(examples[i], rng, cfg)
        if isinstance(item, list):  # one example, several consecutive steps
            items.extend(item)
        elif item is not None:
            items.append(item)
    return items


def build_student(cfg: TrainConfig, device: torch.device, tokenizer=None):
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    model = load_model(cfg.model, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code)
    if cfg.student == "lora":
        targets = cfg.lora_targets if cfg.lora_targets == "all-linear" else [t.strip() for t in cfg.lora_targets.split(",")]
        model = apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, targets)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = model.to(device)
    if cfg.compile:
        model.forward = torch.compile(model.forward, dynamic=True)
    return model, tokenizer


def build_teacher(cfg: TrainConfig, student, device: torch.device, examples=None):
    """LoRA: the student with its adapter disabled. Full FT: a frozen copy loaded from the same source
    (never a deep copy of the student, which may be sharded).

    With `cfg.teacher_cache`, no teacher model at all: the cached top-k distributions, checked against
    this run's initial weights, tokenised corpus and temperature.
    """
    if cfg.teacher_cache:
        from .teacher_cache import open_for_run

        return open_for_run(cfg.teacher_cache, student, examples, cfg.temperature)
    if cfg.student == "lora":
        if cfg.teacher_model:
            raise CtxDistillError("teacher_model works with full fine-tuning only: a LoRA student's teacher is its own adapter-disabled model")
        return Teacher(student=student)
    frozen = load_model(cfg.teacher_model or cfg.model, dtype=DTYPES[cfg.teacher_dtype], trust_remote_code=cfg.trust_remote_code)
    return Teacher(model=frozen.to(device))


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


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
        final, tmp = ckpt.confined(out_dir, name), ckpt.confined(out_dir, f".{name}.tmp")
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
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ckpt.disk_error(f"the trained model to {final}", exc, f"checkpoints under {out_dir / ckpt.CHECKPOINTS} (if any) are intact") from exc
        written[name] = str(final)
    return written


def versions() -> dict:
    import accelerate
    import peft
    import transformers

    return {"ctxdistill": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "accelerate": accelerate.__version__, "python": platform.python_version()}


# ----------------------------------------------------------------------------------------------
# processes


@dataclass
class Runtime:
    """Who this process is in the run, and how gradients are shared."""

    accelerator: object
    device: torch.device
    rank: int
    world: int
    mode: str  # single | data_parallel | fsdp | deepspeed

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.mode in ("fsdp", "deepspeed")

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist

            moved = tensor.to(self.device)
            dist.all_reduce(moved, op=dist.ReduceOp.SUM)
            return moved.to(tensor.device)
        return tensor

    def broadcast_int(self, value: int) -> int:
        if self.world == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.long, device=self.device)
        dist.broadcast(t, src=0)
        return int(t.item())

    def gather_json(self, obj) -> list:
        """Every process's JSON-serialisable `obj`, in rank order (tensors, no pickling)."""
        data = json.dumps(obj).encode()
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        length = torch.tensor([len(data)], dtype=torch.long, device=self.device)
        lengths = [torch.zeros_like(length) for _ in range(self.world)]
        dist.all_gather(lengths, length)
        longest = max(int(n.item()) for n in lengths)
        buf = torch.zeros(longest, dtype=torch.uint8, device=self.device)
        buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device)
        parts = [torch.zeros_like(buf) for _ in range(self.world)]
        dist.all_gather(parts, buf)
        return [json.loads(bytes(p[: int(n.item())].cpu().tolist()).decode()) for p, n in zip(parts, lengths)]

    def barrier(self) -> None:
        if self.world > 1:
            self.accelerator.wait_for_everyone()


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def create_runtime(cfg: TrainConfig, micro_steps: int) -> Runtime:
    """The accelerate state for this process: one process, data parallel, FSDP or DeepSpeed."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    sharded_env = any(os.environ.get(k, "").lower() in ("true", "1") for k in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"))
    if launched_world_size() == 1 and not sharded_env:
        AcceleratorState._reset_state(reset_partial_state=True)  # a fresh one-process state for every train() call
    elif cfg.device.startswith("cuda:"):
        raise CtxDistillError(f"--device {cfg.device} cannot be used with several processes: each uses the GPU of its LOCAL_RANK; use --device auto")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise CtxDistillError(f"device {cfg.device} requested but CUDA is not available; use --device cpu")
    kwargs = {"gradient_accumulation_steps": micro_steps} if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("true", "1") else {}
    try:
        accelerator = Accelerator(cpu=cfg.device == "cpu", device_placement=False, mixed_precision="no", **kwargs)
    except (ValueError, RuntimeError, ImportError) as exc:
        raise CtxDistillError(f"cannot set up the processes ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        mode = "fsdp"
    elif kind == DistributedType.DEEPSPEED:
        mode = "deepspeed"
    elif accelerator.num_processes > 1:
        mode = "data_parallel"
    else:
        mode = "single"
    device = resolve_device(cfg.device) if mode == "single" else accelerator.device
    if device.type == "cuda" and not cfg.cudnn_attention:  # see the option's help and docs/performance.md "GPU (H100)"
        torch.backends.cuda.enable_cudnn_sdp(False)
    return Runtime(accelerator, device, accelerator.process_index, accelerator.num_processes, mode)


class StopSignals:
    """SIGTERM/SIGINT set a flag that the loop checks after each step (then checkpoints and stops).

    A second SIGINT (Ctrl-C twice) interrupts at once. Other repeats are ignored: launchers such as
    torchrun forward a SIGTERM to workers that already got the terminal's SIGINT.
    """

    def __init__(self):
        self.received: int | None = None
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        if self.received is None:
            self.received = signum
        elif signum == signal.SIGINT and self.received == signal.SIGINT:
            self.__exit__()
            raise KeyboardInterrupt

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


# Counts a method's loss may report in its stats dict; summed over steps and processes into run.json "counts".
METHOD_COUNTS = ("distilled_positions", "kept_positions", "documents_without_kept_positions")


@dataclass
class Progress:
    """What a checkpoint must restore besides tensors."""

    step: int = 0
    counts: dict = field(default_factory=lambda: {"steps": 0, "optimizer_steps": 0, "skipped_steps": 0, "documents": 0,
                                                  "student_tokens": 0, "teacher_tokens": 0})
    skipped: list = field(default_factory=list)  # [{"step", "documents", "reason"}] under on_nonfinite skip


def quiet(*args, **kwargs) -> None:
    return None


# ----------------------------------------------------------------------------------------------
# the loop


def train(cfg: TrainConfig, progress: bool = True, log=print) -> TrainResult:
    """Train a student with `cfg.method` on `cfg.corpus`; write model, run.json and losses.jsonl.

    Resumes from the latest checkpoint in `cfg.out` when there is one (see `TrainConfig.resume`).
    """
    cfg.validate()
    method = get_method(cfg.method)
    cfg = method.configure(cfg)
    started = time.perf_counter()
    documents, corpus_report = method.load(cfg)  # validates the input before any model loads
    world = launched_world_size()
    micro_steps = math.ceil(cfg.docs_per_step / world)
    rt = create_runtime(cfg, micro_steps)
    say = log if rt.is_main else quiet
    progress = progress and rt.is_main
    check_engine_support(cfg, rt)
    for line in corpus_report.summary():
        say(f"corpus: {line}")
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)  # the model source exists before --out is touched

    run_dir, resume_from = open_output(cfg, rt)
    out_dir = run_dir.path if run_dir else None
    try:
        return _train(cfg, method, rt, documents, corpus_report, tokenizer, out_dir, resume_from, started, progress, say)
    except (CtxDistillError, TrainingInterrupted, KeyboardInterrupt):
        if run_dir and run_dir.created and rt.is_main and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()  # nothing was written: leave no empty directory behind
        raise
    finally:
        rt.accelerator.free_memory()


def check_engine_support(cfg: TrainConfig, rt: Runtime) -> None:
    if rt.sharded and cfg.teacher_mode == "per_split":
        raise CtxDistillError(f"teacher_mode per_split runs a different number of forward passes per document, which hangs "
                              f"sharded training ({rt.mode}); use the default single_pass")
    if rt.mode == "deepspeed" and cfg.on_nonfinite == "skip":
        raise CtxDistillError("--on-nonfinite skip is not available under DeepSpeed (its engine steps inside backward); use FSDP or data parallel")
    if rt.mode == "deepspeed" and cfg.loss_normalization == "token":
        raise CtxDistillError("loss_normalization token is not available under DeepSpeed; use document, or FSDP")


def open_output(cfg: TrainConfig, rt: Runtime):
    """The main process decides (fresh, resume or refuse) and the others follow its decision."""
    if not cfg.out:
        return None, None
    run_dir, decision, error = None, -1, None
    if rt.is_main:
        try:
            run_dir = ckpt.open_run_dir(cfg.out, cfg.overwrite, cfg.resume)
            if run_dir.resume_from is not None and (run_dir.path / "run.json").exists():
                raise CtxDistillError(f"output directory {run_dir.path} holds a finished run (run.json); pass --overwrite to train again, or choose another --out")
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
        run_dir = ckpt.RunDir(path, False, path / ckpt.CHECKPOINTS / f"step-{decision:08d}" if decision >= 0 else None)
    return run_dir, run_dir.resume_from


def _train(cfg, method, rt: Runtime, documents, corpus_report, tokenizer, out_dir, resume_from, started, progress, say) -> TrainResult:
    device = rt.device
    resumed = ckpt.load_checkpoint(resume_from) if resume_from is not None else None
    if resumed is not None:
        ckpt.check_compatible(resumed.state, to_dict(cfg), resume_from)
        if resumed.optimizer is None:
            raise CtxDistillError(f"checkpoint {resume_from} holds no optimizer state (written under DeepSpeed), so the run cannot "
                                  f"continue exactly; pass --overwrite to start again")
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    with rt.accelerator.main_process_first():  # the first process fills shared caches (dequantized models, generations)
        student, tokenizer = build_student(cfg, device if not rt.sharded else torch.device("cpu"), tokenizer)
        extra = dict(model=student, device=device if not rt.sharded else torch.device("cpu"),
                     out_dir=out_dir if rt.is_main else None, progress=progress, log=say) if method.prepare_uses_model else {}
        prepared = method.prepare(documents, tokenizer, cfg, **extra)
    for reason, where in prepared.skipped.items():
        if where:
            say(f"{method.name}: skipped {len(where)} {reason} document(s): {', '.join(where[:3])}")
    if not prepared.examples:
        raise CtxDistillError(f"no document is usable by {method.name} ({method.input_format})")
    generate_seconds = prepared.generation.get("seconds", 0.0)

    plans = [epoch_items(method, prepared.examples, cfg, e) for e in range(cfg.epochs)]
    steps_per_epoch = math.ceil(len(plans[0]) / cfg.docs_per_step) if plans[0] else 0
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    fingerprints = {"corpus": ckpt.corpus_fingerprint(prepared.examples), "plans": ckpt.plan_fingerprint(plans)}

    names = {id(p): n for n, p in student.named_parameters()}
    trainable_names = [n for n, p in student.named_parameters() if p.requires_grad]
    # the teacher first: a teacher cache is checked against the INITIAL weights, before a checkpoint replaces them
    teacher = build_teacher(cfg, student, device, prepared.examples) if method.needs_teacher else None
    state = Progress()
    if resumed is not None:
        state = restore_progress(resumed, fingerprints, resume_from)
        load_trainable(student, resumed.trainable, trainable_names, resume_from)
        say(f"resuming from {resume_from} (step {state.step} of {total_steps})")
    load_seconds = time.perf_counter() - started - generate_seconds

    trainable = [p for p in student.parameters() if p.requires_grad]
    # The fused AdamW kernel is ~5x faster than the foreach one on CPU for a 135M model, where the
    # optimizer step otherwise costs more than the forward+backward of a short document.
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay,
                                  fused=device.type in ("cpu", "cuda") and not rt.sharded)
    raw_optimizer = optimizer
    unwrapped = student
    if rt.sharded:
        student, optimizer = prepare_sharded(rt, cfg, student, optimizer)
        raw_optimizer = getattr(optimizer, "optimizer", optimizer)
        if isinstance(teacher, Teacher) and teacher.student is not None:
            teacher = Teacher(student=student)  # the adapter-disabled pass goes through the sharding wrapper
        # a full-FT teacher stays a replicated frozen copy in teacher_dtype (see docs/distributed.md)
    if resumed is not None:
        load_optimizer(rt, student, raw_optimizer, resumed.optimizer, names)
    rng_states = resumed.state.get("rng") if resumed is not None else None
    if rng_states and len(rng_states) == rt.world:
        ckpt.restore_rng(rng_states[rt.rank])
    else:
        if rng_states:
            say(f"warning: the checkpoint was written by {len(rng_states)} process(es), this run has {rt.world}: "
                f"data order and split points continue exactly, dropout masks do not")
        # dropout and sampling streams: per process, and independent of how much randomness loading consumed
        random.seed(cfg.seed + rt.rank)
        torch.manual_seed(cfg.seed + rt.rank + 1_000_003 * state.step)

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    losses_file = None
    if out_dir and rt.is_main:
        losses_path = ckpt.confined(out_dir, "losses.jsonl")
        if resumed is not None:
            truncate_losses(losses_path, state.step)
        losses_file = open(losses_path, "a" if resumed is not None else "w", encoding="utf-8")

    loop = Loop(cfg, method, rt, student, unwrapped, teacher, optimizer, raw_optimizer, names, trainable_names, pad_id,
                out_dir, state, fingerprints, say)
    train_started = time.perf_counter()
    student.train()
    bar = tqdm(total=total_steps, initial=min(state.step, total_steps), desc=f"{method.name}", unit="step", disable=not progress,
               dynamic_ncols=True)
    try:
        with StopSignals() as signals:
            loop.signals = signals
            step_index = 0
            for epoch, items in enumerate(plans):
                for first in range(0, len(items), cfg.docs_per_step):
                    if step_index >= total_steps:
                        break
                    step_index += 1
                    if step_index <= state.step:  # done before the checkpoint this run resumed from
                        continue
                    record = loop.step(items[first : first + cfg.docs_per_step], epoch)
                    elapsed = time.perf_counter() - train_started
                    tokens_per_s = state.counts["student_tokens"] / max(elapsed, 1e-9)
                    bar.set_postfix(epoch=epoch + 1, loss=f"{record['loss']:.4f}", tok_s=f"{tokens_per_s:.0f}")
                    bar.update(1)
                    if losses_file and state.step % cfg.log_every == 0:
                        losses_file.write(json.dumps(record | {"elapsed_s": round(elapsed, 3)}) + "\n")
                        losses_file.flush()
                    loop.after_step(losses_file)
    finally:
        bar.close()
        if losses_file:
            losses_file.close()
    train_seconds = time.perf_counter() - train_started
    student.eval()

    summary = {
        "config": to_dict(cfg),
        "versions": versions(),
        "device": str(device),
        "processes": {"world_size": rt.world, "mode": rt.mode},
        "corpus": corpus_report.to_dict() | {"examples": len(prepared.examples),
                                             "skipped_by_method": {k: len(v) for k, v in prepared.skipped.items()}},
        "counts": state.counts,
        "nonfinite_skipped": state.skipped,
        "timings_s": {"load": round(load_seconds, 3), "generate": round(generate_seconds, 3), "train": round(train_seconds, 3)},
        "throughput": {"documents_per_s": state.counts["documents"] / max(train_seconds, 1e-9),
                       "student_tokens_per_s": state.counts["student_tokens"] / max(train_seconds, 1e-9)},
    }
    if resumed is not None:
        summary["resumed_from"] = {"checkpoint": str(resume_from), "step": resumed.state["step"]}
    if prepared.generation:
        summary["generation"] = prepared.generation
    if out_dir:
        if cfg.save_model:
            save_started = time.perf_counter()
            summary["saved"] = save_final(cfg, rt, student, unwrapped, tokenizer, out_dir)
            summary["timings_s"]["save"] = round(time.perf_counter() - save_started, 3)
        if rt.is_main:
            try:
                ckpt.write_json_atomic(ckpt.confined(out_dir, "run.json"), summary)
            except OSError as exc:
                raise ckpt.disk_error(f"{out_dir / 'run.json'}", exc, "the trained model and the checkpoints are intact") from exc
        rt.barrier()
    return TrainResult(unwrapped, tokenizer, summary, out_dir)


def restore_progress(resumed: ckpt.Checkpoint, fingerprints: dict, path: Path) -> Progress:
    saved = resumed.state
    if saved.get("fingerprints", {}).get("corpus") != fingerprints["corpus"]:
        raise CtxDistillError(f"cannot resume from {path}: the corpus or its tokenisation changed since the checkpoint was written; "
                              f"restore the original input, or pass --overwrite to start again")
    old_plans, new_plans = saved["fingerprints"]["plans"], fingerprints["plans"]
    if new_plans[: len(old_plans)] != old_plans[: len(new_plans)]:
        raise CtxDistillError(f"cannot resume from {path}: the document order or split points would differ from the checkpointed run")
    return Progress(step=saved["step"], counts=dict(saved["counts"]), skipped=list(saved.get("nonfinite_skipped", [])))


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
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    tmp.replace(path)


def prepare_sharded(rt: Runtime, cfg: TrainConfig, student, optimizer):
    """FSDP / DeepSpeed: shard the student and its optimizer through accelerate."""
    from .models import mark_sharded

    if rt.mode == "deepspeed":
        ds = rt.accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = 1
        ds["gradient_accumulation_steps"] = math.ceil(cfg.docs_per_step / rt.world)
        ds["train_batch_size"] = ds["gradient_accumulation_steps"] * rt.world
        ds["gradient_clipping"] = cfg.grad_clip
    student, optimizer = rt.accelerator.prepare(student, optimizer)
    mark_sharded(rt.accelerator.unwrap_model(student))
    mark_sharded(student)
    return student, optimizer


def load_optimizer(rt: Runtime, student, optimizer, named: dict, names: dict[int, str]) -> None:
    if rt.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(student, optimizer, named, options=StateDictOptions(full_state_dict=True))
    else:
        ckpt.load_named_optimizer_state(optimizer, named, names)


def gather_trainable(rt: Runtime, student, unwrapped, trainable_names: list[str]) -> dict:
    """Full tensors of the trainable parameters on the main process (collective under sharding)."""
    if rt.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    elif rt.mode == "deepspeed":
        full = rt.accelerator.get_state_dict(student)
    else:
        if not rt.is_main:
            return {}
        params = dict(unwrapped.named_parameters())
        return {n: params[n].detach().cpu().clone() for n in trainable_names}
    return {n: full[n] for n in trainable_names if n in full} if rt.is_main else {}


def gather_optimizer(rt: Runtime, student, optimizer, names: dict[int, str]) -> dict | None:
    if rt.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(student, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rt.mode == "deepspeed":
        return None  # kept inside the DeepSpeed engine; see docs/distributed.md
    return ckpt.named_optimizer_state(optimizer, names) if rt.is_main else None


def save_final(cfg, rt: Runtime, student, unwrapped, tokenizer, out_dir: Path) -> dict:
    """The trained model (or adapter), written by the main process; gathered first under sharding."""
    state_dict, merged_factory = None, None
    if rt.sharded:
        state_dict = rt.accelerator.get_state_dict(student)
        if cfg.student == "lora" and cfg.merge_lora:
            def merged_factory():  # never deep-copy a sharded student: rebuild from the source, load the gathered state
                base, _ = build_student(dataclass_replace(cfg, compile=False, gradient_checkpointing=False), torch.device("cpu"), tokenizer)
                base.load_state_dict(state_dict, strict=False)
                return base.merge_and_unload()
    written, error = {}, None
    if rt.is_main:
        try:
            written = save_model(unwrapped, tokenizer, out_dir, cfg.merge_lora and cfg.student == "lora", state_dict, merged_factory)
        except CtxDistillError as exc:
            error = exc
    failed = rt.broadcast_int(1 if error else 0)
    if error:
        raise error
    if failed:
        raise CtxDistillError("the main process could not save the model (see its error)")
    return written


def dataclass_replace(cfg, **changes):
    import dataclasses

    return dataclasses.replace(cfg, **changes)


class Loop:
    """One optimizer step over a global batch, and what follows it (checkpoints, signals)."""

    def __init__(self, cfg, method, rt: Runtime, student, unwrapped, teacher, optimizer, raw_optimizer, names, trainable_names,
                 pad_id, out_dir, state: Progress, fingerprints, say):
        self.cfg, self.method, self.rt = cfg, method, rt
        self.student, self.unwrapped, self.teacher = student, unwrapped, teacher
        self.optimizer, self.raw_optimizer = optimizer, raw_optimizer
        self.names, self.trainable_names = names, trainable_names
        self.pad_id, self.out_dir, self.state, self.fingerprints, self.say = pad_id, out_dir, state, fingerprints, say
        self.params = list(student.parameters())
        self.signals: StopSignals | None = None
        self.last_saved = state.step if out_dir else None

    def my_slots(self, group_size: int) -> list[int | None]:
        """Indices into the global batch that this process runs; None pads sharded engines to equal counts."""
        slots: list[int | None] = list(range(self.rt.rank, group_size, self.rt.world))
        if self.rt.sharded:
            slots += [None] * (math.ceil(self.cfg.docs_per_step / self.rt.world) - len(slots))
        return slots

    def step(self, group: list, epoch: int) -> dict:
        cfg, rt, state = self.cfg, self.rt, self.state
        rng_before = ckpt.capture_rng() if self.out_dir is not None else None
        if any(getattr(item, "reset_optimizer", False) for item in group):
            self.raw_optimizer.state.clear()
        self.optimizer.zero_grad(set_to_none=True)
        slots = self.my_slots(len(group))
        # [sum of weighted losses, sum of weights, student tokens, teacher tokens, stop requested,
        #  METHOD_COUNTS..., non-finite flag per item]
        flags = 5 + len(METHOD_COUNTS)
        info = torch.zeros(flags + len(group), dtype=torch.float64)
        engine_scale = rt.world if rt.sharded else 1  # FSDP and DeepSpeed average gradients over processes
        if rt.mode == "deepspeed":
            engine_scale *= len(slots)  # DeepSpeed also divides by its accumulation steps
        token_mode = cfg.loss_normalization == "token"
        for unit in self.forward_units(group, slots):  # this process's share of the global batch
            if len(unit) == 1:  # one item per forward/backward
                slot = unit[0]
                item = group[slot if slot is not None else 0]
                with self.accumulate():
                    with autocast(rt.device, cfg.precision):
                        loss, stats = self.method.loss(self.student, self.teacher, item, cfg, self.pad_id, rt.device)
                    if slot is None:
                        self.backward(loss * 0.0)  # padding: the same forward passes as the other processes, no contribution
                    elif token_mode:  # weighted by its tokens; divided by the global token count once it is known
                        self.backward(loss * (stats["student_tokens"] * engine_scale))
                    else:
                        self.backward(loss / (len(group) / engine_scale))
            else:  # several documents in one forward pass: the loss is their mean (see Disc.batch_loss)
                with autocast(rt.device, cfg.precision):
                    loss, stats = self.method.batch_loss(self.student, self.teacher, [group[i] for i in unit], cfg, self.pad_id, rt.device)
                self.backward(loss * (len(unit) / len(group)))
            if unit[0] is not None:
                value = loss.item()
                if not math.isfinite(value):
                    for slot in unit:
                        info[flags + slot] = 1
                weight = float(stats["student_tokens"]) if token_mode else float(len(unit))
                info[0] += value * weight
                info[1] += weight
                info[2] += stats["student_tokens"]
                info[3] += stats["teacher_tokens"]
                for j, name in enumerate(METHOD_COUNTS):
                    info[5 + j] += stats.get(name, 0)
        if self.signals is not None and self.signals.received is not None:
            info[4] = 1
        info = rt.all_sum(info)
        if rt.mode == "data_parallel":
            self.all_reduce_gradients()
        if cfg.loss_normalization == "token" and rt.mode != "deepspeed":
            scale = 1.0 / max(info[1].item(), 1.0)
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(scale)
        grad_norm = self.clip()
        step_number = state.step + 1
        bad_docs = [group[i].doc_id for i in range(len(group)) if info[flags + i] > 0]
        grad_ok = grad_norm is None or math.isfinite(float(grad_norm))
        step_loss = info[0].item() / max(info[1].item(), 1e-12)
        record = {"step": step_number, "epoch": epoch + 1, "loss": step_loss,
                  "grad_norm": float(grad_norm) if grad_norm is not None else None, "tokens": int(info[2].item()),
                  "documents": [i.doc_id for i in group]}
        self.stop_requested = bool(info[4].item())
        if bad_docs or not grad_ok:
            what = f"non-finite loss at step {step_number} on document {', '.join(bad_docs)}" if bad_docs else \
                f"non-finite gradient at step {step_number} (documents {', '.join(record['documents'])})"
            if cfg.on_nonfinite == "skip":
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
        self.optimizer.step()
        state.step += 1
        state.counts["steps"] += 1
        state.counts["optimizer_steps"] += 1
        state.counts["documents"] += len(group)
        state.counts["student_tokens"] += int(info[2].item())
        state.counts["teacher_tokens"] += int(info[3].item())
        if info[5:flags].any():  # the method reported them (e.g. DiSC on context-sensitive positions)
            for j, name in enumerate(METHOD_COUNTS):
                state.counts[name] = state.counts.get(name, 0) + int(info[5 + j].item())
        return record

    def forward_units(self, group: list, slots: list[int | None]) -> list[list[int | None]]:
        """This process's slots, packed into forward passes of at most `batch_tokens` tokens.

        Only methods with a `batch_loss` are packed, under document normalisation on data-parallel or
        single-process runs; documents are sorted by length first so batches carry little padding.
        Everything else runs one item per forward pass.
        """
        cfg = self.cfg
        if (cfg.batch_tokens <= 0 or not hasattr(self.method, "batch_loss") or cfg.loss_normalization == "token"
                or cfg.teacher_mode == "per_split" or self.rt.sharded or None in slots):
            return [[slot] for slot in slots]
        size = lambda slot: group[slot].teacher_tokens + group[slot].student_tokens
        units: list[list[int | None]] = []
        used = 0
        for slot in sorted(slots, key=size):
            if units and used + size(slot) <= cfg.batch_tokens:
                units[-1].append(slot)
                used += size(slot)
            else:
                units.append([slot])
                used = size(slot)
        return units

    def accumulate(self):
        if self.rt.mode == "deepspeed":
            return self.rt.accelerator.accumulate(self.student)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        if self.rt.sharded:
            self.rt.accelerator.backward(loss)
        else:
            loss.backward()

    def all_reduce_gradients(self, bucket_elements: int = 1 << 25) -> None:
        """Sum the gradients over processes (each process already weighted its items by the global batch)."""
        import torch.distributed as dist

        trainable = [p for p in self.params if p.requires_grad]
        # a parameter no process produced a gradient for stays without one (AdamW then skips it, as in one process)
        used = self.rt.all_sum(torch.tensor([float(p.grad is not None) for p in trainable], dtype=torch.float64))
        grads = []
        for p, n in zip(trainable, used.tolist()):
            if n > 0:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)
        bucket, size = [], 0
        for g in grads + [None]:
            if g is not None:
                bucket.append(g)
                size += g.numel()
            if bucket and (g is None or size >= bucket_elements):
                flat = torch.cat([b.reshape(-1) for b in bucket])
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
                offset = 0
                for b in bucket:
                    b.copy_(flat[offset : offset + b.numel()].view_as(b))
                    offset += b.numel()
                bucket, size = [], 0

    def clip(self):
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        if self.rt.sharded:
            norm = self.rt.accelerator.clip_grad_norm_(self.student.parameters(), max_norm)
            return norm if norm is None or not torch.is_tensor(norm) else norm.item()
        grads = [p for p in self.params if p.grad is not None]
        if not grads:
            return 0.0
        return torch.nn.utils.clip_grad_norm_(grads, max_norm).item()

    # -- checkpoints ------------------------------------------------------------------------------

    def checkpoint(self, rng_local: dict | None = None) -> Path | None:
        """Write a checkpoint of the current state (collective: every process takes part)."""
        rt, state = self.rt, self.state
        rngs = rt.gather_json(rng_local if rng_local is not None else ckpt.capture_rng())
        trainable = gather_trainable(rt, self.student, self.unwrapped, self.trainable_names)
        optimizer_state = gather_optimizer(rt, self.student, self.raw_optimizer, self.names)
        path, error = None, None
        if rt.is_main:
            try:
                path = ckpt.save_checkpoint(self.out_dir, state.step, trainable, optimizer_state, {
                    "counts": state.counts, "nonfinite_skipped": state.skipped, "rng": rngs, "world_size": rt.world,
                    "mode": rt.mode, "config": to_dict(self.cfg), "fingerprints": self.fingerprints, "versions": versions(),
                }, self.cfg.keep_checkpoints)
            except CtxDistillError as exc:
                error = exc
        if rt.broadcast_int(1 if error else 0):
            raise error or CtxDistillError("the main process could not write a checkpoint (see its error)")
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

    def after_step(self, losses_file) -> None:
        if self.out_dir is None:
            if self.stop_requested:
                raise TrainingInterrupted(self.signals.received or signal.SIGTERM, f"interrupted at step {self.state.step}; no --out, nothing saved")
            return
        every = self.cfg.checkpoint_every
        if self.stop_requested or (every and self.state.step % every == 0):
            if losses_file:
                losses_file.flush()
            path = self.checkpoint()
            if self.stop_requested:
                signum = self.signals.received if self.signals and self.signals.received else signal.SIGTERM
                raise TrainingInterrupted(signum, f"stopped by {signal.Signals(signum).name} after step {self.state.step}; "
                                                  f"checkpoint saved to {path}; rerun the same command to resume")
