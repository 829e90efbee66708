"""Multiple-choice knowledge probes scored by option log-likelihood (closed book, deterministic).

Probe JSONL schema, one object per line:
    {"id": "news-001-q1", "doc_id": "news-001" | null, "question": "...",
     "options": ["...", "...", "...", "..."], "answer": 1}
`answer` is the 0-based index of the correct option. The model sees the question as a chat user turn
and each option is scored as the assistant's reply: the sum of its token log-probabilities divided by
its length in characters (length-normalised, like lm-eval's acc_norm), so longer names are not
penalised for having more tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..corpus import read_jsonl, resolve_path
from ..errors import CtxDistillError


@dataclass(frozen=True)
class Probe:
    id: str
    question: str
    options: tuple[str, ...]
    answer: int
    doc_id: str | None = None


def load_probes(spec: str | Path) -> list[Probe]:
    """Read and validate a probe file; a wrong schema is an error naming the line and the field."""
    path = resolve_path(str(spec))
    probes = []
    for where, record in read_jsonl(path):
        if record is None:
            raise CtxDistillError(f"{where}: not valid UTF-8")
        missing = [k for k in ("question", "options", "answer") if k not in record]
        if missing:
            raise CtxDistillError(f"{where}: probe is missing field(s) {', '.join(missing)}; expected question, options, answer (0-based index)")
        options = record["options"]
        if not (isinstance(options, list) and len(options) >= 2 and all(isinstance(o, str) and o for o in options)):
            raise CtxDistillError(f"{where}: 'options' must be a list of at least 2 non-empty strings")
        answer = record["answer"]
        if not (isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(options)):
            raise CtxDistillError(f"{where}: 'answer' must be an integer index into options (0..{len(options) - 1}), got {answer!r}")
        probes.append(Probe(str(record.get("id", where)), record["question"], tuple(options), answer, record.get("doc_id")))
    if not probes:
        raise CtxDistillError(f"probe file {spec} holds no probes")
    return probes


def chat_prompt_ids(tokenizer, user_text: str) -> list[int]:
    """Token ids of a one-turn chat prompt ending where the assistant's reply begins."""
    if not tokenizer.chat_template:
        raise CtxDistillError("the tokenizer has no chat template; probes and chat evaluations need a chat (post-trained) model")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": user_text}], add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


@torch.no_grad()
def completion_logprobs(model, prompts: list[list[int]], completions: list[list[int]], batch_size: int = 32) -> list[float]:
    """Sum of log p(completion | prompt) for each pair, in right-padded batches."""
    device = next(model.parameters()).device
    scores: list[float] = []
    for first in range(0, len(prompts), batch_size):
        batch = list(zip(prompts[first : first + batch_size], completions[first : first + batch_size]))
        longest = max(len(p) + len(c) for p, c in batch)
        input_ids = torch.zeros((len(batch), longest), dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        keep = torch.zeros_like(input_ids, dtype=torch.bool)
        targets = []
        for row, (p, c) in enumerate(batch):
            input_ids[row, : len(p) + len(c)] = torch.tensor(p + c)
            attention[row, : len(p) + len(c)] = 1
            keep[row, len(p) - 1 : len(p) + len(c) - 1] = True
            targets.extend(c)
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device), logits_to_keep=keep.to(device), use_cache=False).logits
        logp = torch.log_softmax(logits.float().reshape(-1, logits.shape[-1]), dim=-1)
        token_logp = logp.gather(1, torch.tensor(targets, device=device)[:, None])[:, 0].cpu()
        offset = 0
        for _, c in batch:
            scores.append(token_logp[offset : offset + len(c)].sum().item())
            offset += len(c)
    return scores


def score_mcq_loglik(model, tokenizer, probes: list[Probe], batch_size: int = 32) -> dict:
    """Accuracy (with its standard error) of picking the highest length-normalised option log-likelihood."""
    prompts, completions, owners = [], [], []
    for i, probe in enumerate(probes):
        prompt = chat_prompt_ids(tokenizer, probe.question)
        for option in probe.options:
            prompts.append(prompt)
            completions.append(tokenizer(option, add_special_tokens=False)["input_ids"])
            owners.append(i)
    scores = completion_logprobs(model, prompts, completions, batch_size)
    per_probe: list[list[float]] = [[] for _ in probes]
    for owner, score in zip(owners, scores):
        per_probe[owner].append(score)
    predictions = []
    for probe, option_scores in zip(probes, per_probe):
        normalised = [s / max(len(o), 1) for s, o in zip(option_scores, probe.options)]
        choice = max(range(len(normalised)), key=normalised.__getitem__)
        predictions.append({"id": probe.id, "choice": choice, "correct": choice == probe.answer,
                            "gold_logprob": option_scores[probe.answer]})
    n = len(predictions)
    accuracy = sum(p["correct"] for p in predictions) / n
    return {"accuracy": accuracy, "stderr": math.sqrt(accuracy * (1 - accuracy) / n), "n": n,
            "mean_gold_logprob": sum(p["gold_logprob"] for p in predictions) / n, "predictions": predictions}
