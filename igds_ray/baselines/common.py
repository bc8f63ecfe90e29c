"""What every baseline scorer shares: the scores layout, row errors, the seeded hash and `run_stage`.

A baseline writes a scores directory exactly like `igds score` (one Parquet part per write task,
`_SUCCESS` manifest last, one row per pool row, `error` set instead of dropping a row), less the
`acts` column and plus its own columns (e.g. `loss`, `ifd`), so `igds_ray.stages.select.run` picks
from it unchanged with `score_column=` / `max_score=`.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from igds_ray import schema as S

# Baseline columns live in igds_ray.schema with every other column name; re-exported for the scorers.
from igds_ray.schema import IFD, LOSS, UNCOND_LOSS, ZIP_POS, ZIP_RATIO, ZIP_SHARD  # noqa: F401

log = logging.getLogger(__name__)


def baseline_schema(id_type: pa.DataType, extra: Sequence[pa.Field] = ()) -> pa.Schema:
    """`scores_schema` without `acts`, plus a baseline's own columns (appended after `score`)."""
    base = [f for f in S.scores_schema(id_type) if f.name != S.ACTS]
    at = [f.name for f in base].index(S.SCORE) + 1
    return pa.schema(base[:at] + list(extra) + base[at:])


def row_errors(table: pa.Table, text_columns: Sequence[str]) -> list[str | None]:
    """Why each row cannot be scored: the reader's `_input_error`, else an empty or blank text column.

    The same rule for every baseline (and for `igds score` with max/mean pooling), so that all arms
    choose from the same set of usable rows.
    """
    errors: list[str | None] = table.column(S.INPUT_ERROR).to_pylist()
    for name in text_columns:
        values = table.column(name).to_pylist()
        for i, v in enumerate(values):
            if errors[i] is None and not v.strip():
                errors[i] = f"{name} is empty or whitespace only"
    return errors


def uniform01(seed: int, ids: Sequence[Any]) -> np.ndarray:
    """A deterministic uniform value in [0, 1) per (seed, id): blake2b keyed by the seed, 53 bits kept.

    Integer and string ids hash differently (`1` vs `"1"`), and the value depends on nothing else
    (not on file layout, batch boundaries or worker), so a rerun or another cluster gets the same.
    """
    key = int(seed).to_bytes(16, "little", signed=True)
    out = np.empty(len(ids), dtype=np.float64)
    for i, v in enumerate(ids):
        tag = b"i:" if isinstance(v, int) else b"s:"
        d = hashlib.blake2b(tag + str(v).encode(), digest_size=8, key=key).digest()
        out[i] = (int.from_bytes(d, "little") >> 11) * (1.0 / (1 << 53))
    return out


def scores_table(
    table: pa.Table,
    schema: pa.Schema,
    score: Sequence[float | None],
    errors: Sequence[str | None],
    n_tokens: Sequence[int] | None = None,
    truncated: Sequence[bool] | None = None,
    extra: dict[str, Sequence[Any]] | None = None,
) -> pa.Table:
    """One output part for the pool rows in `table` (same order), in `schema`."""
    n = table.num_rows
    cols: dict[str, Any] = {
        S.ID: table.column(S.ID),
        S.SCORE: pa.array(score, pa.float64()),
        S.N_TOKENS: pa.array(n_tokens if n_tokens is not None else [0] * n, pa.int32()),
        S.TRUNCATED: pa.array(truncated if truncated is not None else [False] * n, pa.bool_()),
        S.ERROR: pa.array(errors, pa.string()),
        S.SRC_FILE: table.column(S.SRC_FILE),
        S.SRC_ROW: table.column(S.SRC_ROW),
    }
    for name, values in (extra or {}).items():
        cols[name] = pa.array(values, schema.field(name).type)
    return pa.table({f.name: cols[f.name] for f in schema}, schema=schema)


from igds_ray.stages.score import run_stage  # noqa: E402,F401  (re-exported: baselines use it)
