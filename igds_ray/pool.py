"""Read a Parquet pool as a Ray Data datasource that keeps each row's provenance.

Every row leaves the reader with `id` (the pool's own, or a stable `<file>:<row>`), `src_file`,
`src_row`, the needed text columns (only those are read) and `_input_error` for values that are
not usable strings (null, wrong type, invalid UTF-8). Files are listed and their footers read on
the driver before any compute, so a missing column or a corrupt file stops the job at once with
the file's name.
"""

from __future__ import annotations

import functools
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from igds_ray.errors import PoolError
from igds_ray.schema import ID, INPUT_ERROR, SRC_FILE, SRC_ROW
from igds_ray.storage import filesystem

PARQUET_SUFFIXES = (".parquet", ".pq", ".parq")
READ_TASK_CPUS = 0.25  # CPUs a pool read task reserves
TASK_BYTES = 64 << 20  # read columns per read task when pool.rows_per_read_task is auto (Ray Data's blocks: 128 MiB)


@dataclass(frozen=True)
class PoolFile:
    path: str  # path inside the filesystem
    rel: str  # relative to the pool root: the stable part of generated ids
    row_groups: tuple[int, ...]  # rows per row group
    size: int = -1  # bytes (-1: unknown); with `row_groups`, what tells a changed file from the one scored
    read_bytes: int = -1  # uncompressed bytes of the columns read (footer statistics; -1: unknown)
    mtime_ns: int = -1  # modification time from the listing (-1: unknown): incremental scoring's file key

    @property
    def num_rows(self) -> int:
        return sum(self.row_groups)


@dataclass(frozen=True)
class Pool:
    uri: str
    files: tuple[PoolFile, ...]
    text_columns: tuple[str, ...]
    id_column: str | None  # None: ids are generated
    id_type: pa.DataType

    @property
    def num_rows(self) -> int:
        return sum(f.num_rows for f in self.files)

    def rows_per_read_task(self, target_bytes: int = TASK_BYTES, floor: int = 8192, cap: int = 131072) -> int:
        """Rows per read task for about `target_bytes` of the read columns, from the footers' uncompressed sizes,
        within [floor, cap]. The cap bounds what dictionary-encoded (repetitive) text, whose encoded size
        understates its size in memory, can make a task read."""
        known = [f for f in self.files if f.read_bytes > 0 and f.num_rows]
        if not known:
            return floor
        per_row = sum(f.read_bytes for f in known) / sum(f.num_rows for f in known)
        return max(floor, min(cap, int(target_bytes / max(per_row, 1.0))))


def _hidden(rel: str) -> bool:
    return any(part.startswith(("_", ".")) for part in rel.split("/"))


def list_files(uri: str) -> tuple[pafs.FileSystem, list[tuple[str, str, int]]]:
    """(filesystem, [(path, path relative to the pool root, size in bytes)]) of the pool's Parquet files."""
    fs, found = list_file_infos(uri)
    return fs, [(path, rel, size) for path, rel, size, _ in found]


def list_file_infos(uri: str) -> tuple[pafs.FileSystem, list[tuple[str, str, int, int]]]:
    """`list_files` with each file's modification time in ns (-1: unknown), from the same listing."""
    fs, root = filesystem(uri)
    info = fs.get_file_info(root)

    def entry(e: pafs.FileInfo, rel: str) -> tuple[str, str, int, int]:
        return (e.path, rel, e.size if e.size is not None else -1, e.mtime_ns if e.mtime_ns is not None else -1)

    if info.type == pafs.FileType.NotFound:
        raise PoolError(f"pool {uri}: no such file or directory")
    if info.type == pafs.FileType.File:
        return fs, [entry(info, posixpath.basename(root))]
    found = []
    for e in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if e.type != pafs.FileType.File:
            continue
        rel = posixpath.relpath(e.path, root)
        if not _hidden(rel) and rel.endswith(PARQUET_SUFFIXES):
            found.append(entry(e, rel))
    if not found:
        raise PoolError(f"pool {uri}: no Parquet files ({', '.join(PARQUET_SUFFIXES)}) in this directory")
    return fs, sorted(found, key=lambda x: x[1])


def discover(uri: str, text_columns: Iterable[str], id_column: str | None, threads: int = 16) -> Pool:
    """List the pool's files and read their footers; check columns and ids before any compute."""
    text_columns = tuple(text_columns)
    fs, infos = list_file_infos(uri)
    paths = [(path, rel, size) for path, rel, size, _ in infos]
    mtimes = {rel: m for _, rel, _, m in infos}

    def footer(item: tuple[str, str, int]) -> tuple[str, str, int, pq.FileMetaData]:
        path, rel, size = item
        try:
            with fs.open_input_file(path) as f:
                return path, rel, size, pq.ParquetFile(f).metadata
        except Exception as e:
            raise PoolError(f"pool file {rel}: not a readable Parquet file ({type(e).__name__}: {e})") from None

    with ThreadPoolExecutor(max_workers=threads) as ex:
        metas = list(ex.map(footer, paths))

    files, has_id, id_type = [], None, pa.string()
    for path, rel, size, meta in metas:
        schema = meta.schema.to_arrow_schema()
        for c in (*text_columns, *([id_column] if id_column else [])):
            if schema.names.count(c) > 1:
                raise PoolError(f"pool file {rel}: column {c!r} appears {schema.names.count(c)} times")
        missing = [c for c in text_columns if c not in schema.names]
        if missing:
            raise PoolError(
                f"pool file {rel}: missing column{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} "
                f"(columns: {', '.join(schema.names) or 'none'})"
            )
        file_has_id = bool(id_column) and id_column in schema.names
        if has_id is None:
            has_id = file_has_id
            if has_id:
                id_type = schema.field(id_column).type
        elif has_id != file_has_id:
            raise PoolError(
                f"pool file {rel}: column {id_column!r} is {'present' if file_has_id else 'absent'} here but "
                f"{'present' if has_id else 'absent'} in {files[0].rel}; ids must come from every file or none"
            )
        if file_has_id:
            t = schema.field(id_column).type
            if t != id_type:
                raise PoolError(f"pool file {rel}: id column {id_column!r} has type {t}, other files {id_type}")
            if not (pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)):
                raise PoolError(f"pool file {rel}: id column {id_column!r} must be integers or strings, not {t}")
            col = schema.names.index(id_column)
            for rg in range(meta.num_row_groups):
                stats = meta.row_group(rg).column(col).statistics
                if stats is not None and stats.has_null_count:
                    nulls = stats.null_count
                else:  # no statistics in the footer: read just this column of this row group
                    with fs.open_input_file(path) as fh:
                        nulls = pq.ParquetFile(fh).read_row_group(rg, columns=[id_column]).column(0).null_count
                if nulls > 0:
                    raise PoolError(f"pool file {rel}: id column {id_column!r} has null values (row group {rg})")
        leaves = {meta.schema.column(j).path: j for j in range(meta.num_columns)}  # Parquet leaf columns
        read = [leaves[c] for c in (*text_columns, *([id_column] if file_has_id else [])) if c in leaves]
        read_bytes = sum(meta.row_group(i).column(j).total_uncompressed_size
                         for i in range(meta.num_row_groups) for j in read)
        files.append(PoolFile(path, rel, tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups)), size,
                              read_bytes, mtimes[rel]))
    pool = Pool(uri, tuple(files), text_columns, id_column if has_id else None, id_type)
    if pool.num_rows == 0:
        raise PoolError(f"pool {uri}: its {len(files)} Parquet file(s) hold no rows")
    return pool


def as_text(col: pa.ChunkedArray | pa.Array, name: str) -> tuple[list[str | None], list[str | None]]:
    """(values, errors) for one text column; a value that is not a usable string gets an error.

    The reader's normalisation, shared by everything that reads pool text back (select's row fetch).
    """
    t = col.type
    if pa.types.is_dictionary(t):  # e.g. pandas `category` columns: the values are what counts
        return as_text(col.cast(t.value_type), name)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        values = col.to_pylist()
        return values, [f"{name} is null" if v is None else None for v in values]
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        values, errors = [], []
        for v in col.to_pylist():
            if v is None:
                values.append(None)
                errors.append(f"{name} is null")
                continue
            try:
                values.append(v.decode("utf-8"))
                errors.append(None)
            except UnicodeDecodeError as e:
                values.append(None)
                errors.append(f"{name} is not valid UTF-8 ({e.reason} at byte {e.start})")
        return values, errors
    return [None] * len(col), [f"{name} has type {t}, not a string" for _ in range(len(col))]


_as_text = as_text  # the former private name, kept for callers outside this package


def _chunks(f: PoolFile, max_rows: int) -> Iterator[tuple[int, list[int]]]:
    """(first row, row groups) tasks of at most `max_rows` rows, never splitting a row group."""
    start, group, rows, first = 0, [], 0, 0
    for i, n in enumerate(f.row_groups):
        if group and rows + n > max_rows:
            yield first, group
            group, rows, first = [], 0, start
        group.append(i)
        rows += n
        start += n
    if group:
        yield first, group


@dataclass(frozen=True)
class ChunkSpec:
    """Everything one read task needs, and nothing about the rest of the pool: a task's pickled size does not
    grow with the pool's file count."""

    path: str  # path inside the filesystem
    rel: str  # relative to the pool root
    first_row: int
    row_groups: tuple[int, ...]  # indices of the row groups read
    text_columns: tuple[str, ...]
    id_column: str | None
    skip: np.ndarray | None = None  # [start, end) runs of chunk positions an earlier attempt already scored
    rows_per_block: int = 8192


def read_spec(fs: pafs.FileSystem, spec: ChunkSpec) -> list[pa.Table]:
    """A read task's body (module level, so the task pickles as a reference plus its own spec)."""
    table = _read_columns(fs, spec.path, spec.rel, spec.first_row, list(spec.row_groups), spec.text_columns,
                          spec.id_column)
    return _sliced(_without(table, spec.skip), spec.rows_per_block)


def read_chunk(fs: pafs.FileSystem, pool: Pool, f: PoolFile, first_row: int, row_groups: list[int]) -> pa.Table:
    return _read_columns(fs, f.path, f.rel, first_row, row_groups, pool.text_columns, pool.id_column)


def _read_columns(fs: pafs.FileSystem, path: str, rel: str, first_row: int, row_groups: list[int],
                  text_columns: tuple[str, ...], id_column: str | None) -> pa.Table:
    columns = list(text_columns) + ([id_column] if id_column else [])
    try:
        with fs.open_input_file(path) as fh:
            table = pq.ParquetFile(fh).read_row_groups(row_groups, columns=columns)
    except Exception as e:
        raise PoolError(f"pool file {rel}: cannot read row groups {row_groups} ({type(e).__name__}: {e})") from None
    n = table.num_rows
    rows = pa.array(range(first_row, first_row + n), pa.int64())
    if id_column:
        ids = table.column(id_column)
    else:
        ids = pa.array([f"{rel}:{r}" for r in range(first_row, first_row + n)], pa.string())
    out: dict[str, pa.Array | pa.ChunkedArray] = {ID: ids, SRC_FILE: pa.array([rel] * n, pa.string()), SRC_ROW: rows}
    errors: list[str | None] = [None] * n
    for name in text_columns:
        values, errs = as_text(table.column(name), name)
        out[name] = pa.array(values, pa.large_string())
        errors = [a if a is not None else b for a, b in zip(errors, errs)]
    out[INPUT_ERROR] = pa.array(errors, pa.string())
    return pa.table(out)


def _sliced(table: pa.Table, rows: int) -> list[pa.Table]:
    # A single oversized row group still leaves the reader in bounded blocks.
    return [table.slice(i, rows) for i in range(0, max(table.num_rows, 1), rows)]


def _without(table: pa.Table, skip: np.ndarray | None) -> pa.Table:
    """`table` less the rows in the [start, end) position runs `skip` (rows a finished part of an earlier
    attempt holds)."""
    if skip is None or not len(skip):
        return table
    keep = np.ones(table.num_rows, dtype=bool)
    for a, b in skip:
        keep[a:b] = False
    return table.filter(pa.array(keep))


def _overlap(runs: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """The parts of sorted disjoint [start, end) `runs` inside [lo, hi), shifted to start at 0."""
    i, j = np.searchsorted(runs[:, 1], lo, side="right"), np.searchsorted(runs[:, 0], hi, side="left")
    part = runs[i:j].copy()
    if len(part):
        part[:, 0] = np.maximum(part[:, 0], lo)
        part[:, 1] = np.minimum(part[:, 1], hi)
    return part - lo


def make_datasource(pool: Pool, rows_per_task: int,
                    done: Mapping[str, np.ndarray] | None = None) -> "ray.data.Datasource":  # noqa: F821
    """One read task per (file, run of whole row groups of at most `rows_per_task` rows).

    `done`: per pool file (relative path), the rows already scored (kept from an earlier attempt) as an
    (n, 2) array of sorted disjoint [start, end) runs; a task whose rows are all done is not created, the
    others drop those rows right after reading, so they never reach a scorer.
    """
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    fs, _ = filesystem(pool.uri)
    done = done or {}

    class PoolDatasource(Datasource):
        def get_name(self) -> str:
            return "IGDSPool"

        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None):
            tasks = []
            for f in pool.files:
                finished = done.get(f.rel)
                for first, groups in _chunks(f, rows_per_task):
                    n = sum(f.row_groups[g] for g in groups)
                    skip = None
                    if finished is not None and len(finished):
                        skip = _overlap(np.asarray(finished, dtype=np.int64).reshape(-1, 2), first, first + n)
                        if not len(skip):
                            skip = None
                        elif int((skip[:, 1] - skip[:, 0]).sum()) == n:
                            continue
                    rows = n - (0 if skip is None else int((skip[:, 1] - skip[:, 0]).sum()))
                    meta = BlockMetadata(num_rows=rows, size_bytes=None, input_files=[f.path], exec_stats=None)
                    spec = ChunkSpec(f.path, f.rel, first, tuple(groups), pool.text_columns, pool.id_column, skip,
                                     rows_per_task)
                    tasks.append(ReadTask(functools.partial(read_spec, fs, spec), meta,
                                          per_task_row_limit=per_task_row_limit))
            return tasks

    return PoolDatasource()


def read_pool(pool: Pool, rows_per_task: int, done: Mapping[str, np.ndarray] | None = None
              ) -> "ray.data.Dataset":  # noqa: F821
    import ray

    # A quarter of a CPU per read task: scorer actors that reserve all but a fraction of the cluster's CPUs still
    # leave the reads room to run (a read task at Ray Data's default of 1 CPU could wait forever).
    return ray.data.read_datasource(make_datasource(pool, rows_per_task, done), num_cpus=READ_TASK_CPUS)
