"""The scoring stages' protocol (shared by `igds score` and every baseline scorer): write each task's rows
as an atomic part, check that every pool row is there exactly once, commit, and resume an interrupted
attempt from its finished parts. See `igds_ray.stages.score` for the contract.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
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
                           "num_cpus", "num_gpus", "tokenize_in", "incremental"})


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


# Parts per stage, at most about this many: write tasks gather at least rows / MAX_PARTS rows each, so
# the driver's part summaries (about 270 bytes each) stay a few MB at a billion rows.
MAX_PARTS = 20_000


def _part_sink(fs: "Any", staging_path: str, fingerprint: str, min_rows: int | None = None) -> "Any":  # noqa: ANN401
    """A Ray Data sink writing each write task's rows as one atomic part (`storage.write_part`),
    named by the (src_file, src_row) keys it holds, so a retried task rewrites the same part. Each part
    carries its summary (`parts.summarize`) in its footer, and each write task returns it; the driver-side
    sink keeps the returns (`returns`: part name -> summary)."""
    from ray.data.block import BlockAccessor
    from ray.data.datasource import Datasink

    from igds_ray.stages.parts import summarize, with_summary
    from igds_ray.storage import part_name, write_part

    class PartSink(Datasink):
        def __init__(self) -> None:
            self.returns: dict[str, dict[str, Any]] = {}

        def get_name(self) -> str:
            return "IGDSParts"

        @property
        def min_rows_per_write(self) -> "int | None":
            return min_rows

        def write(self, blocks, ctx) -> str:  # noqa: ANN001
            tables = [t for t in (BlockAccessor.for_block(b).to_arrow() for b in blocks) if t.num_rows]
            if not tables:
                return "[]"
            t = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
            summary = summarize(t, fingerprint)
            name = part_name(t, (S.SRC_FILE, S.SRC_ROW))
            write_part(fs, staging_path, name, with_summary(t, summary))
            # The runs stay in the footer (for a resume); the driver needs only the counts.
            return json.dumps([[name, {k: v for k, v in summary.items() if k != "runs"}]])

        def on_write_complete(self, write_result) -> None:  # noqa: ANN001
            for ret in write_result.write_returns:
                for name, summary in json.loads(ret or "[]"):
                    self.returns[name] = summary

    return PartSink()


def _finished_rows(fs: "Any", staging_path: str, pool: "Any", fingerprint: str  # noqa: ANN401
                   ) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
    """(per pool file the finished rows as sorted [start, end) runs, the summaries of the kept parts by name)
    of the parts an earlier run of this attempt left, from their footers only. A part that is unreadable,
    has no summary or no runs (scattered rows), or holds a file the pool lacks is deleted (its rows are
    scored again); parts that overlap (which the protocol never writes) discard them all."""
    from igds_ray.stages.parts import merge_runs, read_summaries
    from igds_ray.storage import list_parts

    parts = list_parts(fs, staging_path)
    if not parts:
        return {}, {}
    files = {f.rel for f in pool.files}
    kept: dict[str, dict[str, Any]] = {}
    for path, s in read_summaries(fs, parts).items():
        if (s is None or s.get("fingerprint") != fingerprint or s.get("runs") is None
                or not set(s["runs"]) <= files):
            log.warning("resume: part %s cannot be reused (unreadable, no summary, scattered rows or another "
                        "pool); its rows are scored again", path)
            fs.delete_file(path)
        else:
            kept[posixpath.basename(path)] = s
    done = merge_runs(kept.values())
    if done is None:
        log.warning("resume: the parts of %s overlap; starting over", staging_path)
        for name in kept:
            fs.delete_file(posixpath.join(staging_path, name))
        return {}, {}
    return done, kept


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
    incremental: bool = False,
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
    manifest with `rendered_rows` (summed from the parts' `rendered` column). `incremental`: a finished output
    whose pool has grown or changed is extended by an increment (`stages.increment`) instead of kept.
    """

    from igds_ray import pool as P
    from igds_ray.preflight import reachable
    from igds_ray.storage import StageDir

    reachable("pool.path", pool_cfg.path)
    reachable("out", out_uri)
    from igds_ray.stages import increment as I

    pool = P.discover(pool_cfg.path, pool_cfg.text_columns, pool_cfg.id_column)
    out = StageDir(out_uri)
    if incremental and not resumable:
        raise ConfigError(f"{method}: incremental scoring needs a method that scores each row on its own "
                          "(igds, loss+ifd); this one ranks rows against each other")
    keys = I.file_keys(pool)
    cfp = I.config_fingerprint(method, cfg, pool, _RUNTIME_KEYS)
    inc = None
    if out.done() and not overwrite:
        if not incremental:
            log.info("%s is finished; skipping (overwrite=true recomputes)", out_uri)
            return out.manifest()
        inc = I.plan(out, out.manifest(), keys, cfp, method)
        if inc is None:
            log.info("%s: the pool has not changed since version %s; nothing to score", out_uri,
                     out.manifest().get("version", 1))
            return out.manifest()
    if actor_pool is not None:  # before anything is written: a refusal leaves no directory behind
        init_ray()
        check_cpu_headroom(*actor_pool)
    out.check_ours()  # before the lock file is created in someone else's directory
    with out.lock(f"{method} scoring") as held:
        fp = fingerprint(method, cfg, pool)
        if inc is not None:
            prev = out.manifest()
            staging = out.begin_increment(fp)
        else:
            prev = None
            staging = out.begin(overwrite, fingerprint=fp if resumable else None)
        if staging is None:
            return out.manifest()
        staging_path = P.filesystem(staging)[1]
        carried: dict[str, int] = {}
        if inc is not None:  # dropped parts' rows of unchanged files: moved into the attempt, not scored again
            unchanged = set(keys) - set(inc.added) - set(inc.changed)
            carried = I.carry(out, inc, staging_path, fp, unchanged)
        done, resumed = _finished_rows(out.fs, staging_path, pool, fp) if out.resumed or carried else ({}, {})
        if inc is not None:
            from igds_ray.stages.parts import merge_runs

            done = merge_runs([*inc.reuse.values(), *resumed.values()])
            if done is None:
                raise StageOutputError(f"{out_uri}: the reused and the resumed parts overlap: not committing")
            log.info("%s: version %d: %d rows of %d committed parts reused, %d carried from dropped parts; %d new, "
                     "%d changed, %d removed file(s)", out_uri, inc.version, inc.reused_rows, len(inc.reuse),
                     sum(carried.values()), len(inc.added), len(inc.changed), len(inc.removed))
        resumed_rows = sum(int(s["rows"]) for s in resumed.values()) + (inc.reused_rows if inc else 0)
        if set(resumed) - set(carried):
            log.info("%s: resuming; %d rows in %d finished parts are kept, %d rows left to score",
                     out_uri, resumed_rows, len(resumed), pool.num_rows - resumed_rows)
        t0 = time.time()
        min_rows = -(-pool.num_rows // MAX_PARTS)
        sink = _part_sink(out.fs, staging_path, fp, min_rows if min_rows > 1 else None)
        if resumed_rows < pool.num_rows:
            init_ray()
            ds = build(P.read_pool(pool, pool_cfg.rows_per_read_task or pool.rows_per_read_task(), done), pool)
            try:
                ds.write_datasink(sink, ray_remote_args={"num_cpus": WRITE_TASK_CPUS}, concurrency=write_concurrency())
            except BaseException as e:
                ds = None
                _release_frames(e)
                raise
        wall = time.time() - t0

        # Exactly once, from the parts' summaries (O(parts) on the driver): this run's write returns, the
        # resumed parts' footers, and the footer of any other part found in the attempt.
        from igds_ray.stages.parts import Tally, check, count_duplicate_ids, read_summaries
        from igds_ray.storage import list_parts

        listed = list_parts(out.fs, staging_path)
        names = {posixpath.basename(p): p for p in listed}
        known = {**resumed, **sink.returns}
        lost = sorted(set(sink.returns) - set(names))
        if lost:
            raise StageOutputError(f"{method}: part {lost[0]} was written but is not in {staging}: not committing")
        unknown = read_summaries(out.fs, [p for n, p in names.items() if n not in known])
        tally = Tally()
        for n, p in names.items():
            tally.add(n, known[n] if n in known else unknown[p], fp)
        if inc is not None:  # committed parts of earlier versions: listed by the manifest, so their own fingerprint
            for n, s in inc.reuse.items():
                tally.add(n, s, s.get("fingerprint"))
            listed = listed + [posixpath.join(out.path, n) for n in inc.reuse]
        check(tally, pool, out.fs, listed, method, out_uri)
        duplicate_ids, dup_how = count_duplicate_ids(out.fs, listed, tally.rows)
        if duplicate_ids:
            log.warning("%s: %d rows share their id with another row (each pool row is still scored once, "
                        "keyed by src_file/src_row)", out_uri, duplicate_ids)
        n_rows = tally.rows
        manifest = {
            "stage": "score",
            "method": method,
            "config": to_dict(cfg),
            "pool": {"uri": pool.uri, "files": [f.rel for f in pool.files], "id_column": pool.id_column,
                     "text_columns": list(pool.text_columns)},
            "rows": n_rows,
            "errors": tally.errors,
            "truncated": tally.truncated,
            "tokens": tally.tokens,
            "duplicate_ids": duplicate_ids,
            "duplicate_ids_counted": dup_how,
            "resumed_rows": resumed_rows - (inc.reused_rows if inc else 0) - sum(carried.values()),
            "resumed_parts": len(set(resumed) - set(carried)),
            "carried_rows": sum(carried.values()),
            "scored_rows": n_rows - resumed_rows,
            "wall_s": round(wall, 3),
            "config_fingerprint": cfp,
            "file_keys": keys,
            "version": inc.version if inc else 1,
            "reused_rows": inc.reused_rows if inc else 0,
        }
        if prompts is not None:
            manifest["prompts"] = {**prompts, "rendered_rows": tally.rendered}
        entry = {k: manifest[k] for k in ("version", "rows", "reused_rows", "scored_rows", "wall_s")}
        manifest["versions"] = [*(prev or {}).get("versions", []), {**entry, **(inc.facts() if inc else {})}]
        held.check()
        if inc is not None:
            manifest.update(inc.facts())
            return out.commit_increment(staging, manifest, list(inc.reuse), inc.drop, f"v{inc.version}")
        return out.commit(staging, manifest)
