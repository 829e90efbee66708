"""Sentence splitting and DiSC split strategies (the authors' `splits.py` semantics)."""

import random

import pytest

from ctxdistill.inputs.segment import SPLIT_STRATEGIES, SegmentedDoc, choose_spans, segment_document, split_sentences


def doc_with(lengths):
    ids, next_id = [], 0
    for n in lengths:
        ids.append(tuple(range(next_id, next_id + n)))
        next_id += n
    return SegmentedDoc("d", tuple(ids))


def test_punkt_works_offline_and_keeps_abbreviations_together():
    text = "Mr. Smith went to Washington. He arrived at 5 p.m. on Monday. It rained."
    assert split_sentences(text) == ["Mr. Smith went to Washington.", "He arrived at 5 p.m. on Monday.", "It rained."]


def test_word_tokenize_works_offline():
    import nltk

    split_sentences("Warm up.")  # registers the Punkt tables
    assert nltk.word_tokenize("Hello there. How are you?") == ["Hello", "there", ".", "How", "are", "you", "?"]


def test_sentence_boundary_draws_k_minus_1_interior_points_plus_the_last_sentence():
    doc = doc_with([4] * 10)
    starts = doc.sentence_starts
    for seed in range(20):
        spans = choose_spans(doc, "sentence_boundary", random.Random(seed), num_splits=5)
        sentence_index = [starts.index(s) for s, _ in spans]
        assert 9 in sentence_index, "the last sentence is always a suffix"
        assert 4 <= len(spans) <= 5 and sentence_index == sorted(set(sentence_index))
        assert all(1 <= i <= 9 for i in sentence_index), "sentence 0 has no prefix and is never a suffix"
        assert all(e - s == 4 for s, e in spans), "a suffix is exactly one sentence"


def test_sentence_boundary_is_seeded():
    doc = doc_with([3] * 12)
    draw = lambda seed: [choose_spans(doc, "sentence_boundary", random.Random(seed)) for _ in range(3)]
    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_short_documents_use_every_boundary_and_single_sentences_give_nothing():
    assert len(choose_spans(doc_with([3, 3, 3]), "sentence_boundary", random.Random(0), num_splits=5)) == 2
    assert choose_spans(doc_with([10]), "sentence_boundary", random.Random(0)) == []
    assert choose_spans(doc_with([3] * 6), "sentence_boundary", random.Random(0), num_splits=1) == [(15, 18)]


def test_suffixes_shorter_than_min_tokens_are_dropped():
    doc = doc_with([3, 1, 3, 1])
    spans = choose_spans(doc, "all_sentences", random.Random(0))
    assert spans == [(4, 7)]


@pytest.mark.parametrize("strategy, expected", [
    ("all_sentences", [(2, 4), (4, 6), (6, 8), (8, 10)]),
    ("middle_only", [(4, 6)]),
    ("fixed_uniform_sentence", [(2, 4), (6, 8), (8, 10)]),  # round(4/3 * j): 1, 3, 4
])
def test_deterministic_sentence_strategies(strategy, expected):
    assert choose_spans(doc_with([2] * 5), strategy, random.Random(0), num_splits=3) == expected


def test_token_strategies_cover_the_document_without_sentence_alignment():
    doc = doc_with([7, 9, 5])  # 21 tokens
    spans = choose_spans(doc, "token_random", random.Random(1), num_splits=4)
    assert spans[-1][1] == 21 and all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1))
    uniform = choose_spans(doc, "token_uniform", random.Random(1), num_splits=4)
    assert [s for s, _ in uniform] == [4, 8, 13, 17]  # round(21/5 * j)
    fixed = choose_spans(doc, "token_random_variable_suffix", random.Random(1), num_splits=3, suffix_tokens=4)
    assert all(e - s == 4 or e == 21 for s, e in fixed)
    to_end = choose_spans(doc, "token_random_variable_suffix", random.Random(1), num_splits=3, suffix_tokens=0)
    assert all(e == 21 for _, e in to_end)


def test_every_strategy_returns_valid_spans():
    doc = doc_with([5, 6, 7, 8, 4, 6])
    for strategy in SPLIT_STRATEGIES:
        for s, e in choose_spans(doc, strategy, random.Random(3), num_splits=3, suffix_tokens=5):
            assert 1 <= s < e <= 36 and e - s >= 2


def test_unknown_strategy_is_rejected():
    with pytest.raises(ValueError, match="unknown split strategy"):
        choose_spans(doc_with([3, 3]), "random", random.Random(0))


def test_segment_document_tokenises_each_sentence_without_special_tokens(tokenizer):
    [doc] = segment_document("x", "The cat sat. The dog ran away.", tokenizer)
    assert doc.sentence_ids == (tuple(tokenizer("The cat sat.", add_special_tokens=False)["input_ids"]),
                                tuple(tokenizer("The dog ran away.", add_special_tokens=False)["input_ids"]))


def test_long_documents_are_windowed_at_sentence_boundaries(tokenizer):
    text = " ".join(f"Sentence number {i} talks about the harbour of Velmora." for i in range(30))
    windows = segment_document("long", text, tokenizer, max_tokens=64)
    assert len(windows) > 1
    assert all(len(w.token_ids) <= 64 for w in windows)
    [whole] = segment_document("long", text, tokenizer)
    assert [t for w in windows for t in w.token_ids] == whole.token_ids, "nothing is dropped"
    assert [w.doc_id for w in windows][:2] == ["long#w0", "long#w1"]
