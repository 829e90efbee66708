"""Batched generation with a KV cache, shared by the methods that generate text (rephrase, cd_base,
mixsd, replay) and by their cache.

- `sample`: left-padded batches through `model.generate` (KV cache), greedy or temperature / top-p /
  top-k sampling, seeded, with a progress bar. Every sampling setting is passed explicitly, so the
  model's own `generation_config` (which may carry its own temperature or top-k) never leaks in.
- `sample_cached`: `sample` for the prompts the generation cache (generation/cache.py) does not hold.
- `with_retries`: rejection sampling (regenerate the records whose output is rejected, up to R times).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..errors import CtxDistillError
from ..runtime import autocast, model_device

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


def prompt_ids(tokenizer, prompt) -> list[int]:
    """A prompt's ids: chat messages through the chat template (with the generation prompt), text as text (TRL)."""
    if isinstance(prompt, list):
        return chat_ids(tokenizer, prompt)
    return list(tokenizer(prompt)["input_ids"])


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (longest - len(p)) + list(p) for p in prompts], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long, device=device)
    return ids, mask


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids for left-padded rows: 0 at each row's first real token."""
    return (mask.cumsum(-1) - 1).clamp_min(0)


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
                with autocast(device, precision):
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


def sample_cached(model, prompts: Sequence[Sequence[int]], cache, stats: GenerationStats,
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


def cache_argument(model) -> str:
    """The forward argument that takes the KV cache: `cache` from transformers 5.2x, `past_key_values` before."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
