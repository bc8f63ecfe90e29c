"""Keep the top fraction (or top n) of a scored pool, exactly and deterministically.

Order: score descending; equal scores by a seeded hash of the id (`tie_seed`), so that which rows of
a tie block at the cutoff are kept is a seeded draw, not the lowest ids or the first files; then by
id and source position (`src_file`, `src_row`), so that even rows sharing an id are ranked the same
way on every run. Rows with an `error` have no score and are never selected. The pool is never
collected on the driver, and the scored rows are never sorted as a whole: histogram passes over the
score's order key (then, inside a single score, over the tie key) narrow the range that holds the
cutoff row until at most `BOUNDARY_ROWS` rows remain, which are fetched and sorted to find it exactly
(the driver adds up one histogram per block, a chunk of blocks at a time); each block then keeps the
rows up to that cutoff as a stream, and only the kept rows are sorted (Ray Data) to number their ranks.
The chosen rows are fetched back from the pool file by file. A small scores directory
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
        "scores_version": int(smanifest.get("version", 1)),  # a grown scores directory: the version ranked
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


# ---------------------------------------------------------------------------------------------
# the distributed path: the exact cutoff from histograms, a filter, a sort of the kept rows only

BINS = 4096  # histogram bins per refinement pass
BOUNDARY_ROWS = 1_000_000  # rows of the boundary range the driver may fetch and sort (bounded memory)


def order_key(score: np.ndarray) -> np.ndarray:
    """uint64 per finite score, ascending in the selection's order (higher scores first; 0.0 and -0.0 equal)."""
    bits = (np.asarray(score, np.float64) + 0.0).view(np.uint64)  # + 0.0: -0.0 becomes 0.0
    up = np.where(bits >> np.uint64(63) == 1, ~bits, bits | np.uint64(1 << 63))  # ascending in the score
    return ~up


def _keys(t: pa.Table, level: int) -> np.ndarray:
    if level == 0:
        return order_key(t.column(S.SCORE).to_numpy())
    return t.column(TIE).to_numpy().astype(np.uint64)


def _in_range(t: pa.Table, eq: int | None, level: int, lo: int, hi: int) -> np.ndarray:
    """Rows in the candidate range: key `level` in [lo, hi] (and the score key equal to `eq` at level 1)."""
    k = _keys(t, level)
    m = (k >= np.uint64(lo)) & (k <= np.uint64(hi))
    if eq is not None:
        m &= _keys(t, 0) == np.uint64(eq)
    return m


@_remote
def _stats(t: pa.Table) -> tuple[int, int, int, int]:
    """(rows, rows scoring exactly 0, min and max order key) of one block."""
    if not t.num_rows:
        return 0, 0, 1 << 64, -1
    k = _keys(t, 0)
    return t.num_rows, int(pc.sum(pc.equal(t.column(S.SCORE), 0.0)).as_py() or 0), int(k.min()), int(k.max())


@_remote
def _hist(t: pa.Table, eq: int | None, level: int, lo: int, hi: int, width: int) -> np.ndarray:
    """Rows of one block per bin of `width` keys from `lo`, in the candidate range."""
    m = _in_range(t, eq, level, lo, hi)
    b = ((_keys(t, level)[m] - np.uint64(lo)) // np.uint64(width)).astype(np.int64)
    return np.bincount(b, minlength=-(-(hi - lo + 1) // width))


@_remote
def _fetch_range(t: pa.Table, eq: int | None, level: int, lo: int, hi: int) -> pa.Table:
    return t.filter(pa.array(_in_range(t, eq, level, lo, hi)))


@_remote
def _key_range(t: pa.Table, eq: int) -> tuple[int, int]:
    """(min, max) tie key of the rows whose score key is `eq`."""
    k = _keys(t, 1)[_keys(t, 0) == np.uint64(eq)]
    return (int(k.min()), int(k.max())) if len(k) else (1 << 64, -1)


def _gather(tasks: list[Any], add: Any, chunk: int = 256) -> Any:  # noqa: ANN401
    """Fold task results into `add` a chunk at a time: the driver holds at most `chunk` results."""
    import ray

    acc = None
    for i in range(0, len(tasks), chunk):
        for r in ray.get(tasks[i:i + chunk]):
            acc = r if acc is None else add(acc, r)
    return acc


def _cutoff_row(refs: list[Any], k: int, n: int, lo: int, hi: int, boundary_rows: int) -> dict[str, Any]:
    """The k-th row (1-based) in SORT_KEYS order among the `n` rows of `refs`, never holding more than
    `boundary_rows` rows: histogram passes narrow the range of the score's order key that holds it (and,
    inside one score, of the tie key) until it fits, then that range is fetched and sorted."""
    import ray

    eq, level, below, count = None, 0, 0, n
    while True:
        if count <= boundary_rows or (level == 1 and lo == hi):  # the last: one id > boundary_rows times
            part = pa.concat_tables(ray.get([_fetch_range.remote(r, eq, level, lo, hi) for r in refs]))
            top = part.take(pc.sort_indices(part, sort_keys=SORT_KEYS))
            return top.slice(k - below - 1, 1).to_pylist()[0]
        if lo == hi:  # every candidate has this exact score: order them by the tie key
            eq, level = lo, 1
            lo, hi = _gather([_key_range.remote(r, eq) for r in refs], lambda a, b: (min(a[0], b[0]), max(a[1], b[1])))
            continue
        width = -(-(hi - lo + 1) // BINS)
        counts = _gather([_hist.remote(r, eq, level, lo, hi, width) for r in refs], lambda a, b: a + b)
        j = int(np.searchsorted(np.cumsum(counts), k - below))  # the bin holding the k-th row
        below += int(counts[:j].sum())
        count = int(counts[j])
        lo, hi = lo + j * width, min(hi, lo + (j + 1) * width - 1)


def _keep_upto(t: pa.Table, cut: dict[str, Any]) -> pa.Table:
    """The rows of a block at or before the cutoff row in SORT_KEYS order."""
    k0, k1 = _keys(t, 0), _keys(t, 1)
    c0, c1 = order_key(np.array([cut[S.SCORE]]))[0], np.uint64(cut[TIE])
    keep = (k0 < c0) | ((k0 == c0) & (k1 < c1))
    same = np.flatnonzero((k0 == c0) & (k1 == c1))  # the cutoff's own id (and any row sharing id and score)
    if len(same):
        rest = t.take(pa.array(same)).select([S.ID, S.SRC_FILE, S.SRC_ROW]).to_pylist()
        last = (cut[S.ID], cut[S.SRC_FILE], cut[S.SRC_ROW])
        for i, r in zip(same, rest):
            keep[i] = (r[S.ID], r[S.SRC_FILE], r[S.SRC_ROW]) <= last
    return t.filter(pa.array(keep))


@_remote
def _cmp_counts(t: pa.Table, c0: int) -> np.ndarray:
    """[rows scoring above, rows scoring exactly] the cutoff score, in one block."""
    k = _keys(t, 0)
    return np.array([int((k < np.uint64(c0)).sum()), int((k == np.uint64(c0)).sum())])


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
    scored = ds.map_batches(_scored_only, fn_kwargs={"column": cfg.score_column, "max_score": cfg.max_score,
                                                     "tie_seed": cfg.tie_seed},
                            batch_format="pyarrow", batch_size=None).materialize()
    refs = scored.to_arrow_refs()
    n_scored, n_zero, lo, hi = _gather([_stats.remote(r) for r in refs],
                                       lambda a, b: (a[0] + b[0], a[1] + b[1], min(a[2], b[2]), max(a[3], b[3]))
                                       ) or (0, 0, 1 << 64, -1)  # no blocks at all
    n_keep = keep_count(n_scored, cfg.fraction, cfg.n)
    cutoff = tie_block = None
    ranked = scored.limit(0).drop_columns([TIE])
    if n_keep:
        cut = _cutoff_row(refs, n_keep, n_scored, lo, hi, BOUNDARY_ROWS)
        c0 = int(order_key(np.array([cut[S.SCORE]]))[0])
        above, equal = _gather([_cmp_counts.remote(r, c0) for r in refs], lambda a, b: a + b)
        tie_block = {"rows": int(equal), "kept": n_keep - int(above)}
        kept = ray.data.from_arrow_refs(refs).map_batches(_keep_upto, fn_kwargs={"cut": cut},
                                                          batch_format="pyarrow", batch_size=None)
        # Only the ranked blocks must come back in order (their ranks are counted from it): the order is
        # set on this dataset's own context, never on Ray's global DataContext.
        kept.context.execution_options.preserve_order = True
        top = kept.sort([k for k, _ in SORT_KEYS], descending=[d == "descending" for _, d in SORT_KEYS]).materialize()
        top_refs = top.to_arrow_refs()
        sizes = ray.get([_num_rows.remote(r) for r in top_refs])
        if sum(sizes) != n_keep:
            raise AssertionError(f"selection kept {sum(sizes)} rows, not {n_keep}")  # the cutoff's definition broke
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64).tolist()
        ranked_refs = [_add_rank.remote(r, st) for r, st in zip(top_refs, starts)]
        last = ray.get(_last_row.remote(ranked_refs[max(i for i, n in enumerate(sizes) if n)]))
        cutoff = {"score": last[S.SCORE], "id": last[S.ID], "rank": last[S.RANK]}
        ranked = ray.data.from_arrow_refs(ranked_refs)
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
