"""Training methods. Each turns records into model inputs and returns a loss; `train.py` owns the step.

A method implements three things:
- `prepare(documents, tokenizer, cfg)`: tokenise once, report what it had to skip;
- `plan(example, rng, cfg)`: the per-epoch item (DiSC draws its split points here), or None to skip;
- `loss(student, teacher, item, cfg, pad_id, device)`: a scalar loss and token counts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class PreparedCorpus:
    examples: list
    skipped: dict[str, list[str]] = field(default_factory=dict)


class Method:
    name: str = ""
    needs_teacher: bool = False
    input_format: str = ""

    def prepare(self, documents, tokenizer, cfg) -> PreparedCorpus:
        raise NotImplementedError

    def plan(self, example, rng: random.Random, cfg):
        raise NotImplementedError

    def loss(self, student, teacher, item, cfg, pad_id: int, device):
        raise NotImplementedError


def get_method(name: str) -> Method:
    from .disc import Disc
    from .ft import FineTune

    registry = {m.name: m for m in (Disc(), FineTune())}
    return registry[name]
