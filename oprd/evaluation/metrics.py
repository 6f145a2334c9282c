"""Text metrics for evaluating sampled responses: answer accuracy, distinct-n and repetition.

On-policy distillation can drive the KL down while greedy outputs degenerate into repetition, so evaluation watches
`distinct_n` and `repetition_rate` next to accuracy. n-grams are over whitespace tokens, which keeps the metrics
independent of any tokenizer (teacher and student may differ).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# An optionally signed number with optional thousands separators and decimals: "-3", "1,024", "2.5". Commas only
# count in groups of three, so a list "1,2,3" stays three numbers; "7." (sentence end) matches "7".
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def _numbers(text: str) -> list[str]:
    return [match.group().replace(",", "") for match in _NUMBER.finditer(text)]


def extract_answer(response: str) -> str | None:
    """The final numeric answer of a response.

    The first number after the last '=' when there is one ("3 + 4 = 7." -> "7"), otherwise the last number in the
    text ("The answer is 7" -> "7"). Thousands separators are removed.

    Returns:
        the number as a string, or None when the response holds no number.
    """
    _, sep, tail = response.rpartition("=")
    if sep:
        after = _numbers(tail)
        if after:
            return after[0]
    found = _numbers(response)
    return found[-1] if found else None


def _same_number(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)  # "7.0" answers "7"
    except ValueError:
        return a == b


def is_correct(response: str, answer: str | None) -> bool:
    """Whether the answer extracted from `response` equals the reference `answer` (numerically when both parse).

    A missing reference (None) or a response without a number is never correct.
    """
    if answer is None:
        return False
    predicted = extract_answer(response)
    if predicted is None:
        return False
    reference = extract_answer(str(answer)) or str(answer).strip()
    return _same_number(predicted, reference)


def accuracy(responses: Sequence[str], answers: Sequence[str | None]) -> float:
    """Fraction of responses that are `is_correct`; 0.0 for an empty batch."""
    if len(responses) != len(answers):
        raise ValueError(f"Got {len(responses)} responses but {len(answers)} answers.")
    return sum(map(is_correct, responses, answers)) / len(responses) if responses else 0.0


def _ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}.")
    words = text.split()
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def distinct_n(texts: Sequence[str], n: int = 4) -> float:
    """Unique n-grams divided by all n-grams, pooled over the batch (whitespace tokens).

    1.0 means no n-gram occurs twice anywhere in the batch; values near 0 mean the responses repeat themselves or
    each other. Texts shorter than `n` words contribute nothing.

    Returns:
        the ratio, or 0.0 when the batch holds no n-gram at all.
    """
    grams = [gram for text in texts for gram in _ngrams(text, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(text: str, n: int = 4) -> float:
    """Fraction of a response's n-grams that already occurred earlier in the same response.

    "a b a b a b" with n=2 has n-grams ab, ba, ab, ba, ab: the last three repeat, so 0.6.

    Returns:
        the fraction, or 0.0 when the text is shorter than `n` words.
    """
    grams = _ngrams(text, n)
    seen: set[tuple[str, ...]] = set()
    repeated = 0
    for gram in grams:
        repeated += gram in seen
        seen.add(gram)
    return repeated / len(grams) if grams else 0.0
