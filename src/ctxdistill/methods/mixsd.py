"""MixSD: mixed contextual self-distillation for knowledge injection (Liu et al., arXiv 2605.16865).

Input: QA records {question, answer} with an optional `fact`. Targets are built token by token from
the frozen initial model: with probability λ (`mixsd_lambda`, default 0.3) the next token comes from
the naive conditional (the question alone, through the chat template), otherwise from the expert
conditional (the question plus the fact, or the answer when there is no fact, in context, through
`mixsd_expert_prompt`); both conditionals read the same running mixed prefix (two KV caches advanced
in lockstep, see `mixed_sample`). Decoding is greedy by default (`mixsd_temperature 0`;
> 0 samples from the top-64). A finished target whose final answer does not match the record's
answer is regenerated, up to `mixsd_retries` times; targets that never match are dropped. The
student is then fine-tuned (SFT) on (question, accepted target), with the loss on the target tokens
only. The acceptance rate and the share of naive tokens are logged and written to run.json, the
targets to OUT/generations.jsonl.

The authors' training recipe (lr 1e-5, AdamW betas (0.9, 0.95), grad-clip 1.0, global batch 16) maps to
`--lr 1e-5 --beta2 0.95 --grad-clip 1.0 --docs-per-step 16 --lr-scheduler constant_with_warmup --warmup-steps 20`
(their 20-step warm-up, then constant).
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..generation.cache import GenerationCache, cache_dir
from ..generation.sampling import GenerationStats, cache_argument, chat_ids, cut_at_stop, left_pad, positions_from_mask, stop_token_ids, with_retries
from ..inputs.records import load_checked_records
from .heads import head_ce_kl, mean_per_sequence_weights, sequence_batch
from ..errors import CtxDistillError
from ..options import opt, require
from ..runtime import Timer, autocast, model_device
from .base import LossOutput, Method, PrepareContext, PreparedCorpus, register
from .rephrase import write_generations

INPUT_FORMAT = "QA records: JSONL with `question` and `answer`, optional `fact` (shown to the expert); example bundled:mixsd_qa"
BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
DEFAULT_MIXSD_EXPERT_PROMPT = ("{question}\nThis question is from a new knowledge base. Here is the answer to this question:\n"
                               "{context}\nNow answer the question.")


@dataclass
class MixSDConfig:
    """mixsd options"""

    mixsd_lambda: float = opt(0.3, "mixsd: probability that a target token comes from the naive conditional (0 = pure expert, 1 = pure naive)")
    mixsd_retries: int = opt(10, "mixsd: regenerations of a target whose answer does not match")
    mixsd_temperature: float = opt(0.0, "mixsd: 0 = greedy; > 0 samples from the top-k softmax(logits / T)")
    mixsd_top_k: int = opt(64, "mixsd: top-k when sampling")
    mixsd_max_new_tokens: int = opt(128, "mixsd: longest target in tokens")
    mixsd_expert_prompt: str = opt(DEFAULT_MIXSD_EXPERT_PROMPT, "mixsd: expert user message with {question} and {context} (the record's fact, else its answer)")

    def validate(self) -> None:
        require(self, ("mixsd_lambda",), lambda v: 0 <= v <= 1, "in [0, 1]")
        require(self, ("mixsd_retries", "mixsd_temperature", "mixsd_top_k"), lambda v: v >= 0, ">= 0")
        require(self, ("mixsd_max_new_tokens",), lambda v: v >= 1, ">= 1")
        missing = [k for k in ("{question}", "{context}") if k not in self.mixsd_expert_prompt]
        if missing:
            raise CtxDistillError(f"mixsd_expert_prompt must contain {' and '.join(missing)}")


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


@dataclass
class MixedSample:
    tokens: list[int]  # without the stop token
    from_naive: list[bool]  # per token: drawn from the naive conditional (True) or the expert one
    stop_token: int | None = None

    @property
    def naive_share(self) -> float:
        return sum(self.from_naive) / len(self.from_naive) if self.from_naive else 0.0


def choose_tokens(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator | None) -> torch.Tensor:
    """Greedy argmax (temperature 0) or a sample from the top-k renormalised softmax(logits / T)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        values, indices = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
        picks = torch.multinomial(values.softmax(-1).cpu(), 1, generator=generator).to(logits.device)
        return indices.gather(-1, picks)[:, 0]
    return torch.multinomial(logits.softmax(-1).cpu(), 1, generator=generator)[:, 0].to(logits.device)


@torch.no_grad()
def mixed_sample(
    model,
    naive_prompts: Sequence[Sequence[int]],
    expert_prompts: Sequence[Sequence[int]],
    *,
    lam: float,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    pad_id: int,
    temperature: float = 0.0,
    top_k: int = 64,
    generator: torch.Generator | None = None,
    precision: str = "bf16",
) -> list[MixedSample]:
    """MixSD targets for one batch: at each step, with probability `lam` the next token comes from the
    naive conditional p(· | naive prompt, y<t), otherwise from the expert one p(· | expert prompt, y<t).

    Each side has its own KV cache; after every step the chosen token is fed to both, so the two
    conditionals always share the running mixed prefix y<t.
    """
    from transformers import DynamicCache

    assert len(naive_prompts) == len(expert_prompts)
    device = model_device(model)
    n = len(naive_prompts)
    stop = torch.tensor(sorted(set(stop_ids)), device=device)
    sides = []
    cache_arg = cache_argument(model)
    with autocast(device, precision):
        for prompts in (naive_prompts, expert_prompts):
            ids, mask = left_pad(prompts, pad_id, device)
            cache = DynamicCache(config=model.config)
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), **{cache_arg: cache},
                        use_cache=True, logits_to_keep=1)
            sides.append({"mask": mask, "cache": cache, "next_pos": mask.sum(-1), "logits": out.logits[:, -1]})  # filled in place
        tokens = torch.zeros((n, 0), dtype=torch.long, device=device)
        from_naive = torch.zeros((n, 0), dtype=torch.bool, device=device)
        done = torch.zeros(n, dtype=torch.bool, device=device)
        stopped = torch.zeros(n, dtype=torch.bool, device=device)
        for _ in range(max_new_tokens):
            coin = torch.rand(n, generator=generator).to(device) < lam
            logits = torch.where(coin[:, None], sides[0]["logits"], sides[1]["logits"])
            nxt = choose_tokens(logits, temperature, top_k, generator)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            from_naive = torch.cat([from_naive, coin[:, None]], dim=1)
            hit = torch.isin(nxt, stop) & ~done
            stopped |= hit
            done |= hit
            if bool(done.all()):
                break
            for side in sides:
                side["mask"] = torch.cat([side["mask"], torch.ones((n, 1), dtype=side["mask"].dtype, device=device)], dim=1)
                out = model(input_ids=nxt[:, None], attention_mask=side["mask"], position_ids=side["next_pos"][:, None],
                            **{cache_arg: side["cache"]}, use_cache=True)
                side["logits"] = out.logits[:, -1]
                side["next_pos"] = side["next_pos"] + 1
    results = []
    for row in range(n):
        toks, flags = tokens[row].tolist(), from_naive[row].tolist()
        cut, stop_token = cut_at_stop(toks, set(stop_ids))
        results.append(MixedSample(cut, flags[: len(cut)], stop_token))
    return results



def build_targets(model, tokenizer, naive: list[list[int]], expert: list[list[int]], answers: list[str], cfg,
                  progress: bool = True, counter: dict | None = None) -> list[tuple[MixedSample, bool, int]]:
    """`cfg` is the run's TrainConfig (its mixsd section and generation options)."""
    """(target, accepted, attempts) per record: mixed sampling in batches with rejection and retries.
    `counter["new_tokens"]` accumulates the tokens generated over all attempts."""
    c = cfg.mixsd
    counter = {} if counter is None else counter
    counter.setdefault("new_tokens", 0)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stops = stop_token_ids(tokenizer)
    deterministic = c.mixsd_temperature <= 0 and c.mixsd_lambda in (0.0, 1.0)
    retries = 0 if deterministic else c.mixsd_retries  # a retry would reproduce the same target
    bar = tqdm(total=len(naive), desc="mixsd targets", unit="target", disable=not progress, dynamic_ncols=True)

    def generate(indices: list[int], attempt: int) -> list[MixedSample]:
        outputs = []
        for b, first in enumerate(range(0, len(indices), cfg.gen_batch_size)):
            rows = indices[first : first + cfg.gen_batch_size]
            generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + attempt * 10_007 + b)
            outputs += mixed_sample(model, [naive[i] for i in rows], [expert[i] for i in rows], lam=c.mixsd_lambda,
                                    max_new_tokens=c.mixsd_max_new_tokens, stop_ids=stops, pad_id=pad_id,
                                    temperature=c.mixsd_temperature, top_k=c.mixsd_top_k, generator=generator, precision=cfg.precision)
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


@register
class MixSD(Method):
    name = "mixsd"
    input_format = INPUT_FORMAT
    config_class = MixSDConfig

    def load(self):
        return load_checked_records(self.cfg.corpus, "mixsd", {"question": "str", "answer": "str"}, {"fact": "str"},
                                    INPUT_FORMAT, "bundled:mixsd_qa", self.cfg.id_field)

    def prepare(self, records, ctx: PrepareContext) -> PreparedCorpus:
        tokenizer, cfg, c = ctx.tokenizer, ctx.cfg, self.config
        naive = [chat_ids(tokenizer, [{"role": "user", "content": r["question"]}]) for r in records]
        expert = [chat_ids(tokenizer, [{"role": "user", "content": expert_message(c.mixsd_expert_prompt, r)}]) for r in records]
        settings = {"kind": "mixsd", "lambda": c.mixsd_lambda, "temperature": c.mixsd_temperature, "top_k": c.mixsd_top_k,
                    "retries": c.mixsd_retries, "max_new_tokens": c.mixsd_max_new_tokens, "seed": cfg.seed, "precision": cfg.precision}
        keys = [{"naive": n, "expert": e, "answer": r["answer"]} for n, e, r in zip(naive, expert, records)]
        counter = {"new_tokens": 0}
        with GenerationCache(cache_dir(cfg.gen_cache), cfg.model, settings) as cache, Timer() as timer:
            todo = [i for i, k in enumerate(keys) if cache.get(k) is None]
            stats = GenerationStats(cached=len(records) - len(todo), sequences=len(records))
            if todo:
                fresh = build_targets(ctx.model, tokenizer, [naive[i] for i in todo], [expert[i] for i in todo],
                                      [records[i]["answer"] for i in todo], cfg, ctx.progress, counter)
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
        write_generations(ctx, rows, stats)
        ctx.log(f"mixsd: accepted {stats.extra['accepted']}/{len(results)} targets (acceptance rate {stats.extra['acceptance_rate']:.2f}), "
            f"naive-token share {stats.extra['naive_token_share']}, {stats.seconds:.1f} s")
        return PreparedCorpus(examples, {"rejected (answer never matched)": rejected}, stats.to_dict())

    def plan(self, example: SftExample, rng: random.Random) -> list:
        return [example]

    def loss(self, student, teacher, item: SftExample, device) -> LossOutput:
        labels = [-100] * item.prompt_len + list(item.ids[item.prompt_len:])
        batch = sequence_batch([(item.ids, labels)], self.pad_id, device, packed=True)
        _, ce = head_ce_kl(student, teacher, batch.inputs, batch.rows, batch.targets, mean_per_sequence_weights(batch, 1),
                           chunk_size=self.cfg.kl_chunk_size, kernels=self.cfg.kernels)
        return LossOutput(ce, len(item.ids) - item.prompt_len)
