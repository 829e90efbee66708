"""The method contract: what every training method provides, and the one registry of methods.

A method turns its input records into training items and returns a loss for an item; the shared loop
(`ctxdistill.training.loop`) owns the optimizer, the device, the data order and all bookkeeping, so
every method is compared under the same optimizer, data order and outputs.

A method class declares:
- `name`, `input_format` (shown in `--help` and in errors), `config_class` (its own options, a
  dataclass that becomes the `TrainConfig` section of the same name; None when it has no options);
- `load()`: read and validate the input before any model loads (default: documents);
- `prepare(records, ctx)`: tokenise once (and generate text, for the methods that do), reporting what
  it skipped; `ctx` is always a `PrepareContext`;
- `plan(example, rng)`: this epoch's training items for one example, as a list (empty to skip it;
  several for consecutive steps on one example); drawn from `rng` alone, so a resumed run, every
  process and a teacher cache see the same items;
- `loss(student, teacher, item, device)`: a `LossOutput`.

Optional, declared here with their defaults:
- `batch_loss(student, teacher, items, device)`: the mean loss of several items in one forward pass;
  a method that implements it sets `batched = True` (the loop then packs items into passes);
- `needs_teacher()`: whether the loop must build a teacher (decided from the config, never changed
  while training);
- `resets_optimizer(item)`: the AdamW state is cleared before the step holding this item;
- `after_step(student, teacher, step)`: called after each optimizer step (SDFT's EMA teacher moves here);
- `state_dict(teacher)` / `load_state_dict(state, teacher)`: what the method keeps besides the model
  weights, so a resumed run continues exactly: `{"tensors": {name: tensor}, "json": {...}}`, the tensors
  the same on every process, the JSON per process;
- `check(cfg)`: rules that tie this method to shared options (e.g. DiSC's teacher cache);
- `student_kind(cfg)`: the student `auto` resolves to.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..errors import CtxDistillError

# Methods receive the run's `TrainConfig` (ctxdistill.config), which imports every method's config
# section from here: the annotations below name it as a string, so methods never import config.py.

REGISTRY: dict[str, type["Method"]] = {}


def register(cls: type["Method"]) -> type["Method"]:
    """Class decorator: add a method to the registry under its `name` (once)."""
    if not cls.name or cls.name in REGISTRY:
        raise ValueError(f"method name {cls.name!r} is empty or registered twice")
    REGISTRY[cls.name] = cls
    return cls


@dataclass
class LossOutput:
    """A method's loss for one item (or one packed batch of items) and what the loop logs about it.

    `metrics` (e.g. ce, kl, tau) are averaged over the step's items into losses.jsonl; `counts` are
    summed over steps and processes into run.json `counts`; `seconds` are summed over the run into
    run.json `timings_s` (the main process's), apart from `train`.
    """

    loss: torch.Tensor
    student_tokens: int
    teacher_tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # time spent outside the forward/backward, e.g. {"rollouts": 1.2}


@dataclass
class PrepareContext:
    """Everything `prepare` may use: the tokenizer, the run's config, and for methods that generate text
    before training, the initial model, where it runs and where to write what was generated."""

    tokenizer: Any
    cfg: "TrainConfig"
    model: Any = None
    device: torch.device | None = None
    out_dir: Any = None  # Path on the main process; None elsewhere and without --out
    progress: bool = True
    log: Any = print

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0


@dataclass
class PreparedCorpus:
    examples: list
    skipped: dict[str, list[str]] = field(default_factory=dict)
    generation: dict = field(default_factory=dict)  # {"seconds": ..., ...stats} when the method generated text


class Method:
    name: ClassVar[str] = ""
    input_format: ClassVar[str] = ""
    config_class: ClassVar[type | None] = None
    default_student: ClassVar[str] = "full"
    batched: ClassVar[bool] = False  # implements batch_loss

    def __init__(self, cfg: "TrainConfig"):
        self.cfg = cfg
        self.config = getattr(cfg, self.name) if self.config_class is not None else None
        self.pad_id = 0  # set by prepare from the tokenizer

    # -- decided from the config ------------------------------------------------------------------

    @classmethod
    def student_kind(cls, cfg: "TrainConfig") -> str:
        return cls.default_student

    @classmethod
    def check(cls, cfg: "TrainConfig") -> None:
        """Reject combinations of this method with shared options; the section validates itself."""

    def needs_teacher(self) -> bool:
        return False

    # -- input --------------------------------------------------------------------------------------

    def load(self):
        """(records, CorpusReport): the input, validated, before any model is loaded."""
        from ..inputs.corpus import load_corpus

        return load_corpus(self.cfg.corpus, self.cfg.text_field, self.cfg.id_field, self.cfg.min_chars)

    def prepare(self, records, ctx: PrepareContext) -> PreparedCorpus:
        raise NotImplementedError

    def plan(self, example, rng: random.Random) -> list:
        raise NotImplementedError

    # -- loss ---------------------------------------------------------------------------------------

    def loss(self, student, teacher, item, device) -> LossOutput:
        raise NotImplementedError

    def batch_loss(self, student, teacher, items: list, device) -> LossOutput:
        """The mean of `loss` over `items`, in fewer forward passes; only when `batched` is True."""
        raise NotImplementedError(f"{self.name} has no batched loss")

    def resets_optimizer(self, item) -> bool:
        return False

    def after_step(self, student, teacher, step: int) -> None:
        """After optimizer step `step` (1-based): update state that follows the student."""

    def state_dict(self, teacher) -> dict:
        return {"tensors": {}, "json": {}}

    def load_state_dict(self, state: dict, teacher) -> None:
        """Restore `state_dict`'s content on resume (called after the teacher is built)."""


def method_class(name: str) -> type[Method]:
    """The registered method class (importing the `methods` package, which any import of this module
    does first, registers every method)."""
    if name not in REGISTRY:
        raise CtxDistillError(f"unknown method {name!r}; choose one of: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def get_method(cfg: "TrainConfig") -> Method:
    """A fresh instance of `cfg.method` bound to `cfg` (methods may keep per-run state)."""
    return method_class(cfg.method)(cfg)
