"""Batched generation with a KV cache and left padding, reusable by evaluation and data-making code.

`generate()` takes prompts as token ids and returns, for each prompt, `num_samples` decoded
completions. Prompts are sorted by length so a batch holds similar lengths (less padding); rows that
finish (end-of-turn token or a stop string) are dropped from the batch and from the KV cache, so one
long answer does not keep a whole batch of short ones decoding. Sampling is seeded per batch with a
`torch.Generator`: the same prompts, settings and seed give the same completions.

On CPU, bf16 weights decode about twice as fast as fp32 (no per-step weight casts, half the memory
traffic); `generation_model(model, "bf16")` makes that copy once.

`generation.sampling.sample` (used by the training methods) wraps `model.generate`; this loop exists
for what evaluation needs on top: several samples per prompt, stop strings, and dropping finished
rows from the KV cache. Both share the stop-token and padding helpers of `generation.sampling`.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import torch

from .sampling import cache_argument, left_pad, stop_token_ids


@dataclass(frozen=True)
class Decoding:
    """How completions are drawn; recorded next to every score that uses them."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    num_samples: int = 1
    stop: tuple[str, ...] = field(default_factory=tuple)  # cut the completion before the first stop string

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stop"] = list(self.stop)
        d["mode"] = "greedy" if self.temperature == 0 else "sampled"
        return d


@dataclass
class Completion:
    text: str
    tokens: list[int]
    finished: bool  # False when max_new_tokens cut it off


def generation_model(model, dtype: str = "bf16"):
    """The model to decode with: a bf16 copy of an fp32 model when dtype is bf16, else the model itself."""
    param = next(model.parameters())
    if dtype == "bf16" and param.dtype == torch.float32:
        return copy.deepcopy(model).to(torch.bfloat16).eval()
    if dtype == "fp32" and param.dtype != torch.float32:
        return copy.deepcopy(model).to(torch.float32).eval()
    return model.eval()


def _sample(logits: torch.Tensor, decoding: Decoding, generator: torch.Generator) -> torch.Tensor:
    if decoding.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / decoding.temperature, dim=-1)
    if decoding.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        cumulative = sorted_probs.cumsum(-1)
        sorted_probs[(cumulative - sorted_probs) > decoding.top_p] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    cuts = [text.find(s) for s in stops if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], decoding: Decoding, batch_size: int = 16, seed: int = 0,
             progress=None) -> list[list[Completion]]:
    """`decoding.num_samples` completions per prompt (token-id lists), in left-padded KV-cached batches."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_token_ids(tokenizer)
    rows = [(i, s) for i in range(len(prompts)) for s in range(decoding.num_samples)]
    rows.sort(key=lambda r: (-len(prompts[r[0]]), r[0], r[1]))
    results: list[list[Completion | None]] = [[None] * decoding.num_samples for _ in prompts]
    stop_tokens_tensor = torch.tensor(list(stops), device=device)
    cache_arg = cache_argument(model)  # `cache` from transformers 5.2x (`past_key_values` warns there), else `past_key_values`
    for batch_index, first in enumerate(range(0, len(rows), batch_size)):
        batch = rows[first : first + batch_size]
        generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + batch_index)
        input_ids, attention = left_pad([prompts[i] for i, _ in batch], pad, device)
        positions = (attention.cumsum(-1) - 1).clamp_min(0)
        cache = DynamicCache(config=model.config)
        out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, **{cache_arg: cache},
                    use_cache=True, logits_to_keep=1)
        alive = list(range(len(batch)))  # positions in `batch` of the rows still decoding
        generated: list[list[int]] = [[] for _ in batch]
        finished = [False] * len(batch)
        last_pos = positions[:, -1]
        for step in range(decoding.max_new_tokens):
            next_tokens = _sample(out.logits[:, -1, :], decoding, generator)
            is_stop = torch.isin(next_tokens, stop_tokens_tensor).tolist()
            keep = []
            for k, row in enumerate(alive):
                if is_stop[k]:
                    finished[row] = True
                    continue
                generated[row].append(int(next_tokens[k]))
                if decoding.stop:
                    tail = tokenizer.decode(generated[row][-16:], skip_special_tokens=False)
                    if any(s in tail for s in decoding.stop):
                        finished[row] = True
                        continue
                keep.append(k)
            if not keep or step == decoding.max_new_tokens - 1:
                break
            if len(keep) < len(alive):
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                attention, last_pos, next_tokens = attention[index], last_pos[index], next_tokens[index]
                alive = [alive[k] for k in keep]
            attention = torch.cat([attention, attention.new_ones((len(alive), 1))], dim=-1)
            last_pos = last_pos + 1
            out = model(input_ids=next_tokens[:, None], attention_mask=attention, position_ids=last_pos[:, None],
                        **{cache_arg: cache}, use_cache=True)
        for row, (i, s) in enumerate(batch):
            text = tokenizer.decode(generated[row], skip_special_tokens=True)
            text, hit = _cut_at_stop(text, decoding.stop)
            results[i][s] = Completion(text, generated[row], finished[row] or hit)
        if progress is not None:
            progress(len(batch))
    return results  # type: ignore[return-value]
