"""Math reasoning (GSM8K style): worked answers ending in ``#### N``, exact match via math-verify."""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from igds_ray.tasks.base import Task, TaskExample, _counts

MATH_TEMPLATES: tuple[str, ...] = (
    'Solve the math problem step by step, then write the final answer after "####".\n\nQuestion: {source}\nAnswer:\n',
    "Question: {source}\nAnswer:\n",
    'Problem: {source}\nLet\'s think step by step and end with "#### <number>".\nSolution:\n',
)

# A number as written in word problems: optional sign and $, thousands commas, decimals, a fraction.
# The sign is only taken when it does not follow a word or digit ("3-4" is a range, not -4) and
# touches the number ("10 - 5" is a subtraction).
_NUM = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+(?:\.\d+)?)?|\.\d+"
NUMBER_RE = re.compile(rf"(?<![\w.)])(-)?(?:\\?\$\s?)?(-)?({_NUM})")
_CALC_RE = re.compile(r"<<[^<>]*>>")  # GSM8K calculator annotations
_BOXED = "\\boxed{"
_MARKER = "####"
# Seconds for math-verify's own timeout; it uses signal.alarm, which only works in the main thread.
_VERIFY_TIMEOUT_S = 5


def normalize_number(match: re.Match[str]) -> str:
    """ "-$1,000.50" -> "-1000.50"; trailing punctuation is never part of the match."""
    sign = "-" if (match.group(1) or match.group(2)) else ""
    return sign + match.group(3).replace(",", "")


def _first_number(text: str) -> str | None:
    m = NUMBER_RE.search(text)
    return normalize_number(m) if m else None


def _last_number(text: str) -> str | None:
    matches = list(NUMBER_RE.finditer(text))
    return normalize_number(matches[-1]) if matches else None


def _last_boxed(text: str) -> str | None:
    start = text.rfind(_BOXED)
    if start == -1:
        return None
    i, depth = start + len(_BOXED), 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip() or None
    return None  # unbalanced: the generation was cut off inside the box


def extract_math_answer(text: str) -> str | None:
    """The number after the last ``####``; else the last ``\\boxed{}``; else the last number; else None."""
    text = _CALC_RE.sub(" ", text)
    k = text.rfind(_MARKER)
    if k != -1:
        n = _first_number(text[k + len(_MARKER) :])
        if n is not None:
            return n
    boxed = _last_boxed(text)
    if boxed is not None:
        plain = boxed.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "").strip()
        m = NUMBER_RE.fullmatch(plain)
        return normalize_number(m) if m else boxed
    return _last_number(text)


def _parse(answer: str, timeout: int | None) -> list[Any]:
    from math_verify import parse

    # A bare number parses as is; LaTeX from \boxed{} needs math delimiters to be found.
    text = answer if NUMBER_RE.fullmatch(answer) else f"${answer}$"
    return parse(text, parsing_timeout=timeout)


def answers_equal(gold: str, pred: str) -> bool:
    """math-verify equivalence of two extracted answers ("2.50" == "2.5", "3/4" == "0.75")."""
    from math_verify import verify

    # math-verify raises in non-main threads (Ray Tune trainables, threaded actors) unless its
    # signal-based timeout is off; bare extracted answers parse in microseconds, so that is safe.
    timeout = _VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    try:
        g, p = _parse(gold, timeout), _parse(pred, timeout)
        return bool(g and p and verify(g, p, timeout_seconds=timeout))
    except Exception:  # noqa: BLE001 - a model answer must never crash scoring; it is just wrong
        return False


@dataclass(frozen=True, kw_only=True)
class MathTask(Task):
    """GSM8K-style math: reference is the worked answer ending ``#### N``; score is exact match."""

    name: str = "math"
    templates: tuple[str, ...] = MATH_TEMPLATES
    source_columns: tuple[str, ...] = ("question", "problem")
    reference_columns: tuple[str, ...] = ("answer", "solution")
    # A base model keeps writing new questions after its answer; cut there.
    stop_sequences: tuple[str, ...] = ("\nQuestion:", "\nProblem:", "\n\n\n")
    description: str = "Math word problems (GSM8K): exact match of the final answer via math-verify."

    def extract(self, prediction: str | None) -> str | None:
        if not isinstance(prediction, str):
            return None
        return extract_math_answer(self.truncate(prediction))

    def gold_answer(self, example: TaskExample) -> str:
        """The final answer of the reference; a reference without one is a data error."""
        ans = extract_math_answer(example.reference)
        if ans is None:
            raise ValueError(f"task {self.name!r}: example {example.id!r} has no final answer in its reference")
        return str(ans)

    def reference_answer(self, example: TaskExample) -> str:
        ref = example.reference.strip()
        if _MARKER in ref:
            return ref
        # A bare final answer or a \boxed{} solution still gets the GSM8K ending the prompts ask for.
        ans = extract_math_answer(ref)
        if ans is None:
            return ref
        if ref == ans or NUMBER_RE.fullmatch(ref):
            return f"{_MARKER} {ans}"
        return f"{ref}\n{_MARKER} {ans}"

    def check_example(self, example: TaskExample) -> str | None:
        return None if extract_math_answer(example.reference) is not None else "reference has no final answer"

    def score_answer(self, answer: str, example: TaskExample) -> float:
        return 1.0 if answers_equal(self.gold_answer(example), answer) else 0.0

    def corpus_metric(self, predictions: Sequence[str | None], examples: Sequence[TaskExample]) -> dict[str, float]:
        answers = self._answers(predictions, examples)
        correct = sum(
            a is not None and self.score_answer(a, ex) == 1.0 for a, ex in zip(answers, examples, strict=True)
        )
        acc = correct / len(answers)
        return {"metric": acc, "accuracy": acc, "n_correct": correct, **_counts(answers)}
