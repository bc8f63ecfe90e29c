"""Custom tasks from plain functions, so users need not subclass ``Task``."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from igds_ray.tasks.base import REFERENCE, SOURCE, Task, TaskExample, _check_unit, _counts

logger = logging.getLogger(__name__)

PromptFn = Callable[..., str]  # (example) -> str or (example, template_index) -> str
ScoreFn = Callable[[str, TaskExample], float]  # (extracted answer, example) -> [0, 1]
CorpusFn = Callable[[Sequence[str | None], Sequence[TaskExample]], Mapping[str, float]]


def _takes_index(fn: Callable[..., Any]) -> bool:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # some builtins have no signature; assume the simple form
        return False
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2


@dataclass(frozen=True, init=False)
class FunctionTask(Task):
    """A task made of functions.

    ``prompt_fn(example)`` or ``prompt_fn(example, template_index)`` builds the prompt (None: use
    ``templates``); ``score_fn(answer, example)`` scores an extracted answer in [0, 1];
    ``reference_fn(example)`` gives the response text (default: the reference); ``extract_fn(text)``
    finds the answer in a prediction already cut at ``stop_sequences`` and stripped (default: the text;
    None or an exception means unparseable). ``corpus_fn(predictions, examples)`` may return the
    corpus metrics (it must include "metric"); by default the mean per-example score.
    """

    prompt_fn: PromptFn | None = None
    score_fn: ScoreFn | None = None
    reference_fn: Callable[[TaskExample], str] | None = None
    extract_fn: Callable[[str], str | None] | None = None
    corpus_fn: CorpusFn | None = None
    num_prompts: int = 1

    def __init__(
        self,
        name: str,
        prompt_fn: PromptFn | None,
        score_fn: ScoreFn,
        reference_fn: Callable[[TaskExample], str] | None = None,
        extract_fn: Callable[[str], str | None] | None = None,
        *,
        corpus_fn: CorpusFn | None = None,
        num_prompts: int = 1,
        templates: Sequence[str] = ("{source}",),
        source_columns: Sequence[str] = (SOURCE,),
        reference_columns: Sequence[str] = (REFERENCE,),
        stop_sequences: Sequence[str] = (),
        description: str = "",
    ) -> None:
        values = dict(locals())
        for k in ("self", "__class__"):
            values.pop(k, None)
        for k, v in values.items():
            object.__setattr__(self, k, v)
        self.__post_init__()

    def __post_init__(self) -> None:
        if not callable(self.score_fn):
            raise TypeError(f"task {self.name!r}: score_fn must be callable, got {self.score_fn!r}")
        for f in ("prompt_fn", "reference_fn", "extract_fn", "corpus_fn"):
            v = getattr(self, f)
            if v is not None and not callable(v):
                raise TypeError(f"task {self.name!r}: {f} must be callable or None, got {v!r}")
        if self.num_prompts < 1:
            raise ValueError(f"task {self.name!r}: num_prompts must be >= 1")
        super().__post_init__()
        if self.prompt_fn is not None:
            object.__setattr__(self, "_prompt_takes_index", _takes_index(self.prompt_fn))

    @property
    def num_templates(self) -> int:
        return self.num_prompts if self.prompt_fn is not None else len(self.templates)

    def build_prompt(self, example: TaskExample, template_index: int = 0) -> str:
        if self.prompt_fn is None:
            return super().build_prompt(example, template_index)
        if not 0 <= template_index < self.num_templates:
            raise IndexError(
                f"task {self.name!r} has {self.num_templates} prompt(s); got template_index={template_index}"
            )
        if self._prompt_takes_index:  # type: ignore[attr-defined]
            return str(self.prompt_fn(example, template_index))
        return str(self.prompt_fn(example))

    def reference_answer(self, example: TaskExample) -> str:
        return example.reference if self.reference_fn is None else str(self.reference_fn(example))

    def extract(self, prediction: str | None) -> str | None:
        text = super().extract(prediction)
        if text is None or self.extract_fn is None:
            return text
        try:
            ans = self.extract_fn(text)
        except Exception as e:  # noqa: BLE001 - a model answer the user's parser rejects is unparseable
            logger.debug("task %r: extract_fn raised %s: %s", self.name, type(e).__name__, e)
            return None
        return None if ans is None or not str(ans).strip() else str(ans)

    def score_answer(self, answer: str, example: TaskExample) -> float:
        return self.score_fn(answer, example)  # type: ignore[misc]

    def corpus_metric(self, predictions: Sequence[str | None], examples: Sequence[TaskExample]) -> dict[str, float]:
        if self.corpus_fn is None:
            return super().corpus_metric(predictions, examples)
        answers = self._answers(predictions, examples)
        out = dict(self.corpus_fn(predictions, examples))
        if "metric" not in out:
            raise ValueError(f"task {self.name!r}: corpus_fn must return a 'metric' key, got {sorted(out)}")
        out["metric"] = _check_unit(out["metric"], self.name)
        for k, v in _counts(answers).items():
            out.setdefault(k, v)
        return out
