"""Training methods. Each turns records into model inputs and returns a loss; `train.py` owns the step.

A method implements three things:
- `prepare(documents, tokenizer, cfg)`: tokenise once, report what it had to skip;
- `plan(example, rng, cfg)`: the per-epoch item (DiSC draws its split points here), or None to skip;
- `loss(student, teacher, item, cfg, pad_id, device)`: a scalar loss and token counts.

Optional hooks, with defaults that suit document methods:
- `configure(cfg)`: fill method-dependent defaults (the `auto` student) and reject contradictions;
- `load(cfg)`: read and validate the input records before any model loads (default: documents);
- `prepare_uses_model = True`: `prepare` also receives `model` (the initial student), `device`,
  `out_dir`, `progress` and `log`, for methods that generate text before training; generation cost
  goes in `PreparedCorpus.generation` (train.py writes it to run.json);
- `plan` may return a list of items: consecutive optimizer steps for one example (an item with
  `reset_optimizer = True` clears the AdamW state before its step).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field

from ..errors import CtxDistillError


@dataclass
class PreparedCorpus:
    examples: list
    skipped: dict[str, list[str]] = field(default_factory=dict)
    generation: dict = field(default_factory=dict)  # {"seconds": ..., ...stats} when the method generated text


class Method:
    name: str = ""
    needs_teacher: bool = False
    input_format: str = ""
    default_student: str = "full"
    prepare_uses_model: bool = False

    def configure(self, cfg):
        """The config with `student=auto` resolved to this method's default student."""
        if cfg.student == "auto":
            return dataclasses.replace(cfg, student=self.default_student)
        return cfg

    def load(self, cfg):
        """(records, CorpusReport): the input, validated, before any model is loaded."""
        from ..corpus import load_corpus

        return load_corpus(cfg.corpus, cfg.text_field, cfg.id_field, cfg.min_chars)

    def prepare(self, documents, tokenizer, cfg) -> PreparedCorpus:
        raise NotImplementedError

    def plan(self, example, rng: random.Random, cfg):
        raise NotImplementedError

    def loss(self, student, teacher, item, cfg, pad_id: int, device):
        raise NotImplementedError


def get_method(name: str) -> Method:
    """A fresh instance of the method called `name` (methods may keep per-run state)."""
    from .cd_base import CdBase
    from .disc import Disc
    from .ft import FineTune
    from .ft_kl import FineTuneKL
    from .icl_distill import IclDistill
    from .lora import LoraFineTune
    from .mixsd import MixSD
    from .rephrase import Rephrase
    from .replay import Replay
    from .talr import Talr

    registry = {m.name: m for m in (Disc, FineTune, FineTuneKL, LoraFineTune, Rephrase, Talr, Replay, CdBase, IclDistill, MixSD)}
    if name not in registry:
        raise CtxDistillError(f"unknown method {name!r}; choose one of: {', '.join(registry)}")
    return registry[name]()
