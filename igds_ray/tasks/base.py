"""Task interface: examples, prompt templates, answer extraction, per-example and corpus metrics."""

from __future__ import annotations

import abc
import dataclasses
import math
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


class TaskDataError(ValueError):
    """A task's data cannot be used: missing column, no usable examples, duplicate ids."""


class MissingColumnError(TaskDataError):
    """A column the task needs is absent from the data."""


class SkipRow(Exception):
    """Raised by ``Task.fields_from_row`` for a row that cannot be used; the message is the reason."""


@dataclass(frozen=True)
class TaskExample:
    """One task example.

    ``source`` is the question / document / sentence, ``reference`` the gold answer / summary /
    translation. ``meta`` holds small JSON-friendly extras (split, row, languages).
    """

    id: str
    source: str
    reference: str
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "source": self.source, "reference": self.reference, "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TaskExample:
        return cls(id=str(d["id"]), source=d["source"], reference=d["reference"], meta=dict(d.get("meta") or {}))


# Roles a column mapping may name; tasks add their own (translation adds "translation").
SOURCE, REFERENCE, ID = "source", "reference", "id"


def template_fields(template: str) -> set[str]:
    """Names of the ``{fields}`` a str.format template uses."""
    return {f.split(".")[0].split("[")[0] for _, f, _, _ in string.Formatter().parse(template) if f}


@dataclass(frozen=True, kw_only=True)
class Task(abc.ABC):
    """A task: prompt templates, reference answer, answer extraction and metric.

    Built-in templates end with a newline so that ``build_prompt(ex) + reference_answer(ex)`` is the
    natural training text and generation starts on a fresh line. ``stop_sequences`` are offered to
    generation backends and are also applied by ``extract`` (a prediction is cut at the first one).
    """

    name: str
    templates: tuple[str, ...]
    # Column candidates in preference order; the first one present in the data is used.
    source_columns: tuple[str, ...] = (SOURCE,)
    reference_columns: tuple[str, ...] = (REFERENCE,)
    stop_sequences: tuple[str, ...] = ()
    description: str = ""

    def __post_init__(self) -> None:
        # Lists from YAML/CLI become tuples so the task stays hashable and immutable.
        for f in ("templates", "source_columns", "reference_columns", "stop_sequences"):
            v = getattr(self, f)
            if isinstance(v, str):
                v = (v,)
            object.__setattr__(self, f, tuple(v))
        if not self.name:
            raise ValueError("a task needs a non-empty name")
        self._check_templates()

    # ---- prompts -------------------------------------------------------------------------------
    def format_fields(self, example: TaskExample) -> dict[str, str]:
        """Values available to templates; subclasses add fields (translation: languages)."""
        return {"source": example.source}

    def _check_templates(self) -> None:
        if not self.templates:
            raise ValueError(f"task {self.name!r}: at least one prompt template is needed")
        allowed = set(self.format_fields(TaskExample(id="check", source="x", reference="y")))
        for i, t in enumerate(self.templates):
            if not isinstance(t, str):
                raise TypeError(f"task {self.name!r}: template {i} is {type(t).__name__}, not str")
            used = template_fields(t)
            if "source" not in used:
                raise ValueError(f"task {self.name!r}: template {i} has no {{source}} field: {t!r}")
            unknown = used - allowed
            if unknown:
                raise ValueError(
                    f"task {self.name!r}: template {i} uses unknown field(s) {sorted(unknown)}; "
                    f"available: {sorted(allowed)} (write literal braces as '{{{{' and '}}}}')"
                )

    @property
    def num_templates(self) -> int:
        return len(self.templates)

    def build_prompt(self, example: TaskExample, template_index: int = 0) -> str:
        """The prompt for ``example`` with template ``template_index`` (0 = the default)."""
        if not 0 <= template_index < self.num_templates:
            raise IndexError(
                f"task {self.name!r} has {self.num_templates} template(s); got template_index={template_index}"
            )
        return self.templates[template_index].format(**self.format_fields(example))

    def reference_answer(self, example: TaskExample) -> str:
        """Text a model should produce after the prompt (teacher forcing, fine-tuning response)."""
        return example.reference

    # ---- answers and metrics -------------------------------------------------------------------
    def truncate(self, prediction: str) -> str:
        """Cut a generation at the first stop sequence (generations often run on into a new example)."""
        text = prediction.lstrip()
        cut = len(text)
        for s in self.stop_sequences:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
        return text[:cut].strip()

    def extract(self, prediction: str | None) -> str | None:
        """The answer in a model output, or None when there is none (unparseable)."""
        if not isinstance(prediction, str):
            return None
        text = self.truncate(prediction)
        return text or None

    @abc.abstractmethod
    def score_answer(self, answer: str, example: TaskExample) -> float:
        """Score an already extracted answer in [0, 1]."""

    def score(self, prediction: str | None, example: TaskExample) -> float:
        """Per-example score in [0, 1]; an unparseable prediction scores 0.0 and never raises."""
        answer = self.extract(prediction)
        if answer is None:
            return 0.0
        return _check_unit(self.score_answer(answer, example), self.name)

    def corpus_metric(self, predictions: Sequence[str | None], examples: Sequence[TaskExample]) -> dict[str, float]:
        """Headline metric in [0, 1] under "metric", plus "n", "n_unparseable" and task extras."""
        answers = self._answers(predictions, examples)
        scores = [
            0.0 if a is None else _check_unit(self.score_answer(a, ex), self.name)
            for a, ex in zip(answers, examples, strict=True)
        ]
        mean = sum(scores) / len(scores)
        return {"metric": mean, "mean_score": mean, **_counts(answers)}

    def _answers(self, predictions: Sequence[str | None], examples: Sequence[TaskExample]) -> list[str | None]:
        if len(predictions) != len(examples):
            raise ValueError(f"task {self.name!r}: {len(predictions)} predictions for {len(examples)} examples")
        if not examples:
            raise ValueError(f"task {self.name!r}: no examples to score")
        return [self.extract(p) for p in predictions]

    def replace(self, **changes: Any) -> Task:
        """A copy with some fields changed (e.g. other templates)."""
        return dataclasses.replace(self, **changes)

    # ---- data loading hooks (used by igds_ray.tasks.loading) -----------------------------------
    def column_roles(self) -> dict[str, tuple[str, ...]]:
        """Role -> default column candidates; a user mapping overrides a role with one column."""
        return {SOURCE: self.source_columns, REFERENCE: self.reference_columns}

    def resolve_columns(self, available: Sequence[str], columns: Mapping[str, str] | None = None) -> dict[str, str]:
        """Map each role to a column present in ``available``; raise MissingColumnError if absent."""
        roles = self.column_roles()
        user = dict(columns or {})
        unknown = set(user) - set(roles) - {ID}
        if unknown:
            raise TaskDataError(
                f"task {self.name!r}: unknown column role(s) {sorted(unknown)}; "
                f"valid roles: {sorted(set(roles) | {ID})}"
            )
        out: dict[str, str] = {}
        for role, candidates in roles.items():
            wanted = (user[role],) if role in user else candidates
            out[role] = _pick(role, wanted, available, self.name)
        if ID in user:
            out[ID] = _pick(ID, (user[ID],), available, self.name)
        return out

    def fields_from_row(self, row: Mapping[str, Any], mapping: Mapping[str, str]) -> tuple[Any, Any, dict[str, Any]]:
        """Raw (source, reference, extra meta) of one row; the loader cleans and checks them.

        Raise ``SkipRow(reason)`` for a row that cannot be used (it is counted under that reason).
        """
        return row.get(mapping[SOURCE]), row.get(mapping[REFERENCE]), {}

    def check_example(self, example: TaskExample) -> str | None:
        """Why an example is unusable (counted as a skip reason), or None if it is fine."""
        return None


def _pick(role: str, wanted: Sequence[str], available: Sequence[str], task: str) -> str:
    for c in wanted:
        if c in available:
            return c
    looked = repr(wanted[0]) if len(wanted) == 1 else f"one of {list(wanted)}"
    raise MissingColumnError(
        f"task {task!r}: column {looked} for {role!r} not found; columns present: {list(available)}. "
        f"Pass columns={{{role!r}: '<column>'}} to map it."
    )


def _check_unit(value: Any, task: str) -> float:
    v = float(value)
    if not math.isfinite(v) or not 0.0 <= v <= 1.0:
        raise ValueError(f"task {task!r}: a per-example score must be in [0, 1], got {value!r}")
    return v


def _counts(answers: Sequence[str | None]) -> dict[str, float]:
    return {"n": len(answers), "n_unparseable": sum(a is None for a in answers)}
