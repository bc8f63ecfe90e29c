"""The scoring stages' protocol (shared by `igds score` and every baseline scorer): write each task's rows
as an atomic part, check that every pool row is there exactly once, commit, and resume an interrupted
attempt from its finished parts. See `igds_ray.stages.score` for the contract.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from igds_ray import schema as S
from igds_ray.config import PoolConfig, to_dict
from igds_ray.errors import ConfigError, StageOutputError

log = logging.getLogger(__name__)
# A pool of few blocks has fewer writes than `write_concurrency` allows: nothing to act on.
warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks for 'Write'", category=UserWarning)


def init_ray() -> None:
    import ray

    if not ray.is_initialized():
        # Under `ray job submit` RAY_ADDRESS points at the cluster; otherwise a local one starts.
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, logging_level=logging.WARNING)


class CPUStarvationWarning(UserWarning):
    """Scorer actors reserve (nearly) every CPU of a cluster that cannot grow: the job may wait forever."""


def _autoscaling() -> bool | None:
    """True: the cluster can add nodes; False: it certainly cannot (a local cluster `ray.init()` started in this
    process); None: unknown (Ray reports no autoscaling config, as for an autoscaler v1 head; private APIs)."""
    import ray

    try:
        from ray.data._internal.cluster_autoscaler.util import is_autoscaling_enabled

        if is_autoscaling_enabled():
            return True
        node = ray._private.worker._global_node
        return False if node is not None and getattr(node, "ray_init_cluster", False) else None
    except Exception:  # noqa: BLE001 - private Ray APIs: unknown
        return None


def check_cpu_headroom(actors: int, cpus_per_actor: float, keys: str = "min_actors × num_cpus") -> str | None:
    """Refuse, before launching anything, scorer actors that leave the pool's read tasks no CPU.

    A read task reserves `READ_TASK_CPUS` (a quarter CPU). When `actors × cpus_per_actor` leaves less than
    that of the cluster's CPUs and the cluster cannot grow (a local cluster started by `ray.init()`), the job
    would wait forever without an error: a `ConfigError` names the keys instead. On an autoscaling cluster
    more nodes arrive, so nothing is refused; when Ray cannot say whether an autoscaler runs (a connected
    cluster without an autoscaling config Ray Data can read), a warning is issued (and returned).
    """
    import ray

    from igds_ray.pool import READ_TASK_CPUS

    total = float(ray.cluster_resources().get("CPU", 0.0))
    left = total - actors * cpus_per_actor
    if left >= READ_TASK_CPUS:
        return None
    autoscaling = _autoscaling()
    if autoscaling:
        return None
    msg = (f"{actors} scorer actor(s) x {cpus_per_actor:g} CPU ({keys}) leave {max(left, 0.0):g} of the "
           f"cluster's {total:g} CPUs for the pool's read tasks, which need {READ_TASK_CPUS:g} each, and ")
    if autoscaling is False:
        raise ConfigError(msg + "no autoscaler is configured, so the job would wait forever: lower num_cpus "
                          "(fractions are allowed) or the number of actors, or add CPUs")
    msg += ("no autoscaler was found: the job may wait forever. Lower num_cpus (fractions are allowed) or the "
            "number of actors, or add CPUs.")
    warnings.warn(msg, CPUStarvationWarning, stacklevel=2)
    return msg


_RUNTIME_KEYS = frozenset({"overwrite", "out", "batch_size", "token_budget", "min_actors", "max_actors", "actors",
                           "num_cpus", "num_gpus"})


def fingerprint(method: str, cfg: Any, pool: "Any") -> str:  # noqa: ANN401
    """A digest of everything that decides a scoring stage's rows: method, config, the pool's files."""
    d = {k: v for k, v in to_dict(cfg).items() if k not in _RUNTIME_KEYS}
    if isinstance(d.get("pool"), dict):
        d["pool"] = {k: v for k, v in d["pool"].items() if k != "rows_per_read_task"}
    blob = json.dumps({
        "method": method,
        "config": d,
        "pool": {"uri": pool.uri, "id_column": pool.id_column, "text_columns": list(pool.text_columns),
                 "files": [[f.rel, list(f.row_groups), f.size] for f in pool.files]},
    }, sort_keys=True, default=str)
    return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()


# Write tasks reserve no CPU: each encodes one small scores table and uploads it. With a CPU each,
# Ray Data's resource budget keeps them queued while the scorer actors and the (backpressured) read
# tasks hold every CPU, which on a small cluster means until the reads end: finished parts would
# then be committed only near the end of the job, and a rerun after a crash would keep none.
# Without a CPU they are not limited by the CPUs either, so `write_concurrency` caps them (else Ray
# starts a worker process per pending write: measured 1.5-2.5x slower on a 2-CPU test cluster).
WRITE_TASK_CPUS = 0.0


def write_concurrency() -> int:
    """Concurrent part writes: the cluster's CPU count, at least 2."""
    import ray

    return max(2, int(ray.cluster_resources().get("CPU", 0)))


def _part_sink(fs: "Any", staging_path: str) -> "Any":  # noqa: ANN401
    """A Ray Data sink writing each write task's rows as one atomic part (`storage.write_part`),
    named by the (src_file, src_row) keys it holds, so a retried task rewrites the same part."""
    from ray.data.block import BlockAccessor
    from ray.data.datasource import Datasink

    from igds_ray.storage import part_name, write_part

    class PartSink(Datasink):
        def get_name(self) -> str:
            return "IGDSParts"

        def write(self, blocks, ctx) -> int:  # noqa: ANN001
            tables = [t for t in (BlockAccessor.for_block(b).to_arrow() for b in blocks) if t.num_rows]
            if not tables:
                return 0
            t = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
            write_part(fs, staging_path, part_name(t, (S.SRC_FILE, S.SRC_ROW)), t)
            return t.num_rows

    return PartSink()


def _finished_rows(fs: "Any", staging_path: str, pool: "Any") -> tuple[dict[str, np.ndarray], int, int]:  # noqa: ANN401
    """(sorted finished rows per pool file, rows, parts) of the parts an earlier run of this attempt
    left. An unreadable part is deleted (its rows are scored again); parts that overlap (which the
    protocol never writes) discard them all."""
    import pyarrow.parquet as pq
    from concurrent.futures import ThreadPoolExecutor

    from igds_ray.storage import list_parts

    parts = list_parts(fs, staging_path)
    if not parts:
        return {}, 0, 0

    def keys(path: str) -> tuple[str, pa.Table | None]:
        try:
            with fs.open_input_file(path) as f:
                return path, pq.ParquetFile(f).read(columns=[S.SRC_FILE, S.SRC_ROW])
        except Exception as e:  # noqa: BLE001
            log.warning("resume: part %s is unreadable (%s); its rows are scored again", path, e)
            return path, None

    with ThreadPoolExecutor(max_workers=16) as ex:
        got = list(ex.map(keys, parts))
    for path, t in got:
        if t is None:
            fs.delete_file(path)
    tables = [t for _, t in got if t is not None]
    if not tables:
        return {}, 0, 0
    t = pa.concat_tables(tables)
    index = {f.rel: i for i, f in enumerate(pool.files)}
    enc = t.column(S.SRC_FILE).combine_chunks().dictionary_encode()
    rows = t.column(S.SRC_ROW).to_numpy().astype(np.int64)
    try:
        fidx = np.array([index[r] for r in enc.dictionary.to_pylist()], dtype=np.int64)[
            enc.indices.to_numpy(zero_copy_only=False)]
    except KeyError:
        fidx = None
    if fidx is None or len(np.unique(fidx << 40 | rows)) != len(rows):
        log.warning("resume: the parts of %s do not fit the pool (unknown file or a row twice); starting over",
                    staging_path)
        for path, t in got:
            if t is not None:
                fs.delete_file(path)
        return {}, 0, 0
    order = np.lexsort((rows, fidx))  # by file, then row
    fidx, rows = fidx[order], rows[order]
    bounds = np.searchsorted(fidx, np.arange(len(pool.files) + 1))
    done = {f.rel: rows[bounds[i]:bounds[i + 1]] for i, f in enumerate(pool.files) if bounds[i + 1] > bounds[i]}
    return done, len(rows), len(tables)


def _id_hashes(col: pa.Array) -> np.ndarray:
    """int64 per id for counting distinct ids in bounded memory: integer ids as they are, strings by
    Python's 64-bit hash (a collision among a billion ids has odds of about 3%: it would
    under-count by one; `duplicate_ids` is a diagnostic, the exactly-once check uses (file, row))."""
    if pa.types.is_integer(col.type):
        return col.to_numpy(zero_copy_only=False).astype(np.int64)
    return np.fromiter((hash(v) for v in col.to_pylist()), dtype=np.int64, count=len(col))


def _release_frames(e: BaseException) -> None:
    """Let a failed Ray Data job's scorer actors go now.

    Ray Data releases the actors of a failed job by reference counting. The exception's traceback
    (and the frames above the ones it lists, in Ray Data's executor) still reference the executor,
    and so the actors and the CPUs/GPUs they reserve, for as long as the exception lives: a driver
    that catches it and reruns the stage (a notebook, a retry loop, a test) would find those
    resources taken and wait forever. The traceback's text (files, lines) is kept; the locals of
    frames that have finished are cleared (a frame still executing refuses, and is skipped).
    """
    import gc

    excs, todo = [], [e]
    while todo:
        x = todo.pop()
        if x is None or any(x is y for y in excs):
            continue
        excs.append(x)
        cause = getattr(x, "cause", None)  # RayTaskError keeps the original exception here
        todo += [x.__cause__, x.__context__, cause if isinstance(cause, BaseException) else None]
    frames: dict[int, Any] = {}
    for x in excs:
        tb = x.__traceback__
        while tb is not None:
            f = tb.tb_frame
            while f is not None and id(f) not in frames:
                frames[id(f)] = f
                f = f.f_back
            tb = tb.tb_next
    for f in frames.values():
        try:
            f.clear()
        except RuntimeError:  # executing (this thread's own stack) or suspended
            pass
    gc.collect()


def run_stage(
    method: str,
    cfg: Any,
    pool_cfg: PoolConfig,
    out_uri: str,
    overwrite: bool,
    build: Callable[["ray.data.Dataset", Any], "ray.data.Dataset"],  # noqa: F821
    actor_pool: tuple[int, float, str] | None = None,
    resumable: bool = False,
    prompts: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Discover the pool, `build(ds, pool)` the scoring plan, write it, check every pool row is there
    exactly once, commit. Returns the manifest.

    Shared by `igds score` and every baseline scorer (same protocol, same manifest keys, which
    `select` reads for `write_rows`). The output directory is locked for the whole stage (a second
    run on it fails at once with `RunLocked`). A finished output is kept unless `overwrite`. With
    `resumable` (for methods that score each row on its own, as `igds` and `loss+ifd` do; not ZIP,
    whose greedy positions depend on the other rows of a shard), an unfinished output begun with the
    same fingerprint (method, config, pool files) is resumed: its finished parts are kept and only
    the rows they lack are read and scored; otherwise it is cleared and started again. Every
    (src_file, src_row) of the pool must appear exactly once, or nothing is committed.
    `actor_pool`: (actors reserved up front, CPUs per actor, the config keys that set them), for the
    CPU-headroom warning (`check_cpu_headroom`). `prompts`: how prompts were written, recorded in the
    manifest with `rendered_rows` (summed from the parts' `rendered` column).
    """
    import pyarrow.dataset as pads

    from igds_ray import pool as P
    from igds_ray.preflight import reachable
    from igds_ray.storage import StageDir

    reachable("pool.path", pool_cfg.path)
    reachable("out", out_uri)
    pool = P.discover(pool_cfg.path, pool_cfg.text_columns, pool_cfg.id_column)
    out = StageDir(out_uri)
    if out.done() and not overwrite:
        log.info("%s is finished; skipping (overwrite=true recomputes)", out_uri)
        return out.manifest()
    if actor_pool is not None:  # before anything is written: a refusal leaves no directory behind
        init_ray()
        check_cpu_headroom(*actor_pool)
    out.check_ours()  # before the lock file is created in someone else's directory
    with out.lock(f"{method} scoring") as held:
        staging = out.begin(overwrite, fingerprint=fingerprint(method, cfg, pool) if resumable else None)
        if staging is None:
            return out.manifest()
        staging_path = P.filesystem(staging)[1]
        done, resumed_rows, resumed_parts = (
            _finished_rows(out.fs, staging_path, pool) if out.resumed else ({}, 0, 0))
        if resumed_rows:
            log.info("%s: resuming; %d rows in %d finished parts are kept, %d rows left to score",
                     out_uri, resumed_rows, resumed_parts, pool.num_rows - resumed_rows)
        t0 = time.time()
        if resumed_rows < pool.num_rows:
            init_ray()
            ds = build(P.read_pool(pool, pool_cfg.rows_per_read_task or pool.rows_per_read_task(), done), pool)
            try:
                ds.write_datasink(_part_sink(out.fs, staging_path), ray_remote_args={"num_cpus": WRITE_TASK_CPUS},
                                  concurrency=write_concurrency())
            except BaseException as e:
                ds = None
                _release_frames(e)
                raise
        wall = time.time() - t0

        written = pads.dataset(staging_path, format="parquet", filesystem=out.fs)
        file_index = {f.rel: i for i, f in enumerate(pool.files)}
        keys, ids, n_err, n_trunc, tokens, n_rendered = [], [], 0, 0, 0, 0
        has_rendered = S.RENDERED in written.schema.names
        for batch in written.to_batches(columns=[S.ERROR, S.TRUNCATED, S.N_TOKENS, S.SRC_FILE, S.SRC_ROW, S.ID]
                                        + ([S.RENDERED] if has_rendered else [])):
            if has_rendered:
                n_rendered += int(np.asarray(batch.column(S.RENDERED).to_numpy(zero_copy_only=False)).sum())
            n_err += batch.num_rows - batch.column(0).null_count
            n_trunc += int(np.asarray(batch.column(1).to_numpy(zero_copy_only=False)).sum())
            tokens += int(np.asarray(batch.column(2).to_numpy(zero_copy_only=False), dtype=np.int64).sum())
            enc = batch.column(3).dictionary_encode()  # a few pool files per batch: look each up once
            try:
                per_file = np.array([file_index[r] for r in enc.dictionary.to_pylist()], dtype=np.int64)
            except KeyError as e:
                raise StageOutputError(f"{method} wrote a row of unknown pool file {e}: not committing {out_uri}") from None
            f = per_file[enc.indices.to_numpy(zero_copy_only=False)]
            keys.append(f << 40 | batch.column(4).to_numpy(zero_copy_only=False).astype(np.int64))
            ids.append(_id_hashes(batch.column(5)))
        allkeys = np.concatenate(keys) if keys else np.zeros(0, np.int64)
        n_rows, n_unique = len(allkeys), len(np.unique(allkeys))
        if n_rows != pool.num_rows or n_unique != pool.num_rows:
            raise StageOutputError(
                f"{method} wrote {n_rows} rows ({n_unique} distinct pool rows) for a pool of {pool.num_rows}: "
                f"not committing {out_uri}"
            )
        duplicate_ids = n_rows - len(np.unique(np.concatenate(ids))) if ids else 0
        if duplicate_ids:
            log.warning("%s: %d rows share their id with another row (each pool row is still scored once, "
                        "keyed by src_file/src_row)", out_uri, duplicate_ids)
        manifest = {
            "stage": "score",
            "method": method,
            "config": to_dict(cfg),
            "pool": {"uri": pool.uri, "files": [f.rel for f in pool.files], "id_column": pool.id_column,
                     "text_columns": list(pool.text_columns)},
            "rows": n_rows,
            "errors": n_err,
            "truncated": n_trunc,
            "tokens": tokens,
            "duplicate_ids": duplicate_ids,
            "resumed_rows": resumed_rows,
            "resumed_parts": resumed_parts,
            "scored_rows": n_rows - resumed_rows,
            "wall_s": round(wall, 3),
        }
        if prompts is not None:
            manifest["prompts"] = {**prompts, "rendered_rows": n_rendered}
        held.check()
        return out.commit(staging, manifest)
