"""Typed configuration: one dataclass per command, loadable from YAML, overridable from the CLI.

Every field carries its help text, so `ctxdistill train --help` and the YAML schema cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import CtxDistillError
from .segment import SPLIT_STRATEGIES


def opt(default, help: str, choices: tuple | None = None):
    """A dataclass field with CLI help (and allowed values) attached."""
    return field(default=default, metadata={"help": help, "choices": choices})


METHOD_NAMES = ("disc", "ft")


@dataclass
class TrainConfig:
    # what to train
    method: str = opt("disc", "training method", METHOD_NAMES)
    model: str = opt("smollm2-135m-instruct", "alias, local model directory, .gguf file or HF id")
    corpus: str = opt("bundled:news_updates", "JSONL / .txt / directory / any local file datasets can read; bundled:NAME for package data")
    out: str = opt("runs/train", "output directory (model/, run.json, losses.jsonl)")
    text_field: str = opt("text", "JSONL/dataset field holding the document text")
    id_field: str = opt("id", "JSONL/dataset field holding the document id (row number when absent)")
    min_chars: int = opt(20, "documents shorter than this many characters are skipped and reported")
    # optimisation (the DiSC authors' defaults)
    lr: float = opt(3e-6, "AdamW learning rate (constant, no warm-up)")
    epochs: int = opt(1, "passes over the corpus")
    max_steps: int = opt(0, "stop after this many optimizer steps (0 = no limit)")
    docs_per_step: int = opt(1, "documents averaged into one optimizer step")
    weight_decay: float = opt(0.01, "AdamW weight decay")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.999, "AdamW beta2")
    eps: float = opt(1e-8, "AdamW epsilon")
    grad_clip: float = opt(0.0, "clip the gradient norm to this value (0 = no clipping, as the authors)")
    seed: int = opt(1234, "seed for data order, split points, dropout")
    # DiSC
    temperature: float = opt(2.0, "distillation temperature T (loss is scaled by T^2)")
    split_strategy: str = opt("sentence_boundary", "how documents are split into prefix/suffix pairs", SPLIT_STRATEGIES)
    num_splits: int = opt(5, "split points per document (k) for sentence_boundary and token strategies")
    suffix_tokens: int = opt(0, "suffix length for token_random_variable_suffix (0 = to the document end)")
    min_suffix_tokens: int = opt(2, "suffixes shorter than this are dropped")
    teacher_mode: str = opt("single_pass", "single_pass: one teacher forward per document; per_split: the authors' reference (one per split point)", ("single_pass", "per_split"))
    max_length: int = opt(2048, "longest sequence the model sees; longer documents are cut at sentence boundaries into windows")
    # precision and devices
    precision: str = opt("bf16", "bf16: fp32 master weights with bf16 autocast; fp32: no autocast", ("bf16", "fp32"))
    teacher_dtype: str = opt("bf16", "dtype of the frozen teacher copy (full fine-tuning only)", ("bf16", "fp32"))
    device: str = opt("auto", "auto (cuda if available), cpu, cuda, cuda:N")
    # student
    student: str = opt("full", "full fine-tuning or a LoRA adapter (the teacher is then the adapter-disabled model)", ("full", "lora"))
    lora_r: int = opt(16, "LoRA rank")
    lora_alpha: int = opt(32, "LoRA alpha")
    lora_dropout: float = opt(0.1, "LoRA dropout")
    lora_targets: str = opt("all-linear", "LoRA target modules: all-linear or a comma-separated list of module names")
    merge_lora: bool = opt(False, "also write OUT/merged: the LoRA adapter merged into a plain model")
    # bookkeeping
    save_model: bool = opt(True, "write OUT/model at the end")
    overwrite: bool = opt(False, "replace an existing non-empty output directory")
    trust_remote_code: bool = opt(False, "allow model repositories to run their own code (off by default)")
    log_every: int = opt(1, "write a losses.jsonl line every N optimizer steps")

    def validate(self) -> "TrainConfig":
        check_choices(self)
        for name in ("lr", "temperature"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise CtxDistillError(f"{name} must be a finite number > 0, got {value!r}")
        for name in ("epochs", "docs_per_step", "num_splits", "min_suffix_tokens", "max_length", "log_every", "lora_r"):
            if getattr(self, name) < 1:
                raise CtxDistillError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("max_steps", "grad_clip", "weight_decay", "suffix_tokens", "min_chars"):
            if not getattr(self, name) >= 0:
                raise CtxDistillError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not (0 <= self.lora_dropout < 1):
            raise CtxDistillError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        return self


def check_choices(cfg) -> None:
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        value = getattr(cfg, f.name)
        if choices and value not in choices:
            raise CtxDistillError(f"unknown {f.name} {value!r}; choose one of: {', '.join(map(str, choices))}")


def field_type(cls, f: dataclasses.Field) -> type:
    """The plain Python type of a field (str, int, float, bool)."""
    hint = typing.get_type_hints(cls)[f.name]
    if isinstance(hint, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def coerce(cls, name: str, value):
    """Check a YAML value's type against the field; ints are accepted where floats are expected."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if name not in fields:
        raise CtxDistillError(f"unknown option {name!r}; valid options: {', '.join(sorted(fields))}")
    kind = field_type(cls, fields[name])
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):  # YAML reads 3e-6 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CtxDistillError(f"option {name!r} must be {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CtxDistillError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise CtxDistillError(f"invalid YAML in {path}{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CtxDistillError(f"config file {path} must hold a mapping of option: value, got {type(data).__name__}")
    return {k.replace("-", "_"): v for k, v in data.items()}


def build_config(cls, yaml_path: str | None = None, overrides: dict | None = None):
    """YAML values first, then explicit overrides; every value type-checked, then validated."""
    values = {}
    if yaml_path:
        values.update({k: coerce(cls, k, v) for k, v in load_yaml(yaml_path).items()})
    for k, v in (overrides or {}).items():
        values[k] = coerce(cls, k, v)
    cfg = cls(**values)
    return cfg.validate() if hasattr(cfg, "validate") else cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
