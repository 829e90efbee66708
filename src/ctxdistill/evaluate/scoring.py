"""Pure scoring functions: answer parsing, majority vote, normalised EM/F1, final numbers, standard errors.

No models here; every function is tested on strings and lists.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter

LETTERS = "ABCDEFGHIJ"

_ANSWER_TAG = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.IGNORECASE | re.DOTALL)
_ANSWER_OPEN = re.compile(r"<answer>\s*\(?([A-J])\b", re.IGNORECASE)
_ANSWER_LINE = re.compile(r"(?:final\s+)?answer\s*(?:is)?\s*[:：]?\s*\(?\**\s*([A-J])\b\)?", re.IGNORECASE)


def _letter_in(text: str, n_options: int) -> str | None:
    """A lone option letter at the start of `text`: 'B', '(B)', 'B.', 'B) foo', '**B**'."""
    m = re.match(r"\s*[\*\(\[]*\s*([A-J])\s*(?:[\)\]\.:\*,]|$)", text)
    if m and LETTERS.index(m.group(1)) < n_options:
        return m.group(1)
    return None


def parse_answer_letter(output: str, n_options: int = 4, options: list[str] | tuple[str, ...] | None = None) -> str | None:
    """The option letter a sampled answer chose, or None.

    In order, as the DiSC authors' parser: the last `<answer>X</answer>`; then an unclosed
    `<answer>X` (truncated output); then "Answer: X" / "answer is X"; then the first line if it is a
    lone letter. As a last fallback, when the option texts are given and exactly one of them appears
    verbatim in the output, that option.
    """
    valid = LETTERS[:n_options]
    for inner in reversed(_ANSWER_TAG.findall(output)):
        letter = _letter_in(inner, n_options)
        if letter:
            return letter
        if options:  # "<answer>Stellhaven</answer>": the option text instead of its letter
            hit = [i for i, o in enumerate(options) if inner.strip().lower().rstrip(".") == o.strip().lower().rstrip(".")]
            if len(hit) == 1:
                return valid[hit[0]]
    opened = _ANSWER_OPEN.findall(output)
    if opened and opened[-1].upper() in valid:
        return opened[-1].upper()
    found = [m for m in _ANSWER_LINE.findall(output) if m.upper() in valid and m.isupper()]
    if found:
        return found[-1]
    stripped = output.strip()
    first_line = stripped.splitlines()[0] if stripped else ""
    letter = _letter_in(first_line, n_options)
    if letter and len(first_line.strip()) <= 40:
        return letter
    if options:
        lowered = output.lower()
        hit = [i for i, o in enumerate(options) if o.strip() and o.strip().lower() in lowered]
        if len(hit) == 1:
            return valid[hit[0]]
    return None


def majority_vote(votes: list[str | None]) -> str | None:
    """The most frequent parsed answer; None when nothing parsed or the top count is tied (tie = wrong)."""
    counts = Counter(v for v in votes if v is not None)
    if not counts:
        return None
    ranked = counts.most_common()
    if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
        return None
    return ranked[0][0]


# --- short answers (SQuAD-style normalisation) -----------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.IGNORECASE)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, squeeze whitespace (the SQuAD / NQ-open rule)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def first_answer_span(output: str) -> str:
    """The part of a chatty reply that holds the answer: the first non-empty line, minus an 'Answer:' label."""
    for line in output.strip().splitlines():
        line = line.strip()
        if line:
            return re.sub(r"^(?:final\s+)?answer\s*[:：]\s*", "", line, flags=re.IGNORECASE)
    return ""


def exact_match(prediction: str, golds: list[str]) -> float:
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in golds))


def token_f1(prediction: str, golds: list[str]) -> float:
    """Best token-level F1 against any gold answer."""
    pred = normalize_answer(prediction).split()
    best = 0.0
    for gold in golds:
        ref = normalize_answer(gold).split()
        common = Counter(pred) & Counter(ref)
        overlap = sum(common.values())
        if not pred or not ref:
            best = max(best, float(pred == ref))
        elif overlap:
            precision, recall = overlap / len(pred), overlap / len(ref)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def contains_answer(output: str, golds: list[str]) -> float:
    """1 when a normalised gold answer appears as a whole-word span of the normalised output (lenient)."""
    text = f" {normalize_answer(output)} "
    return float(any(normalize_answer(g) and f" {normalize_answer(g)} " in text for g in golds))


# --- numbers (GSM8K) --------------------------------------------------------------------------------

_NUMBER = re.compile(r"-?\$?\s?\d[\d,]*(?:\.\d+)?")
_ANSWER_IS = re.compile(r"answer\s+is\s*[:：]?\s*\$?\s*(-?[\d,]*\.?\d+)", re.IGNORECASE)


def _to_number(text: str) -> float | None:
    text = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        return float(text)
    except ValueError:
        return None


def extract_final_number(output: str) -> tuple[float | None, str]:
    """(number, how): the number after the last "The answer is", else the last number in the output."""
    strict = _ANSWER_IS.findall(output)
    if strict:
        return _to_number(strict[-1]), "answer_is"
    numbers = _NUMBER.findall(output)
    if numbers:
        return _to_number(numbers[-1]), "last_number"
    return None, "none"


def numbers_equal(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and math.isclose(a, b, rel_tol=0, abs_tol=1e-6)


# --- statistics ------------------------------------------------------------------------------------


def mean_and_se(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (sample SD / sqrt(n)); SE is 0 for fewer than two values."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def proportion(values: list[float | bool]) -> dict:
    """A pass rate with its binomial standard error sqrt(p(1-p)/n)."""
    n = len(values)
    p = sum(float(v) for v in values) / n if n else float("nan")
    return {"value": p, "stderr": math.sqrt(p * (1 - p) / n) if n else float("nan"), "n": n}


def average(values: list[float]) -> dict:
    mean, se = mean_and_se(values)
    return {"value": mean, "stderr": se, "n": len(values)}
