"""A few pool rows, read without reading the pool: rows named by (file, row), one file's row groups at a time,
and a seeded sample of about n rows (feature cards, `igds inspect`)."""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import pyarrow as pa

NO_LABEL = "(no label)"


def read_rows(pf: Any, rows: list[int], columns: list[str]) -> pa.Table:
    """Rows `rows` (sorted file row indices) of a ParquetFile, reading only the row groups that hold them."""
    md = pf.metadata
    starts = np.cumsum([0] + [md.row_group(i).num_rows for i in range(md.num_row_groups)])
    groups = sorted({int(np.searchsorted(starts, r, side="right") - 1) for r in rows})
    t = pf.read_row_groups(groups, columns=columns)
    offset = {g: int(sum(md.row_group(h).num_rows for h in groups if h < g)) for g in groups}
    take = [offset[int(np.searchsorted(starts, r, side="right") - 1)] + r -
            int(starts[int(np.searchsorted(starts, r, side="right") - 1)]) for r in rows]
    return t.take(pa.array(take, pa.int64()))


def pool_rows_at(pool: Any, wanted: set[tuple[str, int]]) -> dict[tuple[str, int], tuple[str, str]]:
    """(prompt, response) of the pool rows named by (src_file, src_row), one file's row groups at a time."""
    import pyarrow.parquet as pq

    from igds_ray.pool import list_files

    fs, files = list_files(pool.path)
    paths = {rel: path for path, rel, _ in files}
    by_file: dict[str, list[int]] = {}
    for rel, row in wanted:
        by_file.setdefault(rel, []).append(row)
    out = {}
    for rel, rows in by_file.items():
        if rel not in paths:
            continue
        rows = sorted(set(rows))
        with fs.open_input_file(paths[rel]) as f:
            pf = pq.ParquetFile(f)
            rows = [r for r in rows if 0 <= r < pf.metadata.num_rows]
            t = read_rows(pf, rows, [pool.prompt_column, pool.response_column]) if rows else None
        if t is not None:
            for r, p, s in zip(rows, t.column(0).to_pylist(), t.column(1).to_pylist()):
                out[(rel, r)] = (p or "", s or "")
    return out


def sample_pool(pool: Any, n: int, seed: int, label_column: str | None) -> list[dict]:
    """A seeded sample of about `n` pool rows: files in a seeded order, at most n/16 random rows from each."""
    import pyarrow.parquet as pq

    from igds_ray.pool import list_files

    fs, files = list_files(pool.path)
    rng = random.Random(seed)
    order = list(files)
    rng.shuffle(order)
    per = max(1, math.ceil(n / min(len(order), 16)))
    out: list[dict] = []
    for path, rel, _ in order:
        if len(out) >= n:
            break
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            m = pf.metadata.num_rows
            names = set(pf.schema_arrow.names)
            if not m or pool.prompt_column not in names or pool.response_column not in names:
                continue
            rows = sorted(rng.sample(range(m), min(per, m, n - len(out))))
            extra = [c for c in (pool.id_column, label_column) if c and c in names]
            t = read_rows(pf, rows, [pool.prompt_column, pool.response_column, *extra])
        cols = {c: t.column(c).to_pylist() for c in t.column_names}
        for j, r in enumerate(rows):
            lab = cols[label_column][j] if label_column and label_column in cols else None
            out.append({"prompt": cols[pool.prompt_column][j] or "", "response": cols[pool.response_column][j] or "",
                        "id": cols[pool.id_column][j] if pool.id_column in cols else f"{rel}:{r}",
                        "src_file": rel, "src_row": r, "label": NO_LABEL if lab is None else str(lab)})
    return out
