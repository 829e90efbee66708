"""Distribution drift: how far an updated model moved from the initial one where it should not have.

Two measures, both teacher-forced and over the full vocabulary:

- chat drift: the initial model answers held-out chat prompts greedily once; both models are then
  teacher-forced on those responses and the per-token KL(initial ‖ updated) is averaged over response
  tokens. The same pass gives the updated model's mean log-probability of the initial model's own
  responses, a continuous retention measure (it falls as soon as the model stops "agreeing" with its
  former self). Both are cheap and detect changes long before pass/fail benchmarks do.
- per-token KL on the training documents (the DiSC paper's forgetting predictor, its
  `compute_kl.py`): whole documents, batch size 1, no context splitting, KL summed over the vocabulary
  at each position and averaged over all tokens; reported in nats and bits per token. Positions whose
  KL is not finite are skipped and counted.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch

from ..inputs.corpus import bundled_path, read_jsonl
from ..losses import forward_kl_per_position
from .probes import chat_prompt_ids


def load_chat_prompts(path: str | Path | None = None) -> list[str]:
    path = Path(path) if path else bundled_path("chat_prompts")
    return [record["prompt"] for _, record in read_jsonl(path) if record]


@torch.no_grad()
def greedy_responses(model, tokenizer, prompts: list[str], max_new_tokens: int = 48, batch_size: int = 8) -> list[list[int]]:
    """Greedy chat replies (token ids, end-of-turn excluded), generated in left-padded KV-cached batches."""
    from ..generation.decoding import Decoding, generate

    ids = [chat_prompt_ids(tokenizer, p) for p in prompts]
    outputs = generate(model, tokenizer, ids, Decoding(max_new_tokens=max_new_tokens), batch_size=batch_size)
    return [samples[0].tokens for samples in outputs]


def _teacher_forced_batches(tokenizer, prompts, responses, batch_size):
    """Right-padded (prompt + response) batches with a mask of the positions predicting response tokens."""
    for first in range(0, len(prompts), batch_size):
        pairs = [(i, chat_prompt_ids(tokenizer, p), r) for i, (p, r) in
                 enumerate(zip(prompts[first : first + batch_size], responses[first : first + batch_size]), start=first) if r]
        if not pairs:
            continue
        longest = max(len(p) + len(r) for _, p, r in pairs)
        input_ids = torch.zeros((len(pairs), longest), dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        keep = torch.zeros_like(input_ids, dtype=torch.bool)
        targets = []
        for row, (_, p, r) in enumerate(pairs):
            input_ids[row, : len(p) + len(r)] = torch.tensor(p + r)
            attention[row, : len(p) + len(r)] = 1
            keep[row, len(p) - 1 : len(p) + len(r) - 1] = True
            targets.extend(r)
        yield [i for i, _, _ in pairs], [len(r) for _, _, r in pairs], input_ids, attention, keep, torch.tensor(targets)


@torch.no_grad()
def response_drift(reference_model, model, tokenizer, prompts: list[str], responses: list[list[int]], batch_size: int = 8,
                   precision_context=contextlib.nullcontext) -> dict:
    """Per-prompt KL(reference ‖ model) and log p_model(response) on the reference's responses.

    Returns token-weighted means (`kl`, `logprob`, in nats per response token) with standard errors
    across prompts, and per-prompt values. With `reference_model=None` only the log-probability is
    computed (the initial model scoring its own responses: the baseline of the retention measure).
    """
    from .scoring import mean_and_se

    device = next(model.parameters()).device
    per_prompt_kl, per_prompt_lp, tokens = [], [], []
    for _, lengths, input_ids, attention, keep, targets in _teacher_forced_batches(tokenizer, prompts, responses, batch_size):
        kwargs = dict(input_ids=input_ids.to(device), attention_mask=attention.to(device), logits_to_keep=keep.to(device), use_cache=False)
        with precision_context():
            logits = model(**kwargs).logits
            ref_logits = reference_model(**kwargs).logits if reference_model is not None else None
        logits = logits.float().reshape(-1, logits.shape[-1])
        logp = torch.log_softmax(logits, dim=-1).gather(1, targets.to(device)[:, None])[:, 0].cpu()
        kl = forward_kl_per_position(ref_logits.float().reshape(-1, logits.shape[-1]), logits).cpu() if ref_logits is not None else None
        offset = 0
        for n in lengths:
            per_prompt_lp.append(logp[offset : offset + n].mean().item())
            if kl is not None:
                per_prompt_kl.append(kl[offset : offset + n].mean().item())
            tokens.append(n)
            offset += n
    total = max(sum(tokens), 1)
    out = {"n_prompts": len(tokens), "n_tokens": sum(tokens),
           "logprob": {"value": sum(v * n for v, n in zip(per_prompt_lp, tokens)) / total, "stderr": mean_and_se(per_prompt_lp)[1], "n": len(tokens)},
           "item_scores": {"logprob": per_prompt_lp}}
    if reference_model is not None:
        out["kl"] = {"value": sum(v * n for v, n in zip(per_prompt_kl, tokens)) / total, "stderr": mean_and_se(per_prompt_kl)[1], "n": len(tokens)}
        out["item_scores"]["kl"] = per_prompt_kl
    return out


@torch.no_grad()
def response_kl(reference_model, model, tokenizer, prompts: list[str], responses: list[list[int]], batch_size: int = 8) -> float:
    """Mean per-token KL(reference ‖ model) on the responses, teacher-forced after their chat prompts."""
    return response_drift(reference_model, model, tokenizer, prompts, responses, batch_size)["kl"]["value"]


@torch.no_grad()
def document_kl(reference_model, model, tokenizer, texts: list[str], max_length: int = 2048,
                precision_context=contextlib.nullcontext, batch_size: int = 4) -> dict:
    """The paper's per-token KL(initial ‖ updated) on training documents (whole documents, no splitting).

    The authors run one document at a time; documents are batched here (right-padded, padding masked
    out), which gives the same per-token values up to floating-point rounding.
    """
    from .scoring import mean_and_se

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    docs = [ids for ids in (tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts) if len(ids) >= 2]
    docs.sort(key=len, reverse=True)
    total, count, skipped, per_doc = 0.0, 0, 0, []
    for first in range(0, len(docs), batch_size):
        batch = docs[first : first + batch_size]
        longest = max(map(len, batch))
        x = torch.tensor([d + [pad] * (longest - len(d)) for d in batch], device=device)
        mask = torch.tensor([[1] * len(d) + [0] * (longest - len(d)) for d in batch], device=device)
        kwargs = dict(input_ids=x, attention_mask=mask, use_cache=False)
        with precision_context():
            ref_logits, logits = reference_model(**kwargs).logits, model(**kwargs).logits
        for row, d in enumerate(batch):
            kl = forward_kl_per_position(ref_logits[row, : len(d)], logits[row, : len(d)])
            finite = torch.isfinite(kl)
            skipped += int((~finite).sum())
            kl = kl[finite]
            total += kl.sum().item()
            count += kl.numel()
            if kl.numel():
                per_doc.append(kl.mean().item())
    nats = total / max(count, 1)
    return {"value": nats, "stderr": mean_and_se(per_doc)[1], "n": len(per_doc), "bits_per_token": nats / math.log(2),
            "n_tokens": count, "skipped_positions": skipped, "item_scores": per_doc, "batch_size": batch_size}


def save_responses(path: Path, prompts: list[str], responses: list[list[int]], tokenizer) -> None:
    """Reference responses as text and token ids (the ids are what later evaluations teacher-force)."""
    with open(path, "w", encoding="utf-8") as f:
        for p, r in zip(prompts, responses):
            f.write(json.dumps({"prompt": p, "response": tokenizer.decode(r), "tokens": r}) + "\n")


def load_responses(path: Path) -> tuple[list[str], list[list[int]]]:
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r["prompt"] for r in rows], [r["tokens"] for r in rows]
