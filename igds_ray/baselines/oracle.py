"""The `oracle` arm: score = a label column of the pool that says what each row is worth (a world's
ground truth, e.g. the demo's `utility`: 2 useful, 1 neutral, 0 harmful), plus a seeded uniform
value in [0, 0.5) so that the top fraction keeps the most useful rows first and a seeded sample
within a label class.

It reads a column that no other arm may read: it is the ceiling that selection could reach with
perfect knowledge of the pool, and every table marks it so. It only makes sense on pools that carry
such labels (the demo world); a pool without the column is refused before compute, naming it.

A stateless Ray Data map, like `random`. The pool reader hands over the text columns only, so each
batch reads its rows' labels back from their Parquet file (`src_file`, `src_row`): one column of the
row groups the batch came from, never the whole pool.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from igds_ray import schema as S
from igds_ray.baselines.common import baseline_schema, row_errors, run_stage, scores_table, uniform01
from igds_ray.config import PoolConfig, _help
from igds_ray.errors import ConfigError, PoolError

LABEL = "label"  # the label value, kept next to the score in the scores directory


@dataclass(frozen=True)
class OracleConfig:
    pool: PoolConfig = _help("the data pool")
    out: str = _help("output scores directory (local, s3://, gs://)")
    column: str = _help("the pool's numeric label column: higher = more useful (the demo: utility)",
                        default="utility")
    seed: int = _help("seed of the sample within a label class", default=0)
    batch_size: int = _help("rows per Ray Data batch", default=8192)
    num_cpus: float = _help("CPUs per map task", default=1.0)
    overwrite: bool = _help("recompute even if the output directory holds a finished result", default=False)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.num_cpus <= 0:
            raise ConfigError("oracle: batch_size must be >= 1 and num_cpus > 0")
        if not self.column:
            raise ConfigError("oracle.column: the pool's label column")


def _labels(table: pa.Table, pool_uri: str, column: str) -> np.ndarray:
    """The label of every row of `table`, read back from its pool file by (src_file, src_row)."""
    from igds_ray.pool import list_files

    fs, files = list_files(pool_uri)
    by_rel = {rel: path for path, rel, _ in files}
    out = np.full(table.num_rows, np.nan)
    src = table.column(S.SRC_FILE).to_pylist()
    rows = table.column(S.SRC_ROW).to_numpy()
    for rel in sorted(set(src)):
        mask = np.array([s == rel for s in src])
        want = rows[mask]
        with fs.open_input_file(by_rel[rel]) as fh:
            pf = pq.ParquetFile(fh)
            if column not in pf.schema_arrow.names:
                raise PoolError(f"pool file {rel}: no label column {column!r} for the oracle arm "
                                f"(columns: {', '.join(pf.schema_arrow.names)})")
            # Only the row groups that hold this batch's rows.
            sizes = np.array([pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)])
            starts = np.concatenate([[0], np.cumsum(sizes)])
            groups = sorted(set(np.searchsorted(starts, want, side="right") - 1))
            col = pf.read_row_groups(groups, columns=[column]).column(0)
        if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_boolean(col.type)):
            raise PoolError(f"pool file {rel}: label column {column!r} must be numeric, not {col.type}")
        local = np.concatenate([np.arange(starts[g], starts[g] + sizes[g]) for g in groups])
        pos = np.searchsorted(local, want)
        values = pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)
        out[mask] = values[pos]
    return out


def check_label_column(pool_uri: str, column: str) -> None:
    """Refuse, before any compute, a pool whose files lack a numeric `column` (O(files) footer reads)."""
    from igds_ray.pool import list_files

    fs, files = list_files(pool_uri)
    for path, rel, _ in files:
        with fs.open_input_file(path) as fh:
            schema = pq.ParquetFile(fh).schema_arrow
        if column not in schema.names:
            raise PoolError(f"pool file {rel}: no label column {column!r} for the oracle arm "
                            f"(columns: {', '.join(schema.names)}); set baselines.oracle.column")
        t = schema.field(column).type
        if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
            raise PoolError(f"pool file {rel}: label column {column!r} must be numeric, not {t}")


def score_batch(table: pa.Table, seed: int, text_columns: list[str], pool_uri: str, column: str) -> pa.Table:
    errors = row_errors(table, text_columns)
    labels = _labels(table, pool_uri, column)
    u = uniform01(seed, table.column(S.ID).to_pylist())
    score, label = [], []
    for i, e in enumerate(errors):
        lab = labels[i]
        if e is None and np.isnan(lab):
            errors[i] = e = f"label column {column!r} is null"
        label.append(None if np.isnan(lab) else float(lab))
        score.append(None if e is not None else float(lab + 0.5 * u[i]))
    schema = baseline_schema(table.schema.field(S.ID).type, [pa.field(LABEL, pa.float64())])
    return scores_table(table, schema, score, errors, extra={LABEL: label})


def run(cfg: OracleConfig) -> dict[str, Any]:
    """Write `cfg.out`: one row per pool row, `score` = label + a seeded value in [0, 0.5)."""
    check_label_column(cfg.pool.path, cfg.column)

    def build(ds, pool):  # noqa: ANN001, ANN202
        return ds.map_batches(
            score_batch,
            fn_kwargs={"seed": cfg.seed, "text_columns": list(pool.text_columns), "pool_uri": pool.uri,
                       "column": cfg.column},
            batch_size=cfg.batch_size,
            batch_format="pyarrow",
            num_cpus=cfg.num_cpus,
        )

    return run_stage("oracle", cfg, cfg.pool, cfg.out, cfg.overwrite, build)


__all__ = ["OracleConfig", "run", "score_batch"]
