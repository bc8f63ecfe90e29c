"""Summarization (CNN/DailyMail, XSum): ROUGE-L F1 through rouge-score."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from igds_ray.tasks.base import Task, TaskExample, _counts

SUMMARIZATION_TEMPLATES: tuple[str, ...] = (
    "Summarize the following article.\n\nArticle: {source}\n\nSummary:\n",
    "{source}\n\nTL;DR:\n",
    "Write a short summary of the text below.\n\n{source}\n\nShort summary:\n",
)

ROUGE_TYPES: tuple[str, ...] = ("rouge1", "rouge2", "rougeL")


@lru_cache(maxsize=4)
def rouge_scorer(use_stemmer: bool = True) -> Any:
    """A cached ``rouge_score.rouge_scorer.RougeScorer`` for rouge1/rouge2/rougeL."""
    from rouge_score import rouge_scorer as rs

    return rs.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)


@dataclass(frozen=True, kw_only=True)
class SummarizationTask(Task):
    """Summarize a document; headline metric is mean ROUGE-L F1 (stemmed), extras rouge1/rouge2.

    rouge-score's default tokenizer keeps only ASCII letters and digits, so it suits English data
    (CNN/DailyMail, XSum); other scripts score 0.
    """

    name: str = "summarization"
    templates: tuple[str, ...] = SUMMARIZATION_TEMPLATES
    # CNN/DailyMail: article/highlights; XSum: document/summary.
    source_columns: tuple[str, ...] = ("article", "document")
    reference_columns: tuple[str, ...] = ("highlights", "summary")
    # CNN highlights are one sentence a line, so only a blank line ends a summary.
    stop_sequences: tuple[str, ...] = ("\n\n",)
    use_stemmer: bool = True
    description: str = "News summarization (CNN/DailyMail, XSum): ROUGE-L F1 via rouge-score."

    def rouge(self, answer: str, example: TaskExample) -> dict[str, float]:
        """F1 of rouge1/rouge2/rougeL between the reference and an extracted answer."""
        s = rouge_scorer(self.use_stemmer).score(example.reference, answer)
        return {k: float(s[k].fmeasure) for k in ROUGE_TYPES}

    def score_answer(self, answer: str, example: TaskExample) -> float:
        return self.rouge(answer, example)["rougeL"]

    def corpus_metric(self, predictions: Sequence[str | None], examples: Sequence[TaskExample]) -> dict[str, float]:
        answers = self._answers(predictions, examples)
        totals = dict.fromkeys(ROUGE_TYPES, 0.0)
        for a, ex in zip(answers, examples, strict=True):
            if a is None:
                continue  # an empty summary scores 0 on every ROUGE variant
            for k, v in self.rouge(a, ex).items():
                totals[k] += v
        means = {k: v / len(answers) for k, v in totals.items()}
        return {"metric": means["rougeL"], **means, **_counts(answers)}
