"""Tasks: math reasoning, summarization, translation, and user-defined ones.

A task owns its prompt templates, reference answer, answer extraction and metric; the loaders turn
a Hugging Face dataset or a Parquet/JSONL file into ``TaskExample`` rows.
"""

from igds_ray.tasks.base import MissingColumnError, SkipRow, Task, TaskDataError, TaskExample
from igds_ray.tasks.custom import FunctionTask
from igds_ray.tasks.loading import LoadStats, TaskSet, load_task_examples, load_task_set, parse_hf_spec
from igds_ray.tasks.math import MathTask, answers_equal, extract_math_answer
from igds_ray.tasks.registry import (
    BUILTIN_TASKS,
    UnknownTaskError,
    get_task,
    list_tasks,
    register_task,
    unregister_task,
)
from igds_ray.tasks.summarization import SummarizationTask
from igds_ray.tasks.translation import TranslationTask, language_name

__all__ = [
    "BUILTIN_TASKS",
    "FunctionTask",
    "LoadStats",
    "MathTask",
    "MissingColumnError",
    "SkipRow",
    "SummarizationTask",
    "Task",
    "TaskDataError",
    "TaskExample",
    "TaskSet",
    "TranslationTask",
    "UnknownTaskError",
    "answers_equal",
    "extract_math_answer",
    "get_task",
    "language_name",
    "list_tasks",
    "load_task_examples",
    "load_task_set",
    "parse_hf_spec",
    "register_task",
    "unregister_task",
]
