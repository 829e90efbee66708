"""Knowledge probes: what a method taught, scored three ways on one JSONL schema.

Probe JSONL schema, one object per line:
    {"id": "news-001-q1", "doc_id": "news-001" | null, "question": "...",
     "options": ["...", "...", "...", "..."], "answer": 1,
     "answers": ["...", ...]}                        # optional
A multiple-choice probe has `options` (at least 2) and `answer`, the 0-based index of the correct
option. A short-answer probe has only `answers` (accepted answer strings). A multiple-choice probe
without `answers` is also asked open-ended, with its correct option as the accepted answer.

Scoring:
- option log-likelihood (`score_mcq_loglik`, deterministic, cheap): the question is a chat user turn
  and each option is scored as the assistant's reply, the sum of its token log-probabilities divided
  by its length in characters (length-normalised, like lm-eval's acc_norm). A two-option probe (yes /
  no) is instead answered by the sign of the contrastive margin log p(gold) − log p(other), the summed
  log-probabilities without normalisation (dividing by the length in characters, 3 for "yes" and 2 for
  "no", would favour one answer for every probe); the margin is the continuous score
  (`knowledge.option_margin`): a model that only moves towards one answer gains nothing on it when the
  labels are balanced;
- sampled multiple choice as in the DiSC paper (`score_mcq_sampled`): the paper's prompt (answer
  letter inside <answer></answer>) through the chat template, n samples at T = 1.0, the letter parsed
  from each sample with fallbacks, majority vote; ties and unparsed answers count as wrong;
- closed-book short answer (`score_short_answer`): greedy reply, normalised exact match and token F1
  against the accepted answers (SQuAD normalisation), plus a lenient "contains" rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..inputs.corpus import read_jsonl, resolve_path
from ..errors import CtxDistillError


@dataclass(frozen=True)
class Probe:
    id: str
    question: str
    options: tuple[str, ...]
    answer: int  # -1 for short-answer probes
    doc_id: str | None = None
    answers: tuple[str, ...] = ()

    @property
    def is_mcq(self) -> bool:
        return len(self.options) >= 2

    @property
    def gold_answers(self) -> tuple[str, ...]:
        """Accepted short answers: `answers`, else the correct option's text."""
        return self.answers or ((self.options[self.answer],) if self.is_mcq else ())


def load_probes(spec: str | Path) -> list[Probe]:
    """Read and validate a probe file; a wrong schema is an error naming the line and the field."""
    path = resolve_path(str(spec))
    probes = []
    for where, record in read_jsonl(path):
        if record is None:
            raise CtxDistillError(f"{where}: not valid UTF-8")
        if "question" not in record or not isinstance(record["question"], str) or not record["question"].strip():
            raise CtxDistillError(f"{where}: probe needs a non-empty 'question' string")
        answers = record.get("answers", [])
        if not (isinstance(answers, list) and all(isinstance(a, str) and a.strip() for a in answers)):
            raise CtxDistillError(f"{where}: 'answers' must be a list of non-empty strings")
        if "options" not in record and "answer" not in record:
            if not answers:
                raise CtxDistillError(f"{where}: probe is missing field(s) options, answer; expected question, options, answer (0-based index) or question, answers")
            probes.append(Probe(str(record.get("id", where)), record["question"], (), -1, record.get("doc_id"), tuple(answers)))
            continue
        missing = [k for k in ("options", "answer") if k not in record]
        if missing:
            raise CtxDistillError(f"{where}: probe is missing field(s) {', '.join(missing)}; expected question, options, answer (0-based index)")
        options = record["options"]
        if not (isinstance(options, list) and len(options) >= 2 and all(isinstance(o, str) and o for o in options)):
            raise CtxDistillError(f"{where}: 'options' must be a list of at least 2 non-empty strings")
        answer = record["answer"]
        if not (isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(options)):
            raise CtxDistillError(f"{where}: 'answer' must be an integer index into options (0..{len(options) - 1}), got {answer!r}")
        probes.append(Probe(str(record.get("id", where)), record["question"], tuple(options), answer, record.get("doc_id"), tuple(answers)))
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


def option_margin(option_scores: list[float], answer: int) -> float:
    """log p(gold) − the best other option's log p (summed over tokens, no length normalisation)."""
    return option_scores[answer] - max(s for i, s in enumerate(option_scores) if i != answer)


def choose_option(option_scores: list[float], options: tuple[str, ...]) -> int:
    """Two options: the more probable one (the margin's sign); more: the best length-normalised log-likelihood."""
    values = option_scores if len(options) == 2 else [s / max(len(o), 1) for s, o in zip(option_scores, options)]
    return max(range(len(values)), key=values.__getitem__)


def score_mcq_loglik(model, tokenizer, probes: list[Probe], batch_size: int = 32) -> dict:
    """Accuracy (with its standard error) of picking the highest length-normalised option log-likelihood."""
    probes = [p for p in probes if p.is_mcq]
    if not probes:
        return {"accuracy": float("nan"), "stderr": float("nan"), "n": 0, "mean_gold_logprob": float("nan"), "predictions": []}
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
        choice = choose_option(option_scores, probe.options)
        predictions.append({"id": probe.id, "choice": choice, "correct": choice == probe.answer,
                            "gold_logprob": option_scores[probe.answer], "margin": option_margin(option_scores, probe.answer),
                            "two_option": len(probe.options) == 2})
    n = len(predictions)
    accuracy = sum(p["correct"] for p in predictions) / n
    return {"accuracy": accuracy, "stderr": math.sqrt(accuracy * (1 - accuracy) / n), "n": n,
            "mean_gold_logprob": sum(p["gold_logprob"] for p in predictions) / n, "predictions": predictions}


# --- sampled multiple choice (the DiSC paper's domain score) ----------------------------------------

PAPER_MCQ_TEMPLATE = (
    "Your Knowledge Cutoff Date: December 2026.\n\n"
    "You will answer a multiple-choice question.\n"
    "- Put your reasoning in: <think> ... </think>\n"
    "- Put ONLY the final answer letter ({letters}) in: <answer> ... </answer>\n"
    "- Do not include any other text outside these tags.\n\n"
    "{question}\n{options}"
)
DIRECT_MCQ_TEMPLATE = "{question}\n{options}\n\nAnswer with the letter ({letters}) of the correct option only."
MCQ_TEMPLATES = {"paper": PAPER_MCQ_TEMPLATE, "direct": DIRECT_MCQ_TEMPLATE}
SHORT_ANSWER_TEMPLATE = "Answer the question with a short phrase (a name, number or a few words), no explanation.\n\nQuestion: {question}"


def mcq_prompt(probe: Probe, template: str = "paper") -> str:
    from .scoring import LETTERS

    letters = LETTERS[: len(probe.options)]
    options = "\n".join(f"{letter}. {text}" for letter, text in zip(letters, probe.options))
    return MCQ_TEMPLATES[template].format(question=probe.question, options=options, letters="/".join(letters))


def score_mcq_sampled(model, tokenizer, probes: list[Probe], num_samples: int = 5, temperature: float = 1.0,
                      top_p: float = 1.0, max_new_tokens: int = 256, template: str = "paper", batch_size: int = 32,
                      seed: int = 0) -> dict:
    """Majority-vote accuracy over `num_samples` sampled answers per probe (ties and no answer = wrong).

    The paper's prompt asks for reasoning in <think> and the letter in <answer>; generation stops at
    `</answer>`. Letters are parsed by `scoring.parse_answer_letter` (tag, then "Answer: X", then a
    lone letter on the first line, then a unique verbatim option text).
    """
    from ..generation.decoding import Decoding, generate
    from .scoring import LETTERS, majority_vote, parse_answer_letter, proportion

    probes = [p for p in probes if p.is_mcq]
    decoding = Decoding(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, num_samples=num_samples,
                        stop=("</answer>",) if template == "paper" else ())
    prompts = [chat_prompt_ids(tokenizer, mcq_prompt(p, template)) for p in probes]
    outputs = generate(model, tokenizer, prompts, decoding, batch_size=batch_size, seed=seed)
    predictions, correct, parsed = [], [], 0
    for probe, samples in zip(probes, outputs):
        votes = [parse_answer_letter(c.text, len(probe.options), probe.options) for c in samples]
        parsed += sum(v is not None for v in votes)
        choice = majority_vote(votes)
        ok = choice is not None and choice == LETTERS[probe.answer]
        correct.append(ok)
        predictions.append({"id": probe.id, "votes": votes, "choice": choice, "correct": ok, "samples": [c.text for c in samples]})
    result = proportion(correct) if probes else {"value": float("nan"), "stderr": float("nan"), "n": 0}
    total = max(len(probes) * num_samples, 1)
    return result | {"parse_rate": parsed / total, "no_majority_rate": sum(p["choice"] is None for p in predictions) / max(len(probes), 1),
                     "settings": {"template": template, "prompt_example": mcq_prompt(probes[0], template) if probes else None,
                                  "decoding": decoding.to_dict(), "vote": "majority; ties and unparsed count as wrong", "seed": seed},
                     "predictions": predictions, "item_scores": [float(c) for c in correct]}


def score_short_answer(model, tokenizer, probes: list[Probe], max_new_tokens: int = 32, batch_size: int = 32) -> dict:
    """Closed-book greedy answers: normalised exact match and token F1 on the answer line, and 'contains'."""
    from ..generation.decoding import Decoding, generate
    from .scoring import average, contains_answer, exact_match, first_answer_span, proportion, token_f1

    probes = [p for p in probes if p.gold_answers]
    decoding = Decoding(max_new_tokens=max_new_tokens)
    prompts = [chat_prompt_ids(tokenizer, SHORT_ANSWER_TEMPLATE.format(question=p.question)) for p in probes]
    outputs = generate(model, tokenizer, prompts, decoding, batch_size=batch_size)
    em, f1, contains, predictions = [], [], [], []
    for probe, (completion,) in zip(probes, outputs):
        span = first_answer_span(completion.text)
        golds = list(probe.gold_answers)
        em.append(exact_match(span, golds))
        f1.append(token_f1(span, golds))
        contains.append(contains_answer(completion.text, golds))
        predictions.append({"id": probe.id, "output": completion.text, "em": em[-1], "f1": f1[-1], "contains": contains[-1]})
    return {"em": proportion(em), "f1": average(f1), "contains": proportion(contains),
            "settings": {"template": SHORT_ANSWER_TEMPLATE, "decoding": decoding.to_dict(), "normalisation": "SQuAD (lower, no punctuation/articles)",
                         "answer_span": "first non-empty line, 'Answer:' label removed"},
            "predictions": predictions, "item_scores": {"em": em, "f1": f1, "contains": contains}}
