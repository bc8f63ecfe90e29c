"""The `zip` baseline: ZIP, the greedy compression-ratio selection of the Entropy Law (Yin et al., 2024,
"Entropy Law: The Story Behind Data Compression and LLM Performance").

ZIP prefers a selected set that compresses badly (low redundancy, high information density). A row's
compression ratio is raw bytes / deflated bytes of its text (`prompt + separator + response`, or the
`text` column). Every row starts with its own ratio as its current value π. Each step:

1. take the K1 remaining rows with the lowest π;
2. for each, compute the ratio of (selected set + row) and make that its new π;
3. add the K2 with the lowest new π to the selected set (in that order); the other K1 - K2 go back.

The paper follows step 3 with a fine-grained pass that picks K3 of the K2 one at a time; here the K2
are taken in one go (K3 = K2), as most reimplementations do. A row's greedy position becomes its
score, so the common top-fraction selection takes the first picks.

What is approximated, so that it scales (both are exact on a pool of one shard of short rows):

- **Compressing "selected set + x".** Recompressing the whole selected set for every candidate costs
  O(|S|) per evaluation, O(n² ·K1/K2) overall. Deflate only ever looks 32 KiB back, so the size of
  (S + x) is taken as C(S) + C(x | zdict), where C(x | zdict) is the raw-deflate size of x with the
  last `window` (≤ 32 KiB) bytes of S as zlib's preset dictionary, and C(S) is the running sum of those
  increments (each recomputed once when a row is added, with the set as it is then). The matches
  found are the ones zlib itself would find at the end of S; what differs is that each piece is
  coded as its own deflate block (its own Huffman codes, flushed to a byte), so C(S) overestimates a
  single stream by roughly 10-25 bytes per row: +25% on the 40-byte rows of the tests, about +6% on
  700-byte rows. The bias is the same for every candidate of a step, so it mostly rescales the
  ratios. (The exact alternative, a never-flushed compressor over S copied per candidate, measured
  about 4x slower per evaluation.) Raw deflate (no zlib header/trailer) is used throughout so a fixed
  6-byte overhead does not favour long rows.
- **Sharding.** One greedy sequence is inherently serial. The pool is split into S = ceil(rows /
  shard_rows) shards by a seeded hash of the id, and each shard is ordered greedily by its own Ray
  task, in parallel. A row's score is 1 - position / (scorable rows in its shard), so a top fraction
  f takes about the first f of every shard. Redundancy *across* shards is not seen: two copies of a
  text in different shards can both be picked early.

Cost per row: 1 compression for its own ratio, about K1/K2 evaluations with a dictionary (one per
step it is among the K1 lowest; a row leaves the candidate window only by being picked, so the
average is ≈ K1/K2, fewer near the end of a shard), 1 more when it is added, plus one dictionary
setup (≈32 KiB hashed) per step shared by its K1 candidates; each compression is O(|x|) after a
state copy. Total ≈ rows × (2 + K1/K2) compressions, spread over shards; memory per task is one
shard's texts. Rows that cannot be used (null/blank text) get `error` and no position.
"""

from __future__ import annotations

import heapq
import math
import zlib
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from igds_ray import schema as S
from igds_ray.baselines.common import (
    ZIP_POS,
    ZIP_RATIO,
    ZIP_SHARD,
    baseline_schema,
    row_errors,
    run_stage,
    scores_table,
    uniform01,
)
from igds_ray.config import PoolConfig, _help
from igds_ray.errors import ConfigError

WINDOW_MAX = 32 * 1024  # deflate's window: bytes further back can never be referenced
ZIP_FIELDS = (pa.field(ZIP_POS, pa.int64()), pa.field(ZIP_RATIO, pa.float64()), pa.field(ZIP_SHARD, pa.int32()))
_TEXT, _ERR, _SHARD = "_zip_text", "_zip_error", "_zip_shard"


@dataclass(frozen=True)
class ZipConfig:
    pool: PoolConfig = _help("the data pool")
    out: str = _help("output scores directory (local, s3://, gs://)")
    k1: int = _help("candidates re-evaluated per greedy step (the lowest current ratios)", default=1000)
    k2: int = _help("rows added per greedy step (the best of the K1)", default=50)
    shard_rows: int = _help("rows per greedy shard (one Ray task each; the greedy order is per shard)",
                            default=20000)
    seed: int = _help("seed of the id hash that assigns rows to shards", default=0)
    separator: str = _help("text of a row: prompt + separator + response (ignored with pool.text_column)",
                           default="\n")
    level: int = _help("zlib compression level (0-9; -1 = zlib's default, 6)", default=6)
    window: int = _help("bytes of the selected set used as zlib's preset dictionary (at most 32768)",
                        default=WINDOW_MAX)
    batch_size: int = _help("rows per Ray Data batch when preparing texts", default=8192)
    shuffle: Literal["sort_shuffle_pull_based", "sort_shuffle_push_based", "hash_shuffle", "shuffle_v2"] = _help(
        "Ray Data shuffle that gathers each shard (sort pull-based: least fixed overhead; hash/v2: very large pools)",
        default="sort_shuffle_pull_based",
    )
    num_cpus: float = _help("CPUs per shard task", default=1.0)
    overwrite: bool = _help("recompute even if the output directory holds a finished result", default=False)

    def __post_init__(self) -> None:
        for key in ("k1", "k2", "shard_rows", "window", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.k2 > self.k1:
            raise ConfigError(f"k2 ({self.k2}) must be <= k1 ({self.k1})")
        if self.window > WINDOW_MAX:
            raise ConfigError(f"window must be <= {WINDOW_MAX} (deflate cannot look further back), got {self.window}")
        if not -1 <= self.level <= 9:
            raise ConfigError(f"level must be in -1..9, got {self.level}")
        if self.num_cpus <= 0:
            raise ConfigError(f"num_cpus must be > 0, got {self.num_cpus}")


# ---------------------------------------------------------------------------------------------
# the greedy order (pure)


def _compressor(level: int, zdict: bytes) -> Any:
    if zdict:
        return zlib.compressobj(level, zlib.DEFLATED, -15, zdict=zdict)
    return zlib.compressobj(level, zlib.DEFLATED, -15)


def deflate_size(data: bytes, level: int = 6, zdict: bytes = b"") -> int:
    """Raw-deflate size of `data`, with `zdict` (its last 32 KiB) as the preset dictionary."""
    c = _compressor(level, zdict)
    return len(c.compress(data)) + len(c.flush())


def zip_order(
    texts: Sequence[bytes], k1: int, k2: int, level: int = 6, window: int = WINDOW_MAX
) -> tuple[list[int], list[float]]:
    """ZIP's greedy order of `texts`: (indices in the order picked, ratio of (set + row) at each pick).

    Ties (equal ratios, e.g. exact duplicates) go to the lower index.
    """
    heap = [(len(x) / max(1, deflate_size(x, level)), i) for i, x in enumerate(texts)]
    heapq.heapify(heap)
    raw = comp = 0  # size of the selected set, raw and (approximately) compressed
    tail = b""  # its last `window` bytes: the dictionary
    order: list[int] = []
    ratios: list[float] = []
    while heap:
        cand = [heapq.heappop(heap)[1] for _ in range(min(k1, len(heap)))]
        base = _compressor(level, tail)  # the dictionary is hashed once per step, then copied
        evaluated = []
        for i in cand:
            c = base.copy()
            cx = len(c.compress(texts[i])) + len(c.flush())
            evaluated.append(((raw + len(texts[i])) / max(1, comp + cx), i))
        evaluated.sort()
        for r, i in evaluated[k2:]:
            heapq.heappush(heap, (r, i))
        for r, i in evaluated[:k2]:
            x = texts[i]
            comp += deflate_size(x, level, tail)  # with the rows added earlier in this step
            raw += len(x)
            tail = (tail + x)[-window:]
            order.append(i)
            ratios.append(r)
    return order, ratios


# ---------------------------------------------------------------------------------------------
# Ray Data steps


def prepare_batch(table: pa.Table, text_columns: list[str], separator: str, seed: int, n_shards: int) -> pa.Table:
    """Per row: its text (UTF-8 bytes), why it cannot be used, and its shard."""
    errors = row_errors(table, text_columns)
    cols = [table.column(c).to_pylist() for c in text_columns]
    texts = [None if e is not None else separator.join(v[i] for v in cols).encode("utf-8")
             for i, e in enumerate(errors)]
    shard = (uniform01(seed, table.column(S.ID).to_pylist()) * n_shards).astype("int64").clip(0, n_shards - 1)
    return pa.table({
        S.ID: table.column(S.ID), S.SRC_FILE: table.column(S.SRC_FILE), S.SRC_ROW: table.column(S.SRC_ROW),
        _TEXT: pa.array(texts, pa.large_binary()), _ERR: pa.array(errors, pa.string()),
        _SHARD: pa.array(shard, pa.int64()),
    })


def order_shard(table: pa.Table, k1: int, k2: int, level: int, window: int) -> pa.Table:
    """Score one shard: 1 - greedy position / scorable rows (first pick: 1.0)."""
    # Input order after the shuffle is not deterministic; pool order is.
    table = table.sort_by([(S.SRC_FILE, "ascending"), (S.SRC_ROW, "ascending")])
    n = table.num_rows
    errors = table.column(_ERR).to_pylist()
    texts = table.column(_TEXT).to_pylist()
    valid = [i for i in range(n) if errors[i] is None]
    order, ratios = zip_order([texts[i] for i in valid], k1, k2, level, window)
    score: list[float | None] = [None] * n
    pos: list[int | None] = [None] * n
    ratio: list[float | None] = [None] * n
    for p, (j, r) in enumerate(zip(order, ratios)):
        i = valid[j]
        score[i], pos[i], ratio[i] = 1.0 - p / len(valid), p, r
    shard = pc.cast(table.column(_SHARD), pa.int32()).to_pylist()
    schema = baseline_schema(table.schema.field(S.ID).type, ZIP_FIELDS)
    return scores_table(table, schema, score, errors, extra={ZIP_POS: pos, ZIP_RATIO: ratio, ZIP_SHARD: shard})


def n_shards(n_rows: int, shard_rows: int) -> int:
    return max(1, math.ceil(n_rows / shard_rows))


def run(cfg: ZipConfig) -> dict[str, Any]:
    """Write `cfg.out`: `score` = 1 - greedy position in the row's shard, plus `zip_pos`, `zip_ratio`,
    `zip_shard`. Returns the manifest."""

    def build(ds, pool):  # noqa: ANN001, ANN202
        from ray.data.context import ShuffleStrategy

        shards = n_shards(pool.num_rows, cfg.shard_rows)
        # This dataset's own context: the global default (and other stages) stay as they are.
        ds.context.shuffle_strategy = ShuffleStrategy(cfg.shuffle)
        ds = ds.map_batches(
            prepare_batch,
            fn_kwargs={"text_columns": list(pool.text_columns), "separator": cfg.separator, "seed": cfg.seed,
                       "n_shards": shards},
            batch_size=cfg.batch_size,
            batch_format="pyarrow",
        )
        return ds.groupby(_SHARD, num_partitions=min(shards, 1024)).map_groups(
            order_shard,
            fn_kwargs={"k1": cfg.k1, "k2": cfg.k2, "level": cfg.level, "window": cfg.window},
            batch_format="pyarrow",
            num_cpus=cfg.num_cpus,
        )

    return run_stage("zip", cfg, cfg.pool, cfg.out, cfg.overwrite, build)
