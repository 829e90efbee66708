"""Batched generation with a KV cache, shared by the methods that generate text (rephrase, cd_base, mixsd).

- `sample`: left-padded batches through `model.generate` (KV cache), greedy or temperature / top-p /
  top-k sampling, seeded, with a progress bar. Every sampling setting is passed explicitly, so the
  model's own `generation_config` (which may carry its own temperature or top-k) never leaks in.
- `mixed_sample`: MixSD's token-level mixture of two conditionals of one frozen model. The naive and the
  expert prompt each keep their own KV cache; both caches are advanced in lockstep with the same chosen
  token, so both conditionals always see the same running mixed prefix.
- `with_retries`: rejection sampling (regenerate the records whose output is rejected, up to R times).
- `GenerationCache`: generated outputs on disk, keyed by model, prompt and sampling settings, reused
  across runs. With sampling, an output depends on the random stream of the batch it was drawn in;
  the cache returns whatever was generated first under the same (model, prompt, settings, seed).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .errors import CtxDistillError

STOP_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end_of_text|>", "<end_of_turn>")


def stop_token_ids(tokenizer) -> list[int]:
    """End-of-sequence and end-of-turn ids that exist in this tokenizer's vocabulary."""
    vocab = tokenizer.get_vocab()
    ids = {vocab[t] for t in STOP_TOKENS if t in vocab}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a chat conversation through the tokenizer's own chat template."""
    if not tokenizer.chat_template:
        raise CtxDistillError("this method prompts the model through its chat template, but the tokenizer has none; use a chat (post-trained) model")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def generation_autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (longest - len(p)) + list(p) for p in prompts], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long, device=device)
    return ids, mask


def cut_at_stop(row: Sequence[int], stop_ids) -> tuple[list[int], int | None]:
    """The tokens before the first stop token, and that stop token (None when the row has none)."""
    for i, t in enumerate(row):
        if t in stop_ids:
            return list(row[:i]), t
    return list(row), None


@dataclass
class Generated:
    tokens: list[int]  # without the stop token
    stop_token: int | None = None  # the end-of-turn / end-of-sequence token that ended it; None at the length limit

    @property
    def stopped(self) -> bool:
        return self.stop_token is not None


@dataclass
class GenerationStats:
    """What generation cost, for run.json: wall time, sequences and tokens, cache hits."""

    seconds: float = 0.0
    sequences: int = 0
    new_tokens: int = 0
    cached: int = 0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = {"seconds": round(self.seconds, 3), "sequences": self.sequences, "new_tokens": self.new_tokens,
               "tokens_per_s": round(self.new_tokens / self.seconds, 2) if self.seconds > 0 else None, "cached": self.cached}
        return out | self.extra


@torch.no_grad()
def sample(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    pad_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    batch_size: int = 8,
    precision: str = "bf16",
    progress: bool = True,
    desc: str = "generate",
    on_batch: Callable[[list[int], list[Generated]], None] | None = None,
) -> list[Generated]:
    """One continuation per prompt (token ids), in left-padded batches with a KV cache.

    `temperature == 0` is greedy decoding. The random stream is seeded per batch inside a forked RNG,
    so generation neither depends on nor disturbs the training run's random state. `on_batch(indices,
    outputs)` is called after every batch (the cache uses it to save progress).
    """
    from transformers import GenerationConfig

    if not prompts:
        return []
    device = model_device(model)
    greedy = temperature <= 0
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=not greedy, temperature=None if greedy else temperature,
        top_p=None if greedy else top_p, top_k=None if greedy else top_k, eos_token_id=list(stop_ids), pad_token_id=pad_id,
        use_cache=True,
    )
    was_training = model.training
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths share a batch
    results: dict[int, Generated] = {}
    bar = tqdm(total=len(prompts), desc=desc, unit="seq", disable=not progress, dynamic_ncols=True)
    try:
        for b, first in enumerate(range(0, len(order), batch_size)):
            rows = order[first : first + batch_size]
            input_ids, attention = left_pad([prompts[i] for i in rows], pad_id, device)
            devices = [device] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed * 1_000_003 + b)
                with generation_autocast(device, precision):
                    out = model.generate(input_ids=input_ids, attention_mask=attention, generation_config=config)
            for i, row in zip(rows, out[:, input_ids.shape[1] :].tolist()):
                results[i] = Generated(*cut_at_stop(row, set(stop_ids)))
            if on_batch is not None:
                on_batch(rows, [results[i] for i in rows])
            bar.update(len(rows))
    finally:
        bar.close()
        model.train(was_training)
    return [results[i] for i in range(len(prompts))]


def sample_cached(model, prompts: Sequence[Sequence[int]], cache: "GenerationCache", stats: GenerationStats,
                  keys: Sequence | None = None, **kwargs) -> list[Generated]:
    """`sample` for the prompts the cache does not hold yet; cached outputs for the rest.

    `keys` (default: the prompts) name the outputs in the cache; pass distinct keys to draw several
    samples of one prompt.
    """
    keys = [list(p) for p in prompts] if keys is None else list(keys)
    todo = [i for i, k in enumerate(keys) if cache.get(k) is None]
    stats.cached += len(prompts) - len(todo)

    def save(rows, outs):
        cache.put_many([(keys[todo[r]], {"tokens": o.tokens, "stop_token": o.stop_token}) for r, o in zip(rows, outs)])

    started = time.perf_counter()
    if todo:
        fresh = sample(model, [prompts[i] for i in todo], on_batch=save, **kwargs)
        stats.new_tokens += sum(len(g.tokens) for g in fresh)
    stats.seconds += time.perf_counter() - started
    stats.sequences += len(prompts)
    return [Generated(v["tokens"], v["stop_token"]) for v in (cache.get(k) for k in keys)]


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids for left-padded rows: 0 at each row's first real token."""
    return (mask.cumsum(-1) - 1).clamp_min(0)


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
    with generation_autocast(device, precision):
        for prompts in (naive_prompts, expert_prompts):
            ids, mask = left_pad(prompts, pad_id, device)
            cache = DynamicCache(config=model.config)
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), past_key_values=cache,
                        use_cache=True, logits_to_keep=1)
            sides.append({"mask": mask, "cache": out.past_key_values, "next_pos": mask.sum(-1), "logits": out.logits[:, -1]})
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
                            past_key_values=side["cache"], use_cache=True)
                side["cache"], side["logits"] = out.past_key_values, out.logits[:, -1]
                side["next_pos"] = side["next_pos"] + 1
    results = []
    for row in range(n):
        toks, flags = tokens[row].tolist(), from_naive[row].tolist()
        cut, stop_token = cut_at_stop(toks, set(stop_ids))
        results.append(MixedSample(cut, flags[: len(cut)], stop_token))
    return results


def with_retries(
    generate_fn: Callable[[list[int], int], list],
    accept_fn: Callable[[int, object], bool],
    num_records: int,
    max_retries: int,
) -> list[tuple[object, bool, int]]:
    """Rejection sampling over records: (output, accepted, attempts) per record.

    `generate_fn(record_indices, attempt)` returns one output per index; records whose output
    `accept_fn(index, output)` rejects are generated again, up to `max_retries` more times. A record
    that never passes keeps its last output with accepted=False.
    """
    results: list[tuple[object, bool, int]] = [(None, False, 0)] * num_records
    pending = list(range(num_records))
    for attempt in range(max_retries + 1):
        if not pending:
            break
        outputs = generate_fn(pending, attempt)
        still = []
        for idx, output in zip(pending, outputs):
            ok = bool(accept_fn(idx, output))
            results[idx] = (output, ok, attempt + 1)
            if not ok:
                still.append(idx)
        pending = still
    return results


def model_fingerprint(name: str) -> str:
    """Identity of a model for cache keys: the name, plus size and mtime of local weight files."""
    from .models import EMBEDDED_MODELS

    if name in EMBEDDED_MODELS:
        return f"embedded:{name}"
    path = Path(name).expanduser()
    if path.exists():
        files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf", ".json"))
        stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
        return f"path:{path.resolve()}:{stamp}"
    return f"hub:{name}"


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")).hexdigest()


class GenerationCache:
    """Outputs on disk under `root/<key of model + settings>.jsonl`, one line per prompt.

    A line is {"key": digest(prompt), "value": ...}; appends are flushed after every batch, so an
    interrupted run keeps what it generated. Disabled when `root` is None.

    Used as a context manager, it holds an exclusive lock on the file (`<file>.lock`) and re-reads it
    once the lock is held: processes that need the same generations (e.g. the shards of one study)
    then generate them once, and the others wait and read them from the cache.
    """

    def __init__(self, root: Path | None, model: str, settings: dict):
        self.path = None
        self.entries: dict[str, object] = {}
        self._lock_file = None
        if root is None:
            return
        self.path = Path(root) / f"{digest({'model': model_fingerprint(model), 'settings': settings})[:24]}.jsonl"
        self._read()

    def _read(self) -> None:
        if self.path is None or not self.path.is_file():
            return
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                self.entries[record["key"]] = record["value"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a torn last line from an interrupted write

    def __enter__(self) -> "GenerationCache":
        if self.path is not None:
            import fcntl

            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock_file = open(self.path.with_suffix(".lock"), "w")
            fcntl.flock(self._lock_file, fcntl.LOCK_EX)  # released by __exit__ or when the process dies
            self._read()  # what another process generated while this one waited
        return self

    def __exit__(self, *exc) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing releases the flock
            self._lock_file = None

    @staticmethod
    def key(prompt) -> str:
        return digest(prompt)

    def get(self, prompt):
        return self.entries.get(self.key(prompt))

    def put_many(self, items: list[tuple[object, object]]) -> None:
        for prompt, value in items:
            self.entries[self.key(prompt)] = value
        if self.path is None or not items:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            for prompt, value in items:
                f.write(json.dumps({"key": self.key(prompt), "value": value}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())


def cache_dir(enabled: bool) -> Path | None:
    from .segment import cache_root

    return cache_root() / "generations" if enabled else None


def write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(path)


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
