"""Load task examples from a Hugging Face dataset or a local/remote Parquet or JSONL file."""

from __future__ import annotations

import json
import logging
import math
import posixpath
import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from igds_ray.storage import filesystem
from igds_ray.tasks.base import ID, REFERENCE, SOURCE, SkipRow, Task, TaskDataError, TaskExample

logger = logging.getLogger(__name__)

HF_PREFIX = "hf://"
PARQUET_EXTS = (".parquet",)
JSON_EXTS = (".jsonl", ".json")
DEFAULT_HF_SPLIT = "train"
_SPLIT_NAMES = ("train", "test", "validation", "valid", "dev", "val")

Rows = Sequence[Mapping[str, Any]]
# (columns present, read(columns) -> rows with those columns)
_Reader = tuple[list[str], Callable[[list[str]], list[dict[str, Any]]]]


@dataclass(frozen=True)
class LoadStats:
    """What a load read, used and skipped (never drop a row silently)."""

    source: str
    split: str | None
    columns: dict[str, str]
    n_rows: int
    n_usable: int
    n_selected: int
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())


@dataclass(frozen=True)
class TaskSet:
    """Examples of one task plus the load statistics."""

    task: Task
    examples: list[TaskExample]
    stats: LoadStats

    def __len__(self) -> int:
        return len(self.examples)


def parse_hf_spec(source: str) -> tuple[str, str | None]:
    """``hf://name[:config]`` -> (name, config)."""
    spec = source[len(HF_PREFIX) :]
    name, _, config = spec.partition(":")
    if not name:
        raise TaskDataError(
            f"empty dataset name in {source!r}; expected hf://name[:config], e.g. hf://openai/gsm8k:main"
        )
    return name, (config or None)


def load_task_set(
    task: Task | str,
    source: str | Rows,
    split: str | None = None,
    columns: Mapping[str, str] | None = None,
    limit: int | None = None,
    seed: int | None = 0,
) -> TaskSet:
    """Load, clean and optionally subsample a task's examples.

    ``source``: ``hf://name[:config]`` (``datasets.load_dataset``; split defaults to "train"), a
    ``.parquet``/``.jsonl``/``.json`` file or a directory of them (local or any pyarrow URI such as
    ``s3://``), or an in-memory list of row dicts. ``columns`` maps roles ("source", "reference",
    "id", translation: "translation") to column names, overriding the task's defaults. Rows with a
    null/empty source or reference are skipped and counted. ``limit`` keeps a seeded random subset
    (in file order); ``seed=None`` keeps the first ``limit``. Ids are the ``id`` column if mapped,
    else ``{split}-{row_index}`` (``row-{row_index}`` when no split is given for a file).
    """
    if isinstance(task, str):
        from igds_ray.tasks.registry import get_task

        task = get_task(task)
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be positive or None, got {limit}")
    if isinstance(source, str) and source.startswith(HF_PREFIX):
        split = split or DEFAULT_HF_SPLIT
        available, read = _hf_reader(source, split)
        label = source
    elif isinstance(source, str):
        available, read = _file_reader(source, split)
        label = source
    else:
        rows = [dict(r) for r in source]
        available = _keys_in_order(rows)
        read = lambda cols: rows  # noqa: E731 - in-memory rows need no projection
        label = "<in-memory rows>"

    if not available:  # an empty JSONL file or list has no columns to look for
        raise TaskDataError(f"task {task.name!r}: no usable examples in {label}: it has no rows")
    mapping = task.resolve_columns(available, columns)
    rows = read(sorted(set(mapping.values())))
    examples, skipped = _to_examples(task, rows, mapping, split)
    if not examples:
        detail = ", ".join(f"{k}: {v}" for k, v in skipped.items()) or "the source has no rows"
        raise TaskDataError(
            f"task {task.name!r}: no usable examples in {label} (split={split!r}); "
            f"columns used {dict(mapping)}; {len(rows)} rows read, skipped: {detail}"
        )
    n_usable = len(examples)
    if limit is not None and limit < n_usable:
        if seed is None:
            examples = examples[:limit]
        else:
            keep = sorted(random.Random(seed).sample(range(n_usable), limit))
            examples = [examples[i] for i in keep]
    if skipped:
        logger.warning(
            "task %r: skipped %d of %d rows of %s: %s",
            task.name,
            sum(skipped.values()),
            len(rows),
            label,
            dict(skipped),
        )
    stats = LoadStats(
        source=label,
        split=split,
        columns=dict(mapping),
        n_rows=len(rows),
        n_usable=n_usable,
        n_selected=len(examples),
        skipped=dict(skipped),
    )
    return TaskSet(task=task, examples=examples, stats=stats)


def load_task_examples(
    task: Task | str,
    source: str | Rows,
    split: str | None = None,
    columns: Mapping[str, str] | None = None,
    limit: int | None = None,
    seed: int | None = 0,
) -> list[TaskExample]:
    """The examples of ``load_task_set`` (see there)."""
    return load_task_set(task, source, split=split, columns=columns, limit=limit, seed=seed).examples


# ---- rows -> examples ---------------------------------------------------------------------------
def _to_examples(
    task: Task, rows: list[dict[str, Any]], mapping: Mapping[str, str], split: str | None
) -> tuple[list[TaskExample], Counter[str]]:
    skipped: Counter[str] = Counter()
    examples: list[TaskExample] = []
    seen: dict[str, int] = {}
    prefix = split or "row"
    for i, row in enumerate(rows):
        try:
            raw_src, raw_ref, extra = task.fields_from_row(row, mapping)
            src = _text(raw_src, SOURCE)
            ref = _text(raw_ref, REFERENCE)
            if src is None:
                raise SkipRow("null or empty source")
            if ref is None:
                raise SkipRow("null or empty reference")
            if ID in mapping:
                raw_id = row.get(mapping[ID])
                if raw_id is None or (isinstance(raw_id, str) and not raw_id.strip()):
                    raise SkipRow("null id")
                ex_id = str(raw_id)
            else:
                ex_id = f"{prefix}-{i}"
            ex = TaskExample(id=ex_id, source=src, reference=ref, meta={"split": split, "row": i, **extra})
            reason = task.check_example(ex)
            if reason:
                raise SkipRow(reason)
        except SkipRow as e:
            skipped[str(e)] += 1
            continue
        if ex_id in seen:
            raise TaskDataError(
                f"task {task.name!r}: id {ex_id!r} in column {mapping[ID]!r} appears at rows {seen[ex_id]} and {i}; "
                "ids must be unique"
            )
        seen[ex_id] = i
        examples.append(ex)
    return examples, skipped


def _text(value: Any, role: str) -> str | None:
    """A cell as clean text, or None when it is null/empty."""
    if value is None:
        return None
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, bool):
        raise SkipRow(f"{role} is a boolean")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return None
        # Pandas turns integer answer columns with nulls into floats: 72.0 is the answer "72".
        return str(int(value)) if value.is_integer() else str(value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return "\n".join(v.strip() for v in value if v.strip()) or None
    raise SkipRow(f"{role} has unsupported type {type(value).__name__}")


def _keys_in_order(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    keys: dict[str, None] = {}
    for r in rows:
        keys.update(dict.fromkeys(r))
    return list(keys)


# ---- readers ------------------------------------------------------------------------------------
def _hf_reader(source: str, split: str) -> _Reader:
    name, config = parse_hf_spec(source)
    try:
        import datasets

        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # noqa: BLE001 - re-raised with the spec that failed
        raise TaskDataError(
            f"could not load Hugging Face dataset {name!r} (config={config!r}, split={split!r}) from {source!r}: "
            f"{type(e).__name__}: {e}. Offline? Download it first or pass a local Parquet/JSONL path."
        ) from e
    return list(ds.column_names), lambda cols: ds.select_columns(cols).to_list()


def _kind(path: str) -> str | None:
    p = path.lower()
    if p.endswith(PARQUET_EXTS):
        return "parquet"
    if p.endswith(JSON_EXTS):
        return "json"
    return None


def _file_reader(source: str, split: str | None) -> _Reader:
    import pyarrow.fs as pafs

    fs, path = filesystem(source)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"task data {source!r} does not exist")
    if info.type == pafs.FileType.Directory:
        files = _dir_files(fs, path, source, split)
    else:
        if _kind(path) is None:
            raise TaskDataError(
                f"cannot read {source!r}: expected a .parquet, .jsonl or .json file, a directory of them, or hf://name[:config]"
            )
        files = [path]
    kind = _kind(files[0])
    return _parquet_reader(fs, files) if kind == "parquet" else _json_reader(fs, files)


def _dir_files(fs: Any, path: str, source: str, split: str | None) -> list[str]:
    import pyarrow.fs as pafs

    if split and fs.get_file_info(posixpath.join(path, split)).type == pafs.FileType.Directory:
        path = posixpath.join(path, split)  # <dir>/<split>/*.parquet
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File and _kind(i.path))
    # Parquet wins when both kinds are present; mixing them would mix schemas.
    parquet = [f for f in files if _kind(f) == "parquet"]
    files = parquet or files
    if not files:
        raise TaskDataError(f"no .parquet, .jsonl or .json files under {source!r}")
    if split:
        # HF snapshots name files <split>-00000-of-00001.parquet.
        mine = [f for f in files if _split_of(f) == split]
        if mine:
            return mine
        named = sorted({s for f in files if (s := _split_of(f)) in _SPLIT_NAMES})
        if named:
            raise TaskDataError(f"no files for split {split!r} under {source!r}; splits found: {named}")
    return files


def _split_of(path: str) -> str:
    base = posixpath.basename(path)
    for sep in ("-", "_", "."):
        base = base.split(sep)[0]
    return base


def _parquet_reader(fs: Any, files: list[str]) -> _Reader:
    import pyarrow.parquet as pq

    available = list(pq.read_schema(files[0], filesystem=fs).names)

    def read(cols: list[str]) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for f in files:  # one file at a time keeps the global row order, and so the ids, stable
            rows.extend(pq.read_table(f, columns=cols, filesystem=fs).to_pylist())
        return rows

    return available, read


def _json_reader(fs: Any, files: list[str]) -> _Reader:
    rows: list[dict[str, Any]] = []
    for f in files:
        with fs.open_input_stream(f) as stream:
            text = stream.read().decode("utf-8")
        rows.extend(_parse_json(text, f))
    return _keys_in_order(rows), lambda cols: rows


def _parse_json(text: str, name: str) -> list[dict[str, Any]]:
    stripped = text.lstrip()
    if stripped.startswith("["):  # a JSON array of objects
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise TaskDataError(f"{name}: invalid JSON: {e}") from None
        lines = list(enumerate(data, 1))
    else:  # JSON lines
        lines = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                lines.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise TaskDataError(f"{name}: line {n} is not valid JSON: {e}") from None
    out = []
    for n, obj in lines:
        if not isinstance(obj, dict):
            raise TaskDataError(f"{name}: record {n} is a {type(obj).__name__}, expected a JSON object")
        out.append(obj)
    return out
