"""MixSD: mixed contextual self-distillation for knowledge injection (Liu et al., arXiv 2605.16865).

Input: QA records {question, answer} with an optional `fact`. Targets are built token by token from
the frozen initial model: with probability λ (`mixsd_lambda`, default 0.3) the next token comes from
the naive conditional (the question alone, through the chat template), otherwise from the expert
conditional (the question plus the fact, or the answer when there is no fact, in context, through
`mixsd_expert_prompt`); both conditionals read the same running mixed prefix (two KV caches advanced
in lockstep, see `generate.mixed_sample`). Decoding is greedy by default (`mixsd_temperature 0`;
> 0 samples from the top-64). A finished target whose final answer does not match the record's
answer is regenerated, up to `mixsd_retries` times; targets that never match are dropped. The
student is then fine-tuned (SFT) on (question, accepted target), with the loss on the target tokens
only. The acceptance rate and the share of naive tokens are logged and written to run.json, the
targets to OUT/generations.jsonl.

The authors' training recipe (lr 1e-5, AdamW betas (0.9, 0.95), grad-clip 1.0, global batch 16) maps to
`--lr 1e-5 --beta2 0.95 --grad-clip 1.0 --docs-per-step 16`; their 20-step warm-up is not in the shared loop.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..generate import GenerationCache, GenerationStats, MixedSample, Timer, cache_dir, chat_ids, mixed_sample, stop_token_ids, with_retries, write_jsonl
from ..losses import token_cross_entropy
from . import Method, PreparedCorpus
from .records import load_checked_records

INPUT_FORMAT = "QA records: JSONL with `question` and `answer`, optional `fact` (shown to the expert); example bundled:mixsd_qa"
BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


@dataclass(frozen=True)
class SftExample:
    doc_id: str
    ids: tuple[int, ...]
    prompt_len: int  # no loss on the first `prompt_len` tokens


def normalise(text: str) -> str:
    text = text.lower().translate(str.maketrans({c: " " for c in string.punctuation}))
    return " ".join(text.split())


def answer_matches(text: str, answer: str) -> bool:
    """The target's final answer matches: its last \\boxed{} equals the answer when there is one,
    otherwise the answer appears in the text as whole words (case and punctuation ignored)."""
    boxed = BOXED.findall(text)
    if boxed:
        return normalise(boxed[-1]) == normalise(answer)
    wanted = normalise(answer)
    return bool(wanted) and f" {wanted} " in f" {normalise(text)} "


def expert_message(template: str, record) -> str:
    context = record.get("fact") or record["answer"]
    return template.replace("{question}", record["question"]).replace("{context}", context)


def build_targets(model, tokenizer, naive: list[list[int]], expert: list[list[int]], answers: list[str], cfg,
                  progress: bool = True, counter: dict | None = None) -> list[tuple[MixedSample, bool, int]]:
    """(target, accepted, attempts) per record: mixed sampling in batches with rejection and retries.
    `counter["new_tokens"]` accumulates the tokens generated over all attempts."""
    counter = {} if counter is None else counter
    counter.setdefault("new_tokens", 0)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stops = stop_token_ids(tokenizer)
    deterministic = cfg.mixsd_temperature <= 0 and cfg.mixsd_lambda in (0.0, 1.0)
    retries = 0 if deterministic else cfg.mixsd_retries  # a retry would reproduce the same target
    bar = tqdm(total=len(naive), desc="mixsd targets", unit="target", disable=not progress, dynamic_ncols=True)

    def generate(indices: list[int], attempt: int) -> list[MixedSample]:
        outputs = []
        for b, first in enumerate(range(0, len(indices), cfg.gen_batch_size)):
            rows = indices[first : first + cfg.gen_batch_size]
            generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + attempt * 10_007 + b)
            outputs += mixed_sample(model, [naive[i] for i in rows], [expert[i] for i in rows], lam=cfg.mixsd_lambda,
                                    max_new_tokens=cfg.mixsd_max_new_tokens, stop_ids=stops, pad_id=pad_id,
                                    temperature=cfg.mixsd_temperature, top_k=cfg.mixsd_top_k, generator=generator, precision=cfg.precision)
        counter["new_tokens"] += sum(len(o.tokens) for o in outputs)
        return outputs

    attempts_left = {}

    def accept(index: int, sample: MixedSample) -> bool:
        ok = answer_matches(tokenizer.decode(sample.tokens, skip_special_tokens=True), answers[index])
        attempts_left[index] = attempts_left.get(index, retries + 1) - 1
        if ok or attempts_left[index] == 0:
            bar.update(1)
        return ok

    was_training = model.training
    model.eval()
    try:
        return with_retries(generate, accept, len(naive), retries)
    finally:
        bar.close()
        model.train(was_training)


class MixSD(Method):
    name = "mixsd"
    input_format = INPUT_FORMAT
    prepare_uses_model = True

    def load(self, cfg):
        return load_checked_records(cfg.corpus, "mixsd", {"question": "str", "answer": "str"}, {"fact": "str"},
                                    INPUT_FORMAT, "bundled:mixsd_qa", cfg.id_field)

    def prepare(self, records, tokenizer, cfg, model=None, device=None, out_dir: Path | None = None, progress=True, log=print) -> PreparedCorpus:
        naive = [chat_ids(tokenizer, [{"role": "user", "content": r["question"]}]) for r in records]
        expert = [chat_ids(tokenizer, [{"role": "user", "content": expert_message(cfg.mixsd_expert_prompt, r)}]) for r in records]
        settings = {"kind": "mixsd", "lambda": cfg.mixsd_lambda, "temperature": cfg.mixsd_temperature, "top_k": cfg.mixsd_top_k,
                    "retries": cfg.mixsd_retries, "max_new_tokens": cfg.mixsd_max_new_tokens, "seed": cfg.seed, "precision": cfg.precision}
        keys = [{"naive": n, "expert": e, "answer": r["answer"]} for n, e, r in zip(naive, expert, records)]
        counter = {"new_tokens": 0}
        with GenerationCache(cache_dir(cfg.gen_cache), cfg.model, settings) as cache, Timer() as timer:
            todo = [i for i, k in enumerate(keys) if cache.get(k) is None]
            stats = GenerationStats(cached=len(records) - len(todo), sequences=len(records))
            if todo:
                fresh = build_targets(model, tokenizer, [naive[i] for i in todo], [expert[i] for i in todo],
                                      [records[i]["answer"] for i in todo], cfg, progress, counter)
                cache.put_many([(keys[i], {"tokens": s.tokens, "from_naive": s.from_naive, "stop_token": s.stop_token,
                                           "accepted": ok, "attempts": n}) for i, (s, ok, n) in zip(todo, fresh)])
        stats.seconds = timer.seconds
        results = [cache.get(k) for k in keys]
        examples, rejected, rows = [], [], []
        for r, prompt, res in zip(records, naive, results):
            target = res["tokens"] + ([res["stop_token"]] if res["stop_token"] is not None else [])
            rows.append({"id": r.id, "question": r["question"], "answer": r["answer"], "accepted": res["accepted"],
                         "attempts": res["attempts"], "naive_share": round(sum(res["from_naive"]) / max(len(res["from_naive"]), 1), 4),
                         "target": tokenizer.decode(res["tokens"], skip_special_tokens=True)})
            if res["accepted"] and res["tokens"]:
                examples.append(SftExample(r.id, tuple((prompt + target)[: cfg.max_length]), len(prompt)))
            else:
                rejected.append(r.id)
        flags = [f for res in results if res["accepted"] for f in res["from_naive"]]
        stats.new_tokens = counter["new_tokens"]  # over every attempt
        stats.extra = {
            "settings": settings,
            "acceptance_rate": round(sum(res["accepted"] for res in results) / len(results), 4),
            "accepted": sum(res["accepted"] for res in results),
            "mean_attempts": round(sum(res["attempts"] for res in results) / len(results), 3),
            "naive_token_share": round(sum(flags) / len(flags), 4) if flags else None,
            "cache_file": str(cache.path) if cache.path else None,
        }
        if out_dir is not None:
            write_jsonl(out_dir / "generations.jsonl", rows)
            stats.extra["file"] = str(out_dir / "generations.jsonl")
        log(f"mixsd: accepted {stats.extra['accepted']}/{len(results)} targets (acceptance rate {stats.extra['acceptance_rate']:.2f}), "
            f"naive-token share {stats.extra['naive_token_share']}, {stats.seconds:.1f} s")
        return PreparedCorpus(examples, {"rejected (answer never matched)": rejected}, stats.to_dict())

    def plan(self, example: SftExample, rng: random.Random, cfg) -> SftExample:
        return example

    def loss(self, student, teacher, item: SftExample, cfg, pad_id: int, device) -> tuple[torch.Tensor, dict]:
        ids = torch.tensor([item.ids], device=device)
        labels = ids.clone()
        labels[:, : item.prompt_len] = -100
        logits = student(input_ids=ids, use_cache=False).logits
        return token_cross_entropy(logits, labels), {"student_tokens": len(item.ids) - item.prompt_len, "teacher_tokens": 0}
