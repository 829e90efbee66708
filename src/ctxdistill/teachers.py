"""The teacher: one interface for the frozen model a method distils from.

Three kinds, all used the same way by the methods:
- a frozen copy of the initial model (full fine-tuning; `teacher_dtype`),
- the student with its LoRA adapter disabled (no second copy in memory),
- the top-k cache written by `ctxdistill cache-teacher` (DiSC only; no model at all).

A live teacher runs forward passes (`teacher(...)`, `teacher.hidden_states(...)`, `teacher.head_weight`);
the cache answers `teacher.cached(doc_id, positions)` instead. Methods ask `teacher.live`, never the
teacher's type.

`SelfTeacher` is the teacher of self-distillation (SDFT): the loop's teacher (`base`), an EMA of the
student (`ema`) or the student itself (`live`), behind the same calls (`SelfTeacher.view`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from .errors import CtxDistillError
from .models import choose_attention, final_hidden_states


class Teacher:
    """The frozen initial model. Under LoRA it is the student with its adapter disabled (no copy)."""

    live = True

    def __init__(self, model=None, student=None):
        if (model is None) == (student is None):
            raise ValueError("give either a frozen model or a PEFT student")
        self.model = model
        self.student = student
        if model is not None:
            model.eval().requires_grad_(False)

    @contextlib.contextmanager
    def _frozen(self):
        """The module to run as the teacher: the frozen model, or the student with its adapter off."""
        if self.student is None:
            yield self.model
            return
        was_training = self.student.training
        self.student.eval()  # no LoRA dropout on the adapter-free path, and no dropout in the base
        try:
            with self.student.disable_adapter():
                yield self.student
        finally:
            self.student.train(was_training)

    @torch.no_grad()
    def __call__(self, *args, **kwargs):
        with self._frozen() as model:
            return model(*args, **kwargs)

    @torch.no_grad()
    def hidden_states(self, **kwargs) -> torch.Tensor:
        """Final (normed) hidden states [B, L, H]; the LM head is applied separately, in chunks."""
        with self._frozen() as model:
            return final_hidden_states(model, **kwargs)

    @property
    def head_weight(self) -> torch.Tensor:
        return (self.model if self.student is None else self.student).get_output_embeddings().weight

    def cached(self, doc_id: str, positions: torch.Tensor):
        raise CtxDistillError("this teacher is a live model; it has no cached distributions")


class CachedTeacher:
    """The teacher's top-k distributions read from a cache (`ctxdistill cache-teacher`): no model."""

    live = False

    def __init__(self, cache):
        self.cache = cache

    def cached(self, doc_id: str, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(top-k log-probs at the cache's temperature, top-k token ids) at `positions` of `doc_id`."""
        return self.cache.lookup(doc_id, positions)

    def __call__(self, *args, **kwargs):
        raise CtxDistillError("this run's teacher is a top-k cache, which cannot run the model; drop --teacher-cache")

    def hidden_states(self, **kwargs):
        return self(**kwargs)


def build_teacher(cfg, student, device: torch.device, examples=None):
    """LoRA: the student with its adapter disabled. Full FT: a frozen copy loaded from the same source
    (never a deep copy of the student, which may be sharded).

    With `cfg.disc.teacher_cache`, no teacher model at all: the cached top-k distributions, checked
    against this run's initial weights, prepared corpus and temperature.
    """
    from .models import load_model
    from .runtime import DTYPES

    if cfg.disc.teacher_cache:
        return CachedTeacher(open_cache_for_run(cfg.disc.teacher_cache, student, examples, cfg.disc.temperature))
    if cfg.student == "lora":
        if cfg.teacher_model:
            raise CtxDistillError("teacher_model works with full fine-tuning only: a LoRA student's teacher is its own adapter-disabled model")
        return Teacher(student=student)
    frozen = load_model(cfg.teacher_model or cfg.model, dtype=DTYPES[cfg.teacher_dtype], trust_remote_code=cfg.trust_remote_code,
                        allow_pickle_weights=cfg.allow_pickle_weights)
    frozen = frozen.to(device)
    if cfg.packing != "off":
        choose_attention(frozen, device)
    return Teacher(model=frozen)


def vocabulary_signature(tokenizer) -> tuple[int, str]:
    """(size, sha256 of the token -> id map): two tokenizers agree on ids exactly when these match."""
    import hashlib
    import json

    vocab = tokenizer.get_vocab()
    digest = hashlib.sha256(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode("utf-8")).hexdigest()
    return len(vocab), digest


def check_teacher_tokenizer(cfg, student_tokenizer) -> None:
    """`--teacher-model` must share the student's vocabulary (size and hash, as TRL checks), and its
    model the same LM-head width: a KL between distributions over different token ids is meaningless.
    Checked from the tokenizer and config files, before any weights load."""
    if not cfg.teacher_model or cfg.teacher_model == cfg.model:
        return
    from transformers import AutoConfig

    from .models import load_tokenizer, resolve_model

    teacher_tokenizer = load_tokenizer(cfg.teacher_model, trust_remote_code=cfg.trust_remote_code)
    (n_student, h_student), (n_teacher, h_teacher) = vocabulary_signature(student_tokenizer), vocabulary_signature(teacher_tokenizer)
    if (n_student, h_student) != (n_teacher, h_teacher):
        what = f"{n_teacher} vs {n_student} tokens" if n_student != n_teacher else f"same size {n_student}, different token ids (vocab sha256 {h_teacher[:12]} vs {h_student[:12]})"
        raise CtxDistillError(f"--teacher-model {cfg.teacher_model} has a different vocabulary from --model {cfg.model} ({what}); "
                              f"distillation needs the same tokenizer: choose a teacher from the student's model family")
    widths = []
    for name in (cfg.model, cfg.teacher_model):
        source = resolve_model(name)  # aliases and GGUF files: their dequantized directory, which has a config
        widths.append(getattr(AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code), "vocab_size", None))
    if None not in widths and widths[0] != widths[1]:
        raise CtxDistillError(f"--teacher-model {cfg.teacher_model} predicts over {widths[1]} token ids, --model {cfg.model} over {widths[0]} "
                              f"(config vocab_size); distillation needs the same output vocabulary")


def open_cache_for_run(path: str | Path, student, examples, temperature: float):
    """Open a cache for a training run, refusing it unless it was built for this exact teacher and data."""
    from .files import fingerprint
    from .teacher_cache import CacheKey, TeacherCache, weights_fingerprint

    manifest = TeacherCache.read_manifest(Path(path))
    expected = CacheKey(weights_fingerprint(student), fingerprint(examples), float(temperature), manifest["key"].get("k", 0),
                        student.get_output_embeddings().weight.shape[0])
    return TeacherCache.open(path, expected)


def cache_teacher(cfg, out_dir: str, k: int = 64, progress: bool = True, log=print) -> dict:
    """Build the cache for the documents a DiSC run with `cfg` (a TrainConfig) would train on."""
    from .files import OutputLock, fingerprint
    from .methods.base import PrepareContext
    from .methods.disc import Disc
    from .models import load_model, load_tokenizer
    from .runtime import DTYPES, autocast, resolve_device
    from .teacher_cache import CacheKey, build_cache, check_cache_destination, weights_fingerprint

    if k < 1:
        raise CtxDistillError(f"k must be >= 1, got {k}")
    destination = check_cache_destination(Path(out_dir).expanduser(), cfg.overwrite)
    device = resolve_device(cfg.device)
    method = Disc(cfg.replace(method="disc").validate())
    documents, _ = method.load()
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    model = load_model(cfg.model, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code, allow_pickle_weights=cfg.allow_pickle_weights)
    examples = method.prepare(documents, PrepareContext(tokenizer, method.cfg)).examples
    vocab = model.get_output_embeddings().weight.shape[0]
    key = CacheKey(weights_fingerprint(model), fingerprint(examples), float(cfg.disc.temperature), min(k, vocab), vocab)
    teacher = Teacher(model=model.to(device=device, dtype=DTYPES[cfg.teacher_dtype]))
    with OutputLock(destination, "teacher cache", lock_file=destination.with_name(f".{destination.name}.lock")):
        with autocast(device, cfg.precision):
            manifest = build_cache(teacher, examples, key, destination, device, progress)
    log(f"cache-teacher: {len(examples)} documents, {manifest['positions']} positions, "
        f"{manifest['bytes'] / max(manifest['positions'], 1):.0f} bytes/position, {manifest['build_seconds']:.1f} s -> {destination}")
    return manifest


# -- teachers made from the student itself (SDFT) ---------------------------------------------------------


class SelfTeacher:
    """The teacher of a self-distillation run, of one of three kinds: `base` (the loop's teacher: the initial
    weights, the adapter-disabled model under LoRA), `ema` (a moving average of the student, updated every
    `sync_steps` optimizer steps: teacher <- (1 - rate) * teacher + rate * student; full fine-tuning moves the
    loop's frozen copy, LoRA a shadow adapter started at zero, as TRL's PEFTAdapterEMACallback), `live` (the
    current student, without gradient). `view(student, teacher)` runs it; `state_tensors` / `load_tensors`
    carry the EMA through a checkpoint."""

    def __init__(self, kind: str, lora: bool, rate: float = 0.05, sync_steps: int = 1):
        self.kind, self.lora, self.rate, self.sync_steps = kind, lora, rate, sync_steps
        self.shadow: dict[str, torch.Tensor] | None = None  # LoRA + ema: the shadow adapter (fp32)

    def shadow_of(self, student) -> dict[str, torch.Tensor]:
        if self.shadow is None:
            self.shadow = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in lora_weights(student).items()}
        return self.shadow

    @torch.no_grad()
    def update(self, student, teacher, step: int) -> None:
        """After optimizer step `step` (TRL: on_step_end when global_step % teacher_sync_steps == 0)."""
        if self.kind != "ema" or step % self.sync_steps:
            return
        if self.lora:
            shadow = self.shadow_of(student)
            for name, param in lora_weights(student).items():
                shadow[name].mul_(1 - self.rate).add_(param.detach().to(shadow[name].dtype), alpha=self.rate)
            return
        target = dict(teacher.model.named_parameters())
        for name, param in student.named_parameters():
            name = plain_name(name)
            target[name].mul_(1 - self.rate).add_(param.detach().to(target[name].dtype), alpha=self.rate)

    def state_tensors(self, teacher) -> dict[str, torch.Tensor]:
        """The EMA weights (the same on every process): LoRA the shadow adapter, full FT the teacher's parameters
        (parameters, not state_dict(): tied weights appear once, safetensors refuses shared storage)."""
        if self.kind != "ema":
            return {}
        source = (self.shadow or {}) if self.lora else (dict(teacher.model.named_parameters()) if teacher is not None else {})
        return {k: v.detach().cpu().clone() for k, v in source.items()}

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, torch.Tensor], teacher) -> None:
        if not tensors or self.kind != "ema":
            return
        if self.lora:
            self.shadow = {k: v.float().clone() for k, v in tensors.items()}
            return
        for name, param in teacher.model.named_parameters():
            param.copy_(tensors[name])

    def view(self, student, teacher) -> TeacherView:
        return TeacherView(self, student, teacher)


def trainable_weights(model) -> dict[str, torch.nn.Parameter]:
    return {plain_name(n): p for n, p in model.named_parameters() if p.requires_grad}


def lora_weights(model) -> dict[str, torch.nn.Parameter]:
    """The trainable LoRA matrices: what the ema teacher's shadow adapter averages (TRL: pure LoRA only)."""
    weights = trainable_weights(model)
    others = [n for n in weights if "lora_" not in n]
    if others:
        raise CtxDistillError(f"sdft_teacher ema under LoRA averages the adapter only, but {others[0]} also trains; use full fine-tuning")
    return weights


def plain_name(name: str) -> str:
    """A parameter's name without the wrappers' prefixes (torch.compile, DDP)."""
    for prefix in ("_orig_mod.", "module."):
        name = name.replace(prefix, "")
    return name


class TeacherView:
    """The teacher of this run as one interface: `view(...)`, `view.hidden_states(...)`, `view.head_weight`,
    all without gradient. base: the loop's teacher; live: the student; ema: the loop's frozen copy (full FT)
    or the student with the shadow adapter swapped in for the duration of the `with` block (LoRA)."""

    def __init__(self, owner: SelfTeacher, student, teacher):
        self.kind = owner.kind
        self.lora_ema = self.kind == "ema" and owner.lora
        self.owner, self.student, self.teacher = owner, student, teacher
        if self.kind != "live" and not self.lora_ema and teacher is None:
            raise CtxDistillError(f"a {self.kind} teacher needs the teacher the loop builds when needs_teacher() is true")
        self.saved: dict[str, torch.Tensor] = {}

    def __enter__(self):
        if self.lora_ema:  # swapped before the student's forward, restored after the teacher's: autograd never sees it
            shadow = self.owner.shadow_of(self.student)
            with torch.no_grad():
                for name, param in lora_weights(self.student).items():
                    self.saved[name] = param.detach().clone()
                    param.data.copy_(shadow[name].to(param.dtype))
        return self

    def restore(self) -> None:
        if self.saved:
            with torch.no_grad():
                for name, param in lora_weights(self.student).items():
                    param.data.copy_(self.saved[name])
            self.saved = {}

    def __exit__(self, *exc):
        self.restore()

    def _student_as_teacher(self, run):
        was_training = self.student.training
        self.student.eval()  # no dropout in the teacher's pass (TRL disables dropout)
        try:
            with torch.no_grad():
                return run(self.student)
        finally:
            self.student.train(was_training)
            self.restore()  # LoRA + ema: the student's own weights are back before its forward

    def __call__(self, **kwargs):
        if self.kind == "live" or self.lora_ema:
            return self._student_as_teacher(lambda m: m(use_cache=False, **kwargs))
        return self.teacher(use_cache=False, **kwargs)

    def hidden_states(self, **kwargs) -> torch.Tensor:
        if self.kind == "live" or self.lora_ema:
            return self._student_as_teacher(lambda m: final_hidden_states(m, use_cache=False, **kwargs))
        return self.teacher.hidden_states(use_cache=False, **kwargs)

    @property
    def head_weight(self) -> torch.Tensor:
        if self.kind == "live" or self.lora_ema:
            return self.student.get_output_embeddings().weight.detach()
        return self.teacher.head_weight
