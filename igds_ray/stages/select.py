"""Keep the top fraction (or top n) of a scored pool, exactly and deterministically.

Order: score descending; equal scores by a seeded hash of the id (`tie_seed`), so that which rows of
a tie block at the cutoff are kept is a seeded draw, not the lowest ids or the first files; then by
id and source position (`src_file`, `src_row`), so that even rows sharing an id are ranked the same
way on every run. Rows with an `error` have no score and are never selected. The pool is never
collected on the driver: Ray Data sorts the (id, score, tie key, src) columns in a distributed sort,
the chosen rows are fetched back from the pool file by file, and the facts about zeros and ties are
counted per block by tasks (the driver adds up one small tuple per block). A small scores directory
(`local_max_rows`, 200k rows by default) is ranked in this process instead, with the same order and
the same output: a Ray Data job costs 10-25 s of start-up, which dominates a small selection.

Output `<out>/<arm>.parquet/` (a Parquet dataset directory with `_SUCCESS`): `id`, `score`,
`rank` (0 = best), `src_file`, `src_row`, and, with `write_rows`, the pool's text columns. The
manifest adds `zero_rows`/`zero_share` (rows scoring exactly 0, of the rows with a score), `cutoff`
(the last kept row's score, id, rank) and `tie_block` (`rows`: rows scoring exactly the cutoff score,
`kept`: how many of them were kept).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from igds_ray import schema as S
from igds_ray.config import SelectConfig, to_dict
from igds_ray.errors import ConfigError
from igds_ray.pool import as_text
from igds_ray.storage import StageDir, filesystem, join, path_in

log = logging.getLogger(__name__)

TIE = "_tie"  # internal sort key: a seeded hash of the id, dropped before the output is written


def tie_keys(seed: int, ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """int64 per id: blake2b of the id keyed by the seed, 63 bits kept. The key differs from the
    random baseline's (`uniform01`), so with equal seeds its draw and the tie order are unrelated.
    Integer and string ids hash differently (`1` vs `"1"`), as there."""
    key = b"igds-select-tie:" + int(seed).to_bytes(16, "little", signed=True)
    tag = b"i:" if pa.types.is_integer(ids.type) else b"s:"
    out = np.empty(len(ids), dtype=np.int64)
    for i, v in enumerate(ids.to_pylist()):
        d = hashlib.blake2b(tag + str(v).encode(), digest_size=8, key=key).digest()
        out[i] = int.from_bytes(d, "little") >> 1
    return out


def keep_count(n_scored: int, fraction: float | None, n: int | None) -> int:
    """How many rows a selection keeps: `n`, else floor(fraction × scored rows) (at least 1 if any)."""
    if n is not None:
        if n > n_scored:
            raise ConfigError(f"n={n} but only {n_scored} rows have a score")
        return n
    assert fraction is not None
    return min(n_scored, max(1 if n_scored else 0, math.floor(fraction * n_scored + 1e-9)))


def _fetch_rows(group: pa.Table, pool_uri: str, text_columns: list[str], fs: "pafs.FileSystem | None" = None
                ) -> pa.Table:
    """The pool rows of one source file named in `group` (all its rows share `src_file`).

    `fs`: the pool's filesystem as the driver resolved it (an S3 endpoint override travels with it).
    """
    import pyarrow.parquet as pq

    rel = group.column(S.SRC_FILE)[0].as_py()
    if fs is None:
        fs, root = filesystem(pool_uri)
    else:  # no second resolution on the worker (for s3:// it may ask the network for the region)
        root = path_in(pool_uri)
    path = root if fs.get_file_info(root).type.name == "File" else f"{root.rstrip('/')}/{rel}"
    with fs.open_input_file(path) as fh:
        table = pq.ParquetFile(fh).read(columns=text_columns)
    rows = group.column(S.SRC_ROW)
    picked = table.take(rows)
    out = group
    for name in text_columns:
        # The reader's normalisation: every file's text becomes large_string, whatever it was stored as
        # (string, binary, dictionary), so the blocks of different files concatenate.
        values, _ = as_text(picked.column(name), name)
        out = out.append_column(name, pa.array(values, pa.large_string()))
    return out


def _scored_only(t: pa.Table, column: str, max_score: float | None, tie_seed: int) -> pa.Table:
    """Rows with a finite score (at most `max_score`), the ranking column renamed to `score`, and
    their tie key."""
    if column != S.SCORE:
        t = t.rename_columns([S.SCORE if c == column else c for c in t.column_names])
    col = t.column(S.SCORE)
    keep = pc.and_(pc.is_valid(col), pc.is_finite(col))
    if max_score is not None:
        keep = pc.and_(keep, pc.less_equal(col, max_score))
    t = t.filter(keep)
    return t.append_column(TIE, pa.array(tie_keys(tie_seed, t.column(S.ID)), pa.int64()))


def _remote(fn):  # noqa: ANN001, ANN202
    import ray

    return ray.remote(num_cpus=0.25)(fn)


@_remote
def _num_rows(t: pa.Table) -> int:
    return t.num_rows


@_remote
def _add_rank(t: pa.Table, start: int) -> pa.Table:
    t = t.drop_columns([TIE])
    return t.append_column(S.RANK, pa.array(np.arange(start, start + t.num_rows, dtype=np.int64)))


@_remote
def _count_equal(t: pa.Table, values: list[float]) -> list[int]:
    """Rows of one block whose score equals each of `values` (exactly)."""
    col = t.column(S.SCORE)
    return [int(pc.sum(pc.equal(col, v)).as_py() or 0) for v in values]


def _count_blocks(refs: list[Any], values: list[float]) -> list[int]:
    """`_count_equal` over blocks, added up: one small list per block reaches the driver."""
    import ray

    per_block = ray.get([_count_equal.remote(r, values) for r in refs])
    return [int(sum(c[j] for c in per_block)) for j in range(len(values))]


@_remote
def _last_row(t: pa.Table) -> dict:
    return t.slice(t.num_rows - 1, 1).to_pylist()[0]


def run(cfg: SelectConfig) -> dict[str, Any]:
    """Write `<out>/<arm>.parquet/`; a finished one is kept unless `overwrite`. The output directory
    is locked while it is written (a second run on it fails at once with `RunLocked`)."""
    from igds_ray.preflight import reachable

    reachable("scores", cfg.scores)
    reachable("out", cfg.out)
    scores = StageDir(cfg.scores)
    smanifest = scores.manifest()
    out = StageDir(join(cfg.out, f"{cfg.arm}.parquet"))
    if out.done() and not cfg.overwrite:
        log.info("%s is finished; skipping", out.uri)
        return out.manifest()
    out.check_ours()  # before the lock file is created in someone else's directory
    with out.lock(f"select {cfg.arm}") as held:
        staging = out.begin(cfg.overwrite)
        if staging is None:
            return out.manifest()
        rows = smanifest.get("rows")
        if isinstance(rows, int) and rows <= cfg.local_max_rows:
            return _select_local(cfg, scores, smanifest, out, staging, held)
        return _select(cfg, scores, smanifest, out, staging, held)


SORT_KEYS = [(S.SCORE, "descending"), (TIE, "ascending"), (S.ID, "ascending"), (S.SRC_FILE, "ascending"),
             (S.SRC_ROW, "ascending")]


def _manifest(cfg: SelectConfig, smanifest: dict[str, Any], n_scored: int, n_keep: int, n_zero: int,
              cutoff: dict | None, tie_block: dict | None, t0: float, ranked_in: str) -> dict[str, Any]:
    return {
        "stage": "select",
        "config": to_dict(cfg),
        "scores": cfg.scores,
        "rows_scored": n_scored,
        "rows_in_scores": smanifest.get("rows"),
        "rows": n_keep,
        "zero_rows": n_zero,
        "zero_share": n_zero / n_scored if n_scored else None,
        "cutoff": cutoff,
        "tie_block": tie_block,
        "ranked_in": ranked_in,
        "wall_s": round(time.time() - t0, 3),
    }


def _select_local(cfg: SelectConfig, scores: StageDir, smanifest: dict[str, Any], out: StageDir, staging: str,
                  held: Any) -> dict[str, Any]:
    """`_select` in this process: the same order (SORT_KEYS), counts and output, for a small scores directory."""
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    t0 = time.time()
    files = [f.split("://", 1)[-1] if "://" in f else f for f in scores.files()]
    table = pads.dataset(files, format="parquet", filesystem=scores.fs).to_table(
        columns=[S.ID, cfg.score_column, S.SRC_FILE, S.SRC_ROW])
    scored = _scored_only(table, cfg.score_column, cfg.max_score, cfg.tie_seed)
    n_scored = scored.num_rows
    n_keep = keep_count(n_scored, cfg.fraction, cfg.n)
    col = scored.column(S.SCORE)
    n_zero = int(pc.sum(pc.equal(col, 0.0)).as_py() or 0)
    cutoff = tie_block = None
    top = scored.take(pc.sort_indices(scored, sort_keys=SORT_KEYS)[:n_keep]).drop_columns([TIE])
    top = top.append_column(S.RANK, pa.array(np.arange(n_keep, dtype=np.int64)))
    if n_keep:
        last = top.slice(n_keep - 1, 1).to_pylist()[0]
        cutoff = {"score": last[S.SCORE], "id": last[S.ID], "rank": last[S.RANK]}
        v = float(last[S.SCORE])
        tie_block = {"rows": int(pc.sum(pc.equal(col, v)).as_py() or 0),
                     "kept": int(pc.sum(pc.equal(top.column(S.SCORE), v)).as_py() or 0)}
    if cfg.write_rows and n_keep:
        pool_cfg = smanifest["pool"]
        fs = filesystem(pool_cfg["uri"])[0]
        parts = []
        for rel in pc.unique(top.column(S.SRC_FILE)).to_pylist():
            group = top.filter(pc.equal(top.column(S.SRC_FILE), rel))
            parts.append(_fetch_rows(group, pool_cfg["uri"], pool_cfg["text_columns"], fs))
        top = pa.concat_tables(parts)
        top = top.take(pc.sort_indices(top, sort_keys=[(S.RANK, "ascending")]))
    where = path_in(staging)
    out.fs.create_dir(where, recursive=True)
    pq.write_table(top, f"{where}/part-00000.parquet", filesystem=out.fs)
    held.check()
    return out.commit(staging, _manifest(cfg, smanifest, n_scored, n_keep, n_zero, cutoff, tie_block, t0, "local"))


def _select(cfg: SelectConfig, scores: StageDir, smanifest: dict[str, Any], out: StageDir, staging: str,
            held: Any) -> dict[str, Any]:
    import ray

    from igds_ray.stages.score import init_ray

    init_ray()
    t0 = time.time()
    ds = ray.data.read_parquet(
        [f.split("://", 1)[-1] if "://" in f else f for f in scores.files()],
        columns=[S.ID, cfg.score_column, S.SRC_FILE, S.SRC_ROW],
        filesystem=scores.fs,
    )
    # `limit` after `sort` must see the sorted blocks in order, or the top-n would not be exact. The
    # dataset's own context (a copy of the global one, shared by the datasets derived from it) is
    # set, never Ray's global DataContext.
    ds.context.execution_options.preserve_order = True
    scored = ds.map_batches(_scored_only, fn_kwargs={"column": cfg.score_column, "max_score": cfg.max_score,
                                                     "tie_seed": cfg.tie_seed},
                            batch_format="pyarrow", batch_size=None).materialize()
    n_scored = scored.count()
    n_keep = keep_count(n_scored, cfg.fraction, cfg.n)
    cutoff = tie_block = None
    ranked = scored.limit(0).drop_columns([TIE])
    if n_keep:
        top = scored.sort([k for k, _ in SORT_KEYS], descending=[d == "descending" for _, d in SORT_KEYS]
                          ).limit(n_keep).materialize()
        refs = top.to_arrow_refs()
        sizes = ray.get([_num_rows.remote(r) for r in refs])
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64).tolist()
        ranked_refs = [_add_rank.remote(r, st) for r, st in zip(refs, starts)]
        last = ray.get(_last_row.remote(ranked_refs[max(i for i, n in enumerate(sizes) if n)]))
        cutoff = {"score": last[S.SCORE], "id": last[S.ID], "rank": last[S.RANK]}
        ranked = ray.data.from_arrow_refs(ranked_refs)
        n_zero, tie_rows = _count_blocks(scored.to_arrow_refs(), [0.0, float(last[S.SCORE])])
        (tie_kept,) = _count_blocks(refs, [float(last[S.SCORE])])
        tie_block = {"rows": tie_rows, "kept": tie_kept}
    else:
        (n_zero,) = _count_blocks(scored.to_arrow_refs(), [0.0])
    if cfg.write_rows and n_keep:
        pool_cfg = smanifest["pool"]
        # One group per pool file: each file is opened once, however its rows rank.
        n_files = max(1, min(len(pool_cfg["files"]), 256))
        ranked = ranked.groupby(S.SRC_FILE, num_partitions=n_files).map_groups(
            _fetch_rows,
            fn_kwargs={"pool_uri": pool_cfg["uri"], "text_columns": pool_cfg["text_columns"],
                       "fs": filesystem(pool_cfg["uri"])[0]},
            batch_format="pyarrow",
        )
    ranked.write_parquet(staging, filesystem=out.fs if "://" in out.uri else None)
    held.check()
    return out.commit(staging, _manifest(cfg, smanifest, n_scored, n_keep, n_zero, cutoff, tie_block, t0, "ray"))
