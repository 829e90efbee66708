"""The one training loop shared by every method: data order, precision, optimizer step, logging, saving.

Methods only return losses; this file owns the optimizer and the device, so DiSC and its baselines
are compared with the same data order, optimizer and bookkeeping.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import __version__
from .config import TrainConfig, to_dict
from .errors import CtxDistillError
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
    """Never overwrite silently: an existing non-empty directory needs `overwrite`."""
    path = Path(out)
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise CtxDistillError(f"output directory {path} exists and is not empty; pass --overwrite or choose another --out")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def epoch_items(method, examples: list, cfg: TrainConfig, epoch: int) -> list:
    """The epoch's document order and split points, drawn from (seed, epoch) alone.

    Independent of anything that happened earlier in the run, so a resumed run or a teacher cache
    sees exactly the items training will read.
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


def build_student(cfg: TrainConfig, device: torch.device):
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    model = load_model(cfg.model, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code)
    if cfg.student == "lora":
        targets = cfg.lora_targets if cfg.lora_targets == "all-linear" else [t.strip() for t in cfg.lora_targets.split(",")]
        model = apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, targets)
    return model.to(device), tokenizer


def build_teacher(cfg: TrainConfig, student, device: torch.device) -> Teacher:
    """LoRA: the student with its adapter disabled. Full FT: a frozen copy loaded from the same source."""
    if cfg.student == "lora":
        return Teacher(student=student)
    frozen = load_model(cfg.model, dtype=DTYPES[cfg.teacher_dtype], trust_remote_code=cfg.trust_remote_code)
    return Teacher(model=frozen.to(device))


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


def save_model(model, tokenizer, out_dir: Path, merge_lora: bool) -> dict:
    """`out/model` (full weights, or the PEFT adapter under LoRA) and optionally `out/merged`."""
    written = {}
    targets = [("model", model)]
    if merge_lora:
        targets.append(("merged", None))
    for name, to_save in targets:
        final, tmp = out_dir / name, out_dir / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if to_save is None:  # merge a copy so the in-memory student keeps its adapter
            import copy

            to_save = copy.deepcopy(model).merge_and_unload()
        to_save.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        written[name] = str(final)
    return written


def versions() -> dict:
    import peft
    import transformers

    return {"ctxdistill": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": platform.python_version()}


def train(cfg: TrainConfig, progress: bool = True, log=print) -> TrainResult:
    """Train a student with `cfg.method` on `cfg.corpus`; write model, run.json and losses.jsonl."""
    cfg.validate()
    method = get_method(cfg.method)
    cfg = method.configure(cfg)
    started = time.perf_counter()
    documents, corpus_report = method.load(cfg)  # validates the input before any model loads
    for line in corpus_report.summary():
        log(f"corpus: {line}")
    out_dir = prepare_output_dir(cfg.out, cfg.overwrite) if cfg.out else None
    device = resolve_device(cfg.device)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    student, tokenizer = build_student(cfg, device)
    extra = dict(model=student, device=device, out_dir=out_dir, progress=progress, log=log) if method.prepare_uses_model else {}
    prepared = method.prepare(documents, tokenizer, cfg, **extra)
    for reason, where in prepared.skipped.items():
        if where:
            log(f"{method.name}: skipped {len(where)} {reason} document(s): {', '.join(where[:3])}")
    if not prepared.examples:
        raise CtxDistillError(f"no document is usable by {method.name} ({method.input_format})")
    teacher = build_teacher(cfg, student, device) if method.needs_teacher else None
    generate_seconds = prepared.generation.get("seconds", 0.0)
    load_seconds = time.perf_counter() - started - generate_seconds

    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    plans = [epoch_items(method, prepared.examples, cfg, e) for e in range(cfg.epochs)]
    steps_per_epoch = math.ceil(len(plans[0]) / cfg.docs_per_step) if plans[0] else 0
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)

    losses_file = open(out_dir / "losses.jsonl", "w", encoding="utf-8") if out_dir else None
    counts = {"steps": 0, "documents": 0, "student_tokens": 0, "teacher_tokens": 0}
    train_started = time.perf_counter()
    student.train()
    bar = tqdm(total=total_steps, desc=f"{method.name}", unit="step", disable=not progress, dynamic_ncols=True)
    try:
        for epoch, items in enumerate(plans):
            for first in range(0, len(items), cfg.docs_per_step):
                if cfg.max_steps and counts["steps"] >= cfg.max_steps:
                    break
                group = items[first : first + cfg.docs_per_step]
                if any(getattr(item, "reset_optimizer", False) for item in group):
                    optimizer.state.clear()
                optimizer.zero_grad(set_to_none=True)
                step_loss, step_tokens = 0.0, 0
                for item in group:
                    with autocast(device, cfg.precision):
                        loss, stats = method.loss(student, teacher, item, cfg, pad_id, device)
                    if not torch.isfinite(loss):
                        raise CtxDistillError(f"non-finite loss at step {counts['steps'] + 1} on document {item.doc_id}; lower the learning rate or check the input")
                    (loss / len(group)).backward()
                    step_loss += loss.item() / len(group)
                    step_tokens += stats["student_tokens"]
                    counts["teacher_tokens"] += stats["teacher_tokens"]
                if cfg.grad_clip > 0:
                    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
                else:
                    grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainable if p.grad is not None]))
                if not torch.isfinite(grad_norm):
                    raise CtxDistillError(f"non-finite gradient at step {counts['steps'] + 1} (documents {', '.join(i.doc_id for i in group)}); lower the learning rate")
                optimizer.step()
                counts["steps"] += 1
                counts["documents"] += len(group)
                counts["student_tokens"] += step_tokens
                elapsed = time.perf_counter() - train_started
                tokens_per_s = counts["student_tokens"] / max(elapsed, 1e-9)
                bar.set_postfix(epoch=epoch + 1, loss=f"{step_loss:.4f}", tok_s=f"{tokens_per_s:.0f}")
                bar.update(1)
                if losses_file and counts["steps"] % cfg.log_every == 0:
                    losses_file.write(json.dumps({"step": counts["steps"], "epoch": epoch + 1, "loss": step_loss,
                                                  "grad_norm": float(grad_norm), "tokens": step_tokens,
                                                  "documents": [i.doc_id for i in group], "elapsed_s": round(elapsed, 3)}) + "\n")
                    losses_file.flush()
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
        "corpus": corpus_report.to_dict() | {"examples": len(prepared.examples),
                                             "skipped_by_method": {k: len(v) for k, v in prepared.skipped.items()}},
        "counts": counts,
        "timings_s": {"load": round(load_seconds, 3), "generate": round(generate_seconds, 3), "train": round(train_seconds, 3)},
        "throughput": {"documents_per_s": counts["documents"] / max(train_seconds, 1e-9),
                       "student_tokens_per_s": counts["student_tokens"] / max(train_seconds, 1e-9)},
    }
    if prepared.generation:
        summary["generation"] = prepared.generation
    if out_dir:
        if cfg.save_model:
            save_started = time.perf_counter()
            summary["saved"] = save_model(student, tokenizer, out_dir, cfg.merge_lora)
            summary["timings_s"]["save"] = round(time.perf_counter() - save_started, 3)
        write_json(out_dir / "run.json", summary)
    return TrainResult(student, tokenizer, summary, out_dir)
