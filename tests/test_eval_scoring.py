"""Answer parsing, majority vote (ties wrong), short-answer EM/F1, GSM8K number extraction, standard errors."""

import math

import pytest

from ctxdistill.evaluate.scoring import (contains_answer, exact_match, extract_final_number, first_answer_span, majority_vote,
                                         mean_and_se, normalize_answer, numbers_equal, parse_answer_letter, proportion, token_f1)


@pytest.mark.parametrize("output, expected", [
    ("<think>hmm</think>\n<answer>B</answer>", "B"),
    ("<answer>A</answer> wait, no <answer>C</answer>", "C"),  # the last tag wins
    ("<think>x</think><answer> (d) </answer>", "D"),  # inside the tag, case does not matter
    ("<think>x</think><answer>(D)</answer>", "D"),
    ("<think>long reasoning cut off</think>\n<answer>B", "B"),  # stopped at </answer> or truncated
    ("The correct answer is A. Marcus Oyelaran.", "A"),
    ("Answer: C", "C"),
    ("B. Ingrid Talby", "B"),
    ("B", "B"),
    ("**C**", "C"),
    ("E. something", None),  # out of range for 4 options
    ("I think it is the second one.", None),
    ("A lot of people think so, but", None),  # 'A' as an article is not a letter answer
    ("", None),
])
def test_parse_answer_letter(output, expected):
    assert parse_answer_letter(output, 4) == expected


def test_parse_answer_letter_falls_back_to_a_unique_option_text():
    options = ["Marcus Oyelaran", "Ingrid Talby", "Petra Voss", "Leon Achterberg"]
    assert parse_answer_letter("The new chief executive is Petra Voss.", 4, options) == "C"
    assert parse_answer_letter("<answer>Ingrid Talby</answer>", 4, options) == "B"
    assert parse_answer_letter("Either Petra Voss or Leon Achterberg.", 4, options) is None  # ambiguous


@pytest.mark.parametrize("votes, expected", [
    (["A", "A", "B", "C", "A"], "A"),
    (["A", "B", "A", "B", "C"], None),  # tie: wrong
    (["A", None, None, None, None], "A"),  # unparsed samples do not vote
    ([None, None], None),
    (["B", "B", None, None, None], "B"),
    (["A", "B"], None),
])
def test_majority_vote(votes, expected):
    assert majority_vote(votes) == expected


def test_short_answer_normalisation_em_f1_contains():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert exact_match("the eiffel tower.", ["Eiffel Tower"]) == 1.0
    assert exact_match("Paris, France", ["Paris"]) == 0.0
    assert token_f1("Paris, France", ["Paris"]) == pytest.approx(2 / 3)
    assert token_f1("London", ["Paris", "London"]) == 1.0
    assert token_f1("", ["Paris"]) == 0.0
    assert contains_answer("I believe it is Marcus Oyelaran, the former division head.", ["Marcus Oyelaran"]) == 1.0
    assert contains_answer("Oyelarans", ["Oyelaran"]) == 0.0  # whole words only
    assert first_answer_span("\n  Answer: Stellhaven\nBecause...") == "Stellhaven"


@pytest.mark.parametrize("output, value, how", [
    ("16 - 3 - 4 = 9 eggs. 9 * 2 = 18. The answer is 18.", 18.0, "answer_is"),
    ("The answer is $1,250.50.", 1250.5, "answer_is"),
    ("So she pays 5 + 7 = 12 dollars", 12.0, "last_number"),
    ("The answer is -3", -3.0, "answer_is"),
    ("I don't know.", None, "none"),
    ("The answer is 7. Then 100 more words with 3 numbers 4.", 7.0, "answer_is"),
])
def test_extract_final_number(output, value, how):
    got, got_how = extract_final_number(output)
    assert got_how == how
    assert (got is None and value is None) or got == pytest.approx(value)


def test_numbers_equal_and_gold_format():
    assert numbers_equal(18.0, float("18"))
    assert not numbers_equal(None, 1.0)
    assert not numbers_equal(18.0, 18.5)


def test_standard_errors():
    p = proportion([1, 0, 1, 1])
    assert p["value"] == 0.75 and p["n"] == 4
    assert p["stderr"] == pytest.approx(math.sqrt(0.75 * 0.25 / 4))
    mean, se = mean_and_se([1.0, 2.0, 3.0])
    assert mean == 2.0 and se == pytest.approx(1.0 / math.sqrt(3))
    assert mean_and_se([5.0]) == (5.0, 0.0)
