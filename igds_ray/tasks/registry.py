"""Task registry: built-ins, user registrations, and ``package.module:attr`` dotted paths."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any, TypeVar

from igds_ray.tasks.base import Task
from igds_ray.tasks.math import MathTask
from igds_ray.tasks.summarization import SummarizationTask
from igds_ray.tasks.translation import TranslationTask

TaskFactory = Callable[..., Task]
Entry = Task | TaskFactory
E = TypeVar("E", bound=Entry)

BUILTIN_TASKS: dict[str, type[Task]] = {
    "math": MathTask,
    "summarization": SummarizationTask,
    "translation": TranslationTask,
}

_REGISTRY: dict[str, Entry] = dict(BUILTIN_TASKS)


class UnknownTaskError(LookupError):
    """No task is registered under a name and it is not an importable dotted path."""


def register_task(name: str, factory_or_instance: E | None = None, *, overwrite: bool = False) -> Any:
    """Register a task instance, a ``Task`` subclass or a factory ``(**options) -> Task``.

    Without ``factory_or_instance`` it returns a decorator. The registry lives in this process:
    Ray workers get tasks by pickling the instance, or by a dotted path they can import.
    """
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"task name must be a non-empty string without ':' (reserved for dotted paths), got {name!r}")

    def _register(entry: E) -> E:
        if not (isinstance(entry, Task) or callable(entry)):
            raise TypeError(f"register_task({name!r}, ...) needs a Task, a Task subclass or a factory, got {entry!r}")
        if name in _REGISTRY and not overwrite and _REGISTRY[name] is not entry:
            raise ValueError(f"task {name!r} is already registered; pass overwrite=True to replace it")
        _REGISTRY[name] = entry
        return entry

    return _register if factory_or_instance is None else _register(factory_or_instance)


def unregister_task(name: str) -> None:
    """Remove a registration (built-ins included); unknown names are ignored."""
    _REGISTRY.pop(name, None)


def list_tasks() -> list[str]:
    """Registered task names, sorted."""
    return sorted(_REGISTRY)


def get_task(name: str | Task, /, **options: Any) -> Task:
    """A task by registered name or ``package.module:attr`` path, built with ``options``.

    ``options`` are task fields (``templates``, ``src_lang``/``tgt_lang`` for translation, ...) or
    a factory's keyword arguments. A ``Task`` passed in is returned, with ``options`` applied.
    """
    if isinstance(name, Task):
        return _with_options(name, options)
    if not isinstance(name, str):
        raise TypeError(f"get_task needs a task name or a Task, got {type(name).__name__}")
    if name in _REGISTRY:
        entry, where = _REGISTRY[name], f"registered task {name!r}"
    elif ":" in name:
        entry, where = _load_dotted(name), f"task path {name!r}"
    else:
        raise UnknownTaskError(
            f"unknown task {name!r}; registered: {list_tasks()}. Register one with register_task(), "
            f"or give a dotted path 'package.module:factory'."
        )
    return _build(entry, options, where)


def _build(entry: Entry, options: dict[str, Any], where: str) -> Task:
    if isinstance(entry, Task):
        return _with_options(entry, options)
    if isinstance(entry, type) and issubclass(entry, Task):
        _check_options(entry, options, where)
    task = entry(**options)
    if not isinstance(task, Task):
        raise TypeError(f"{where}: the factory returned {type(task).__name__}, not a Task")
    return task


def _with_options(task: Task, options: dict[str, Any]) -> Task:
    if not options:
        return task
    _check_options(type(task), options, f"task {task.name!r}")
    return dataclasses.replace(task, **options)


def _check_options(cls: type[Task], options: dict[str, Any], where: str) -> None:
    valid = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = set(options) - valid
    if unknown:
        raise TypeError(f"{where}: unknown option(s) {sorted(unknown)}; options: {sorted(valid)}")


def _load_dotted(path: str) -> Entry:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise UnknownTaskError(f"bad task path {path!r}; expected 'package.module:attr'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise UnknownTaskError(f"task path {path!r}: cannot import module {module_name!r}: {e}") from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UnknownTaskError(f"task path {path!r}: {module_name!r} has no attribute {attr!r}") from None
    if not (isinstance(obj, Task) or callable(obj)):
        raise UnknownTaskError(f"task path {path!r} points to {type(obj).__name__}, not a Task or a factory")
    return obj
