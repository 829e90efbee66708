"""Replay (DiSC paper, post-submission baseline): another method on the documents, plus N replay
demonstrations mixed into the shuffled stream.

`replay_n` {prompt, response} pairs are drawn (seeded) from `replay_source` (default: 300 bundled
GSM8K train problems) and formatted as the authors did, f"{prompt}\\n{response}" with CE on every
token (`replay_format plain`), or through the chat template with CE on the response only (`chat`).
With `replay_kl_weight > 0` a replay item's loss is CE + weight · KL(initial model ‖ student) at
`kl_temperature`, as in the authors' code; document items keep the loss of `replay_method`.
Replay items are examples like any document, so the epoch shuffle spreads them uniformly: each
epoch holds exactly `replay_n` replay steps among `replay_n + documents` steps.

ctxdistill variant, not in the paper (chat retention): `replay_ce_weight` scales the CE, so
`replay_ce_weight 0` with `replay_kl_weight > 0` makes replay items a pure KL(initial ‖ student) term on
chat replies (e.g. `bundled:chat_retention`); records without a `response` get the initial model's greedy
reply (at most `replay_max_new_tokens`), generated once before training and cached like other generations.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..errors import CtxDistillError
from ..generate import GenerationCache, GenerationStats, cache_dir, chat_ids, sample_cached, stop_token_ids, write_jsonl
from ..losses import replay_loss
from . import Method, PreparedCorpus
from .records import Record, load_checked_records


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


def needs_response(record) -> bool:
    """A record with no `response` field (or null): the initial model answers it before training."""
    return record.get("response") is None


def generate_responses(records: list, model, tokenizer, cfg, progress: bool = True) -> tuple[list, GenerationStats]:
    """`records` with each missing `response` filled by the model's greedy chat reply (cached on disk).

    Greedy, so the reply is the initial model's own most likely answer: what retention should preserve.
    """
    todo = [r for r in records if needs_response(r)]
    prompts = [chat_ids(tokenizer, [{"role": "user", "content": r["prompt"]}]) for r in todo]
    settings = {"kind": "replay_response", "temperature": 0.0, "max_new_tokens": cfg.replay_max_new_tokens, "precision": cfg.precision}
    stats = GenerationStats()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with GenerationCache(cache_dir(cfg.gen_cache), cfg.model, settings) as cache:
        outputs = sample_cached(model, prompts, cache, stats, max_new_tokens=cfg.replay_max_new_tokens, stop_ids=stop_token_ids(tokenizer),
                                pad_id=pad_id, temperature=0.0, batch_size=cfg.gen_batch_size, precision=cfg.precision,
                                progress=progress, desc="replay responses")
    replies = {id(r): tokenizer.decode(o.tokens, skip_special_tokens=True).strip() for r, o in zip(todo, outputs)}
    stats.extra = {"settings": settings, "cache_file": str(cache.path) if cache.path else None,
                   "unfinished": sum(not o.stopped for o in outputs)}
    filled = [Record(r.id, r.fields | {"response": replies[id(r)]}) if id(r) in replies else r for r in records]
    return filled, stats


class Replay(Method):
    name = "replay"
    input_format = ("documents, as `replay_method` needs them (default ft: JSONL field `text`); replay pairs come from "
                    "`replay_source`: JSONL with `prompt` and `response` (default bundled:gsm8k_train); records without "
                    "`response` get the initial model's greedy reply")

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
        records, _ = load_checked_records(cfg.replay_source, "replay (replay_source)", {"prompt": "str"}, {"response": "str"},
                                          input_format="JSONL records with `prompt` and optional `response`",
                                          example="bundled:gsm8k_train", option="replay_source")
        records = [r for r in records if needs_response(r) or r["response"].strip()]  # an empty response is skipped, as before
        if not records:
            raise CtxDistillError(f"no usable records in {cfg.replay_source} for replay: every response is empty")
        self.replay_records = draw_replay(records, cfg.replay_n, cfg.seed)
        self.prepare_uses_model = self.base.prepare_uses_model or any(map(needs_response, self.replay_records))
        return documents, report

    def prepare(self, documents, tokenizer, cfg, **kwargs) -> PreparedCorpus:
        prepared = self.base.prepare(documents, tokenizer, cfg, **(kwargs if self.base.prepare_uses_model else {}))
        log = kwargs.get("log", print)
        records, generation = self.replay_records, prepared.generation
        if any(map(needs_response, records)):
            records, stats = generate_responses(records, kwargs["model"], tokenizer, cfg, kwargs.get("progress", True))
            out_dir = kwargs.get("out_dir")
            if out_dir is not None:
                write_jsonl(out_dir / "replay_responses.jsonl", [{"id": r.id, "prompt": r["prompt"], "response": r["response"]}
                                                                 for r in records])
            log(f"replay: {stats.sequences} greedy replies in {stats.seconds:.1f} s ({stats.cached} from the cache)")
            generation = (stats.to_dict() if not generation else
                          generation | {"seconds": generation.get("seconds", 0.0) + stats.seconds, "replay_responses": stats.to_dict()})
        empty = [r.id for r in records if not r["response"].strip()]
        replay = [replay_example(r, tokenizer, cfg.replay_format, cfg.max_length) for r in records if r["response"].strip()]
        log(f"replay: {len(replay)} replay examples from {cfg.replay_source} mixed among {len(prepared.examples)} {self.base.name} examples")
        skipped = prepared.skipped | ({"empty-replay-reply": empty} if empty else {})
        return PreparedCorpus(prepared.examples + replay, skipped, generation)

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
        teacher_logits = teacher(input_ids=ids, use_cache=False).logits if cfg.replay_kl_weight > 0 else None
        loss = replay_loss(logits, teacher_logits, labels, cfg.replay_ce_weight, cfg.replay_kl_weight, cfg.kl_temperature)
        return loss, {"student_tokens": tokens, "teacher_tokens": len(item.ids) if teacher_logits is not None else 0}
