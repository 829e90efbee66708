"""Replay (DiSC paper, post-submission baseline): another method on the documents, plus N replay
demonstrations mixed into the shuffled stream.

`replay_n` {prompt, response} pairs are drawn (seeded) from `replay_source` (default: 300 bundled
GSM8K train problems) and formatted as the authors did, f"{prompt}\\n{response}" with CE on every
token (`replay_format plain`), or through the chat template with CE on the response only (`chat`).
With `replay_kl_weight > 0` a replay item's loss is CE + weight · KL(initial model ‖ student) at
`kl_temperature`, as in the authors' code; document items keep the loss of `replay_method`.
Replay items are examples like any document, so the epoch shuffle spreads them uniformly: each
epoch holds exactly `replay_n` replay steps among `replay_n + documents` steps.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..errors import CtxDistillError
from ..generate import chat_ids
from ..losses import ft_kl_loss, token_cross_entropy
from . import Method, PreparedCorpus
from .records import load_checked_records


@dataclass(frozen=True)
class ReplayExample:
    doc_id: str
    ids: tuple[int, ...]
    labels: tuple[int, ...]  # -100 where no loss is taken


def draw_replay(records: list, n: int, seed: int) -> list:
    """`n` records drawn without replacement with random.Random(seed) (all of them when n >= len)."""
    if n >= len(records):
        return list(records)
    return random.Random(seed).sample(records, n)


def replay_example(record, tokenizer, fmt: str, max_length: int) -> ReplayExample:
    if fmt == "chat":
        prompt = chat_ids(tokenizer, [{"role": "user", "content": record["prompt"]}])
        response = tokenizer(record["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt + response)[:max_length]
        labels = ([-100] * len(prompt) + response)[:max_length]
    else:
        ids = tokenizer(f"{record['prompt']}\n{record['response']}")["input_ids"][:max_length]
        labels = list(ids)
    return ReplayExample(f"replay:{record.id}", tuple(ids), tuple(labels))


class Replay(Method):
    name = "replay"
    input_format = ("documents, as `replay_method` needs them (default ft: JSONL field `text`); replay pairs come from "
                    "`replay_source`: JSONL with `prompt` and `response` (default bundled:gsm8k_train)")

    def __init__(self):
        self.base = None
        self.replay_records = []

    def configure(self, cfg):
        from . import get_method

        if cfg.replay_n < 1:
            raise CtxDistillError("method replay needs replay_n >= 1 (the number of replay examples to mix in)")
        self.base = get_method(cfg.replay_method)
        cfg = self.base.configure(cfg)
        self.needs_teacher = self.base.needs_teacher or cfg.replay_kl_weight > 0
        self.prepare_uses_model = self.base.prepare_uses_model
        return cfg

    def load(self, cfg):
        documents, report = self.base.load(cfg)
        records, _ = load_checked_records(cfg.replay_source, "replay (replay_source)", {"prompt": "str", "response": "str"},
                                          input_format="JSONL records with `prompt` and `response`", example="bundled:gsm8k_train",
                                          option="replay_source")
        self.replay_records = draw_replay(records, cfg.replay_n, cfg.seed)
        return documents, report

    def prepare(self, documents, tokenizer, cfg, **kwargs) -> PreparedCorpus:
        prepared = self.base.prepare(documents, tokenizer, cfg, **(kwargs if self.base.prepare_uses_model else {}))
        replay = [replay_example(r, tokenizer, cfg.replay_format, cfg.max_length) for r in self.replay_records]
        log = kwargs.get("log", print)
        log(f"replay: {len(replay)} replay examples from {cfg.replay_source} mixed among {len(prepared.examples)} {self.base.name} examples")
        return PreparedCorpus(prepared.examples + replay, prepared.skipped, prepared.generation)

    def plan(self, example, rng: random.Random, cfg):
        if isinstance(example, ReplayExample):
            return example
        return self.base.plan(example, rng, cfg)

    def loss(self, student, teacher, item, cfg, pad_id: int, device):
        if not isinstance(item, ReplayExample):
            return self.base.loss(student, teacher, item, cfg, pad_id, device)
        ids = torch.tensor([item.ids], device=device)
        labels = torch.tensor([item.labels], device=device)
        logits = student(input_ids=ids, use_cache=False).logits
        tokens = sum(1 for t in item.labels[1:] if t != -100)
        if cfg.replay_kl_weight > 0:
            teacher_logits = teacher(input_ids=ids, use_cache=False).logits
            loss, _, _ = ft_kl_loss(logits, teacher_logits, labels, cfg.replay_kl_weight, cfg.kl_temperature)
            return loss, {"student_tokens": tokens, "teacher_tokens": len(item.ids)}
        return token_cross_entropy(logits, labels), {"student_tokens": tokens, "teacher_tokens": 0}
