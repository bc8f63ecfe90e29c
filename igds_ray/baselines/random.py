"""The `random` baseline: score = a uniform value from (seed, id), so the top fraction is a seeded
uniform sample of the usable rows.

A stateless Ray Data map (tasks, no actors, no model). The value is a keyed hash of the id, not a
random stream, so it does not depend on file layout, batch boundaries or workers: the same seed
selects the same rows on any cluster, another seed an independent sample. Rows that no arm can
train on (null, non-string or blank prompt/response) get `error`, as in every other arm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from igds_ray import schema as S
from igds_ray.baselines.common import baseline_schema, row_errors, run_stage, scores_table, uniform01
from igds_ray.config import PoolConfig, _help
from igds_ray.errors import ConfigError


@dataclass(frozen=True)
class RandomConfig:
    pool: PoolConfig = _help("the data pool")
    out: str = _help("output scores directory (local, s3://, gs://)")
    seed: int = _help("the sample's seed: same seed, same rows", default=0)
    batch_size: int = _help("rows per Ray Data batch", default=8192)
    num_cpus: float = _help("CPUs per map task", default=1.0)
    overwrite: bool = _help("recompute even if the output directory holds a finished result", default=False)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_cpus <= 0:
            raise ConfigError(f"num_cpus must be > 0, got {self.num_cpus}")


def score_batch(table: pa.Table, seed: int, text_columns: list[str]) -> pa.Table:
    errors = row_errors(table, text_columns)
    u = uniform01(seed, table.column(S.ID).to_pylist())
    score = [None if e is not None else float(x) for x, e in zip(u, errors)]
    return scores_table(table, baseline_schema(table.schema.field(S.ID).type), score, errors)


def run(cfg: RandomConfig) -> dict[str, Any]:
    """Write `cfg.out`: one row per pool row, `score` uniform in [0, 1). Returns the manifest."""

    def build(ds, pool):  # noqa: ANN001, ANN202
        return ds.map_batches(
            score_batch,
            fn_kwargs={"seed": cfg.seed, "text_columns": list(pool.text_columns)},
            batch_size=cfg.batch_size,
            batch_format="pyarrow",
            num_cpus=cfg.num_cpus,
        )

    return run_stage("random", cfg, cfg.pool, cfg.out, cfg.overwrite, build)


__all__ = ["RandomConfig", "run", "score_batch"]
