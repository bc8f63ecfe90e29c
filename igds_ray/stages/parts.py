"""Exactly-once bookkeeping of a scoring stage in O(parts + files), never O(rows), on the driver.

Every part a write task writes carries a small summary, returned to the driver with the Datasink's write
results and stored in the part's Parquet key-value metadata (`SUMMARY_KEY`), so a resume reads footers only:

- `rows`, `errors`, `truncated`, `tokens`, `rendered`: counts the manifest sums;
- `checksum`: the sum modulo 2^64 of `key_hash(file, row)` over the part's (src_file, src_row) keys, an
  order-independent multiset hash. The stage's parts must sum to the pool's own checksum (`PoolChecksum`,
  computed from the file names and row counts in chunks: bounded memory at any pool size) with as many rows
  as the pool has. One missing row, one row written twice, or a row of a file the pool lacks always changes
  the sum (`key_hash` is a bijection of a 64-bit key); any combination of such errors leaves it unchanged
  with a chance of about 2^-64;
- `fingerprint`: the attempt's (method, config, pool files), so a part of another pool or config is named;
- `runs`: per pool file, the part's rows as sorted [start, end) runs (reading keeps rows of one read task
  together, so they are few), which a resume uses to skip finished rows. A part whose rows are scattered
  (ZIP's hash-sharded parts: more than `MAX_RUNS` runs) stores none; it is then scored again on resume.

When the check fails, a diagnostic pass counts rows per file (O(files) memory) to name what is wrong.
Duplicate ids are counted exactly (`count_duplicate_ids`): in the driver for pools of at most
`DRIVER_ID_LIMIT` rows (8 bytes per row), otherwise as a Ray Data job hash-partitioned by id.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np
import pyarrow as pa

from igds_ray import schema as S
from igds_ray.errors import StageOutputError

log = logging.getLogger(__name__)

SUMMARY_KEY = b"igds.part"
MAX_RUNS = 1024  # runs per part kept for resume; beyond that a part is rescored when resumed
DRIVER_ID_LIMIT = 4_000_000  # rows whose id hashes the driver may hold (32 MB) to count duplicate ids
_CHUNK = 1 << 20

_G = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijection of uint64 that spreads neighbouring keys over all 64 bits."""
    with np.errstate(over="ignore"):
        z = x + _G
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


@functools.lru_cache(maxsize=1 << 16)
def file_hash(rel: str) -> int:
    """A stable 64-bit hash of a pool file's relative path (the same in every process)."""
    return int.from_bytes(hashlib.blake2b(rel.encode(), digest_size=8).digest(), "little")


def key_hash(rel: str, rows: np.ndarray) -> np.ndarray:
    """uint64 per (file, row) key: distinct keys of one pool map to distinct values (file hashes are
    2^40 rows apart with overwhelming odds, and `_mix` is a bijection)."""
    with np.errstate(over="ignore"):
        return _mix(np.asarray(rows, dtype=np.int64).astype(np.uint64) + np.uint64(file_hash(rel)))


def _wrap_sum(values: np.ndarray) -> int:
    return int(values.sum(dtype=np.uint64)) if len(values) else 0


def pool_checksum(files: Iterable[tuple[str, int]]) -> int:
    """The checksum of every row of a pool given its (relative path, rows) files, in bounded memory."""
    total = 0
    for rel, n in files:
        for lo in range(0, n, _CHUNK):
            total = (total + _wrap_sum(key_hash(rel, np.arange(lo, min(n, lo + _CHUNK))))) & 0xFFFFFFFFFFFFFFFF
    return total


def _runs(rows: np.ndarray) -> list[list[int]]:
    """Sorted distinct rows as [start, end) runs."""
    if not len(rows):
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(rows)]])
    return [[int(rows[a]), int(rows[b - 1]) + 1] for a, b in zip(starts, ends)]


def summarize(table: pa.Table, fingerprint: str | None) -> dict[str, Any]:
    """The summary of one part (see the module docstring)."""
    n = table.num_rows
    names = table.schema.names
    enc = table.column(S.SRC_FILE).combine_chunks().dictionary_encode()
    files = enc.dictionary.to_pylist()
    fidx = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    rows = table.column(S.SRC_ROW).to_numpy().astype(np.int64)
    checksum, runs, n_runs = 0, {}, 0
    order = np.lexsort((rows, fidx))
    fidx, rows = fidx[order], rows[order]
    bounds = np.searchsorted(fidx, np.arange(len(files) + 1))
    for i, rel in enumerate(files):
        r = rows[bounds[i]:bounds[i + 1]]
        checksum = (checksum + _wrap_sum(key_hash(rel, r))) & 0xFFFFFFFFFFFFFFFF
        if n_runs <= MAX_RUNS:
            if len(r) > 1 and (np.diff(r) == 0).any():  # a row twice in one part: never reused on resume
                n_runs = MAX_RUNS + 1
                continue
            runs[rel] = _runs(r)
            n_runs += len(runs[rel])

    def total(col: str) -> int:
        if col not in names:
            return 0
        return int(np.asarray(table.column(col).to_numpy(zero_copy_only=False), dtype=np.int64).sum())

    return {
        "v": 1,
        "fingerprint": fingerprint,
        "rows": n,
        "checksum": checksum,
        "errors": n - table.column(S.ERROR).null_count if S.ERROR in names else 0,
        "truncated": total(S.TRUNCATED),
        "tokens": total(S.N_TOKENS),
        "rendered": total(S.RENDERED),
        "runs": runs if n_runs <= MAX_RUNS else None,
    }


def with_summary(table: pa.Table, summary: Mapping[str, Any]) -> pa.Table:
    meta = dict(table.schema.metadata or {})
    meta[SUMMARY_KEY] = json.dumps(summary, separators=(",", ":")).encode()
    return table.replace_schema_metadata(meta)


def read_summary(fs: Any, path: str) -> dict[str, Any] | None:  # noqa: ANN401
    """A part's summary from its footer (None: unreadable, or written without one)."""
    import pyarrow.parquet as pq

    try:
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata.metadata or {}
        raw = meta.get(SUMMARY_KEY)
        return json.loads(raw) if raw else None
    except Exception as e:  # noqa: BLE001
        log.warning("part %s is unreadable (%s)", path, e)
        return None


def read_summaries(fs: Any, paths: list[str], threads: int = 16) -> dict[str, dict[str, Any] | None]:  # noqa: ANN401
    with ThreadPoolExecutor(max_workers=threads) as ex:
        return dict(zip(paths, ex.map(lambda p: read_summary(fs, p), paths)))


def merge_runs(summaries: Iterable[Mapping[str, Any]]) -> dict[str, np.ndarray] | None:
    """Per file, the union of the parts' runs as an (n, 2) array of sorted [start, end); None when two parts
    overlap (which the protocol never writes)."""
    per: dict[str, list[list[int]]] = {}
    for s in summaries:
        for rel, runs in (s.get("runs") or {}).items():
            per.setdefault(rel, []).extend(runs)
    out = {}
    for rel, runs in per.items():
        a = np.array(sorted(runs), dtype=np.int64).reshape(-1, 2)
        if len(a) > 1 and (a[1:, 0] < a[:-1, 1]).any():
            return None
        # coalesce touching runs
        keep = np.concatenate([[True], a[1:, 0] != a[:-1, 1]])
        starts = a[keep, 0]
        ends = a[np.concatenate([keep[1:], [True]]), 1]
        out[rel] = np.stack([starts, ends], axis=1)
    return out


@dataclass
class Tally:
    """The stage's totals, summed part by part."""

    rows: int = 0
    checksum: int = 0
    errors: int = 0
    truncated: int = 0
    tokens: int = 0
    rendered: int = 0
    parts: int = 0
    foreign: list[str] = field(default_factory=list)  # parts of another attempt (fingerprint) or without a summary

    def add(self, name: str, s: Mapping[str, Any] | None, fingerprint: str | None) -> None:
        if s is None or s.get("fingerprint") != fingerprint:
            self.foreign.append(name)
            return
        self.parts += 1
        self.rows += int(s["rows"])
        self.checksum = (self.checksum + int(s["checksum"])) & 0xFFFFFFFFFFFFFFFF
        for k in ("errors", "truncated", "tokens", "rendered"):
            setattr(self, k, getattr(self, k) + int(s.get(k, 0)))


def check(tally: Tally, pool: Any, fs: Any, parts: list[str], method: str, out_uri: str) -> None:  # noqa: ANN401
    """Raise `StageOutputError` unless every pool row is in the parts exactly once, naming what is wrong."""
    if tally.foreign:
        raise StageOutputError(
            f"{method}: {len(tally.foreign)} part(s) were not written by this attempt (another pool or config, or "
            f"no summary), e.g. {tally.foreign[0]}: not committing {out_uri}")
    expected = pool_checksum((f.rel, f.num_rows) for f in pool.files)
    if tally.rows == pool.num_rows and tally.checksum == expected:
        return
    raise StageOutputError(f"{method} wrote {tally.rows} rows for a pool of {pool.num_rows}"
                           f"{_diagnose(pool, fs, parts)}: not committing {out_uri}")


def _diagnose(pool: Any, fs: Any, parts: list[str]) -> str:  # noqa: ANN401
    """Which files have rows missing, extra or unknown: counts per file over the parts (O(files) memory)."""
    import pyarrow.parquet as pq

    counts: dict[str, int] = {}
    for p in parts:
        with fs.open_input_file(p) as f:
            pf = pq.ParquetFile(f)
            for b in pf.iter_batches(columns=[S.SRC_FILE], batch_size=65536):
                vc = b.column(0).value_counts()
                for v, c in zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist()):
                    counts[v] = counts.get(v, 0) + c
    want = {f.rel: f.num_rows for f in pool.files}
    unknown = sorted(set(counts) - set(want))
    if unknown:
        return f" (rows of {len(unknown)} file(s) not in the pool, e.g. {unknown[0]!r})"
    off = [(rel, counts.get(rel, 0), n) for rel, n in want.items() if counts.get(rel, 0) != n]
    if off:
        rel, got, n = off[0]
        return f" ({len(off)} file(s) with a wrong row count, e.g. {rel!r}: {got} of {n})"
    return " (every file has its row count, but some row is there twice and another is missing)"


def _id_hash(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Stable uint64 per id (the same in every process): integers as they are, anything else by pandas'
    fixed-key hash of its string form."""
    import pandas as pd

    if pa.types.is_integer(col.type):
        return col.to_numpy(zero_copy_only=False).astype(np.int64).astype(np.uint64)
    return pd.util.hash_array(np.asarray(col.to_pylist(), dtype=object))


def count_duplicate_ids(fs: Any, parts: list[str], rows: int, limit: int | None = None) -> tuple[int, str]:  # noqa: ANN401
    """(rows whose id another row also has, how it was counted); exact either way. At most `limit` rows
    (default `DRIVER_ID_LIMIT`): the driver holds their 64-bit hashes; more: a Ray Data job partitions the
    hashes into buckets of about a million and counts each bucket in a task. Two different ids share a
    hash with odds of about rows^2 / 2^65 (10^-4 at a billion rows): it would count one duplicate too many."""
    import pyarrow.parquet as pq

    limit = DRIVER_ID_LIMIT if limit is None else limit
    if not parts:
        return 0, "driver"
    if rows <= limit:
        hashes = []
        for p in parts:
            with fs.open_input_file(p) as f:
                hashes.append(_id_hash(pq.ParquetFile(f).read(columns=[S.ID]).column(0)))
        h = np.concatenate(hashes)
        return int(len(h) - len(np.unique(h))), "driver"
    return _distributed_duplicates(fs, parts, rows), "ray_data"


def _distributed_duplicates(fs: Any, parts: list[str], rows: int) -> int:  # noqa: ANN401
    import ray

    bits = max(1, int(np.ceil(np.log2(max(rows, 2) / 1_000_000))))

    def hashes(batch: pa.Table) -> pa.Table:
        h = _id_hash(batch.column(S.ID))
        return pa.table({"bucket": pa.array((h >> np.uint64(64 - bits)).astype(np.int64)), "h": pa.array(h)})

    def dups(group: pa.Table) -> pa.Table:
        h = group.column("h").to_numpy()
        return pa.table({"dups": [int(len(h) - len(np.unique(h)))]})

    ds = ray.data.read_parquet(parts, filesystem=fs, columns=[S.ID])
    counted = ds.map_batches(hashes, batch_format="pyarrow").groupby("bucket").map_groups(dups, batch_format="pyarrow")
    return int(counted.sum("dups") or 0)
