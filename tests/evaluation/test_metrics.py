"""Answer extraction, correctness, distinct-n and repetition rate, checked against hand-counted values."""

from __future__ import annotations

import pytest

from oprd.evaluation.metrics import accuracy, distinct_n, extract_answer, is_correct, repetition_rate


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("3 + 4 = 7.", "7"),
        ("3 + 4 = 7. So 2 + 2 = 4", "4"),  # the last '=' wins
        ("The answer is 12, I think", "12"),
        ("first 3 then 5", "5"),
        ("x = ? so maybe 9", "9"),  # nothing numeric after '=': fall back to the last number
        ("total = 1,024 apples", "1024"),
        ("1,2,3", "3"),  # a list, not a thousands separator
        ("= -5", "-5"),
        ("2.5 + 2.5 = 5.0", "5.0"),
        ("no digits here", None),
        ("", None),
    ],
)
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


def test_is_correct():
    assert is_correct("3 + 4 = 7.", "7")
    assert is_correct("It is 7.0", "7")
    assert not is_correct("3 + 4 = 8.", "7")
    assert not is_correct("seven", "7")
    assert not is_correct("7", None)
    assert not is_correct("17", "7")


def test_accuracy():
    assert accuracy(["1 + 1 = 2.", "2 + 2 = 5.", "3"], ["2", "4", "3"]) == pytest.approx(2 / 3)
    assert accuracy([], []) == 0.0
    with pytest.raises(ValueError, match="answers"):
        accuracy(["1"], [])


def test_distinct_n():
    assert distinct_n(["a b c d e"], n=4) == 1.0
    assert distinct_n(["a b c", "a b d"], n=2) == pytest.approx(3 / 4)  # ab, bc, ab, bd
    assert distinct_n(["a a a a a"], n=1) == pytest.approx(1 / 5)
    assert distinct_n(["too short"], n=4) == 0.0
    assert distinct_n([], n=4) == 0.0
    with pytest.raises(ValueError, match="n must be"):
        distinct_n(["a b"], n=0)


def test_repetition_rate():
    assert repetition_rate("a b a b a b", n=2) == pytest.approx(3 / 5)
    assert repetition_rate("one two three four five", n=2) == 0.0
    assert repetition_rate("x x x x", n=1) == pytest.approx(3 / 4)
    assert repetition_rate("short", n=4) == 0.0
    # Across texts nothing is shared: repetition is per response, unlike distinct_n.
    assert repetition_rate("a b c d", n=4) == 0.0 and distinct_n(["a b c d", "a b c d"], n=4) == 0.5
