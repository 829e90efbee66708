"""Distribution drift: how far an updated model moved from the initial one where it should not have.

The initial model answers held-out chat prompts greedily once; both models are then teacher-forced on
those responses and the per-token KL(initial ‖ updated) over the full vocabulary is averaged over
response tokens. It is cheap and detects changes long before pass/fail benchmarks do.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..corpus import bundled_path, read_jsonl
from ..losses import forward_kl_per_position
from .probes import chat_prompt_ids


def load_chat_prompts(path: str | Path | None = None) -> list[str]:
    path = Path(path) if path else bundled_path("chat_prompts")
    return [record["prompt"] for _, record in read_jsonl(path) if record]


@torch.no_grad()
def greedy_responses(model, tokenizer, prompts: list[str], max_new_tokens: int = 48, batch_size: int = 8) -> list[list[int]]:
    """Greedy chat replies (token ids, end-of-turn excluded), generated in left-padded batches."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop_ids = {tokenizer.eos_token_id, pad}
    responses = []
    for first in range(0, len(prompts), batch_size):
        batch = [chat_prompt_ids(tokenizer, p) for p in prompts[first : first + batch_size]]
        longest = max(map(len, batch))
        input_ids = torch.tensor([[pad] * (longest - len(b)) + b for b in batch], device=device)
        attention = torch.tensor([[0] * (longest - len(b)) + [1] * len(b) for b in batch], device=device)
        out = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad)
        for row in out[:, longest:].tolist():
            cut = next((i for i, t in enumerate(row) if t in stop_ids), len(row))
            responses.append(row[:cut])
    return responses


@torch.no_grad()
def response_kl(reference_model, model, tokenizer, prompts: list[str], responses: list[list[int]], batch_size: int = 8) -> float:
    """Mean per-token KL(reference ‖ model) on the responses, teacher-forced after their chat prompts."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for first in range(0, len(prompts), batch_size):
        pairs = [(chat_prompt_ids(tokenizer, p), r) for p, r in zip(prompts[first : first + batch_size], responses[first : first + batch_size]) if r]
        if not pairs:
            continue
        longest = max(len(p) + len(r) for p, r in pairs)
        input_ids = torch.zeros((len(pairs), longest), dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        keep = torch.zeros_like(input_ids, dtype=torch.bool)
        for row, (p, r) in enumerate(pairs):
            input_ids[row, : len(p) + len(r)] = torch.tensor(p + r)
            attention[row, : len(p) + len(r)] = 1
            keep[row, len(p) - 1 : len(p) + len(r) - 1] = True
        kwargs = dict(input_ids=input_ids.to(device), attention_mask=attention.to(device), logits_to_keep=keep.to(device), use_cache=False)
        kl = forward_kl_per_position(reference_model(**kwargs).logits, model(**kwargs).logits)
        total += kl.sum().item()
        count += kl.numel()
    return total / max(count, 1)


def save_responses(path: Path, prompts: list[str], responses: list[list[int]], tokenizer) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for p, r in zip(prompts, responses):
            f.write(json.dumps({"prompt": p, "response": tokenizer.decode(r)}) + "\n")
