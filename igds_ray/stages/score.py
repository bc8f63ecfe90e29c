"""Feature-Resonant Scores for a Parquet pool: Ray Data streams the pool through an actor pool of
scorers, each holding one copy of the LM (run only up to layer L) and a k-feature SAE encoder.

Output (`<out>/`, committed with `_SUCCESS`): one row per pool row with `id`, `score` (sum of the
chosen features' pooled activations), `acts` (the k pooled activations, in feature order),
`n_tokens` (tokens run through the model for that row), `truncated`, `error` (why a row has no
score; never dropped), `src_file`, `src_row`, `rendered` (the prompt was put into the task template
before scoring, `pool.prompt_template`; the manifest's `prompts` counts them).

Reliability (`run_stage`, shared with the baselines): the output directory is locked for the run
(`storage.DirLock`: a second run fails at once, naming the holder). Each write task writes its rows
as one part (`part-<hash of its (src_file, src_row) keys>.parquet`, atomically) into the attempt
directory, so a retried task rewrites the same part. A rerun of an interrupted job with the same
fingerprint keeps the finished parts and reads and scores only the rows they lack (the read tasks
drop the finished rows; a read task whose rows are all finished is not created); the manifest
records `resumed_rows`, `resumed_parts`, `scored_rows`. Before commit every pool (src_file,
src_row) must be present exactly once; `duplicate_ids` counts rows sharing an id.

Why not Ray Data's own checkpointing (`DataContext.checkpoint_config`, `CheckpointConfig`; beta in
Ray 2.60): it filters rows right after the read by an `id_column` whose values "must be unique
across all rows" (pool ids may repeat, so a synthetic key column would have to be added to every
output row); its two-phase commit (pending checkpoint -> data file written in place -> rename to
committed; leftovers of a crash deleted on the next run) exists only for Ray's own file datasinks
(`write_parquet`, ...), any other sink getting at-least-once; the checkpointed ids are loaded into
memory and shipped to an actor pool of filter actors (1 GiB reserved each); and a local checkpoint
path must be on a network file system that every node mounts.
The per-part protocol here gives the same row-level resume keyed by the pool's own
(src_file, src_row), with parts published atomically into this directory's attempt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import torch

from igds_ray import schema as S
from igds_ray.config import PoolConfig, ScoreConfig, from_dict, to_dict
from igds_ray.errors import ConfigError, StageOutputError
from igds_ray.models.loading import (
    check_compatible,
    load_model,
    load_sae,
    load_tokenizer,
    model_info,
    resolve_device,
    sae_info,
)
from igds_ray.models.runner import FeatureEncoder, LayerRunner
from igds_ray.tokenize import (
    Example,
    ExampleBuilder,
    PromptRenderer,
    build_task,
    prompt_facts,
    PROMPT_POOLINGS,
    prompt_mode,
    split_built,
)

log = logging.getLogger(__name__)
# index_reduce_ is exact for amax/mean; torch flags the API itself as beta.
warnings.filterwarnings("ignore", message="index_reduce", category=UserWarning)
# A pool of few blocks has fewer writes than `write_concurrency` allows: nothing to act on.
warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks for 'Write'", category=UserWarning)


def micro_batches(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Group example indices (longest first) so that rows × longest ≤ token_budget (padding included)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, cur, cur_max = [], [], 0
    for i in order:
        new_max = max(cur_max, lengths[i])
        if cur and new_max * (len(cur) + 1) > token_budget:
            batches.append(cur)
            cur, new_max = [], lengths[i]
        cur.append(i)
        cur_max = new_max
    if cur:
        batches.append(cur)
    return batches


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`; to a GPU from pinned memory without blocking the host."""
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


class PooledFeatureActs:
    """The model + SAE half of scoring: examples in, pooled k-feature activations out."""

    def __init__(self, runner: LayerRunner, encoder: FeatureEncoder, pad_id: int, pooling: str, token_budget: int):
        self.runner, self.encoder = runner, encoder
        self.pad_id, self.pooling, self.token_budget = pad_id, pooling, token_budget
        self.tokens_forwarded = 0  # padded tokens through the model, for throughput figures
        self.rows_forwarded = 0  # examples run through the model

    @torch.inference_mode()
    def __call__(self, examples: Sequence[Example]) -> np.ndarray:
        """acts: [n_examples, k] float32.

        Micro-batches are right-padded and run without a padding mask (`LayerRunner`: the positions read are
        never padding, and causal attention keeps padding out of them). Results stay on the device until the
        end of the call: one device-to-host copy per call, not one per micro-batch."""
        dev = self.runner_device
        out = torch.zeros((len(examples), self.encoder.k), dtype=torch.float32, device=dev)
        for mb in micro_batches([len(e.input_ids) for e in examples], self.token_budget):
            T = max(len(examples[i].input_ids) for i in mb)
            ids = torch.full((len(mb), T), self.pad_id, dtype=torch.long)
            for r, i in enumerate(mb):
                ids[r, :len(examples[i].input_ids)] = torch.tensor(examples[i].input_ids)
            rows = torch.tensor([r for r, i in enumerate(mb) for _ in examples[i].positions])
            cols = torch.tensor([p for i in mb for p in examples[i].positions])
            hidden = self.runner(_to(ids, dev), None)  # [b, T, d]
            self.tokens_forwarded += len(mb) * T
            self.rows_forwarded += len(mb)
            rows, cols = _to(rows, dev), _to(cols, dev)
            acts = self.encoder(hidden[rows, cols]).float()  # [n_positions, k]
            if self.pooling == "last":
                pooled = acts  # one position per row, in row order
            else:
                pooled = torch.zeros((len(mb), acts.shape[1]), dtype=acts.dtype, device=acts.device)
                reduce = "amax" if self.pooling in ("max", "prompt_max") else "mean"
                pooled.index_reduce_(0, rows, acts, reduce, include_self=False)
            out[_to(torch.tensor(mb), dev)] = pooled
        return out.cpu().numpy()

    @property
    def runner_device(self) -> torch.device:
        return next(self.runner.model.parameters()).device


def scored_schema(id_type: pa.DataType) -> pa.Schema:
    """An igds scores part: the shared scores schema plus whether the prompt was put into the task template."""
    return S.scores_schema(id_type).append(pa.field(S.RENDERED, pa.bool_()))


class FeatureScorer:
    """Ray Data callable class: one model + SAE per actor, loaded once in `__init__`."""

    def __init__(self, cfg: dict[str, Any] | ScoreConfig, fail_after_batches: int | None = None,
                 hooks: dict[str, Any] | None = None, task: Any = None) -> None:
        self.cfg = cfg if isinstance(cfg, ScoreConfig) else from_dict(ScoreConfig, cfg)
        c = self.cfg
        mode = prompt_mode(c)
        # The driver passes the task it built (a task registered only in the driver process still
        # reaches the actor, pickled); in process it is built here.
        self.renderer = (PromptRenderer(task if task is not None else build_task(c), c.pool.template_index, mode)
                         if mode in ("auto", "task") else None)
        device = resolve_device(c.model.device)
        if device.type == "cpu" and c.num_cpus >= 1:
            torch.set_num_threads(max(1, int(c.num_cpus)))
        feats = c.feature_ids
        self.tokenizer = load_tokenizer(c.model)
        self.layer = feats[0].layer
        # Only blocks 0..L are built and loaded; the SAE is read on the CPU and only its k columns (and the
        # input preprocessing's vectors) go to the device.
        model = load_model(c.model, device, layers=self.layer + 1)
        sae = load_sae(c.sae, torch.device("cpu"))
        self.builder = ExampleBuilder(self.tokenizer, c.pooling, c.max_tokens, c.pool.chat_template)
        self.acts = PooledFeatureActs(
            LayerRunner(model, self.layer, prune=True),
            FeatureEncoder(sae, [f.index for f in feats], compact=True).to(device),
            self.tokenizer.pad_token_id,
            c.pooling,
            c.token_budget,
        )
        # Test hooks for crash-recovery tests: the actor process exits after `fail_after_batches`
        # batches (Ray restarts it), raises after `raise_after_batches` (the job fails), or stops
        # making progress (blocks) after `stall_after_batches`; each batch waits
        # `batch_delay_s`; `forward_log` (a directory) receives one line per batch with the rows handed
        # to this actor and the rows it ran through the model.
        hooks = hooks or {}
        self._fail_after = fail_after_batches if fail_after_batches is not None else hooks.get("fail_after_batches")
        self._stall_after = hooks.get("stall_after_batches")
        self._raise_after = hooks.get("raise_after_batches")
        self._delay = float(hooks.get("batch_delay_s") or 0.0)
        self._forward_log = hooks.get("forward_log")
        self._batches = 0

    def __call__(self, table: pa.Table) -> pa.Table:
        self._batches += 1
        if self._fail_after is not None and self._batches > self._fail_after:
            os._exit(1)
        if self._delay:
            time.sleep(self._delay)
        if self._raise_after is not None and self._batches > self._raise_after:
            raise RuntimeError(f"test hook: scorer fails on batch {self._batches}")
        if self._stall_after is not None and self._batches > self._stall_after:
            time.sleep(24 * 3600)
        before = self.acts.rows_forwarded
        out = self.score_table(table)
        if self._forward_log:
            _log_forward(self._forward_log, table.num_rows, self.acts.rows_forwarded - before)
        return out

    def score_table(self, table: pa.Table) -> pa.Table:
        c = self.cfg
        n = table.num_rows
        errors: list[str | None] = table.column(S.INPUT_ERROR).to_pylist()
        cols = {name: table.column(name).to_pylist() for name in c.pool.text_columns}
        for i in range(n):
            if errors[i] is None:
                for name in c.pool.text_columns:
                    if name == c.pool.response_column and c.pooling in PROMPT_POOLINGS and not c.pool.text_column:
                        continue  # the response is not read by `last`/`prompt_*`; an empty one is allowed
                    if not cols[name][i].strip():
                        errors[i] = f"{name} is empty or whitespace only"
                        break
        ok = [i for i in range(n) if errors[i] is None]
        rendered = [False] * n
        if c.pool.text_column:
            built = self.builder.build_text([cols[c.pool.text_column][i] for i in ok])
        else:
            prompts = [cols[c.pool.prompt_column][i] for i in ok]
            if self.renderer is not None:
                prompts, flags = self.renderer.render(prompts)
                for i, f in zip(ok, flags):
                    rendered[i] = f
            built = self.builder.build_pairs(prompts, [cols[c.pool.response_column][i] for i in ok])
        rows, examples = split_built(ok, built, errors)
        score = [None] * n
        acts: list[list[float] | None] = [None] * n
        n_tokens = [0] * n
        truncated = [False] * n
        if examples:
            pooled = self.acts(examples)
            for j, i in enumerate(rows):
                a = pooled[j]
                if not np.all(np.isfinite(a)):
                    errors[i] = "non-finite activation"
                    continue
                acts[i] = a.tolist()
                score[i] = float(a.astype(np.float64).sum())
                n_tokens[i] = len(examples[j].input_ids)
                truncated[i] = examples[j].truncated
        id_col = table.column(S.ID)
        return pa.table(
            {
                S.ID: id_col,
                S.SCORE: pa.array(score, pa.float64()),
                S.ACTS: pa.array(acts, pa.list_(pa.float32())),
                S.N_TOKENS: pa.array(n_tokens, pa.int32()),
                S.TRUNCATED: pa.array(truncated, pa.bool_()),
                S.ERROR: pa.array(errors, pa.string()),
                S.SRC_FILE: table.column(S.SRC_FILE),
                S.SRC_ROW: table.column(S.SRC_ROW),
                S.RENDERED: pa.array(rendered, pa.bool_()),
            },
            schema=scored_schema(id_col.type),
        )


HOOKS_ENV = "IGDS_TEST_HOOKS"  # JSON test hooks for a scoring job run from the CLI (read on the driver)


def _log_forward(log_dir: str, rows: int, forwarded: int) -> None:
    os.makedirs(log_dir, exist_ok=True)
    fd = os.open(os.path.join(log_dir, f"{os.getpid()}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, f"{rows} {forwarded}\n".encode())  # one small O_APPEND write: never interleaved
    finally:
        os.close(fd)


def read_forward_log(log_dir: str) -> tuple[int, int]:
    """(rows handed to scorers, rows run through the model) summed over a `forward_log` directory."""
    rows = fwd = 0
    if os.path.isdir(log_dir):
        for name in os.listdir(log_dir):
            with open(os.path.join(log_dir, name)) as f:
                for line in f:
                    a, b = line.split()
                    rows, fwd = rows + int(a), fwd + int(b)
    return rows, fwd


def resolve_hooks(hooks: dict[str, Any] | None = None) -> dict[str, Any]:
    """Explicit hooks, over those of `$IGDS_TEST_HOOKS` (a JSON object)."""
    merged = json.loads(os.environ.get(HOOKS_ENV) or "{}")
    merged.update(hooks or {})
    return merged


def validate(cfg: ScoreConfig) -> Any:  # noqa: ANN401
    """Everything checkable from configs, before any weights are loaded. Returns the task prompts
    are rendered in (None: as stored), its template checked."""
    check_compatible(model_info(cfg.model), sae_info(cfg.sae), cfg.feature_ids)
    task = build_task(cfg)
    if task is not None:
        PromptRenderer(task, cfg.pool.template_index, prompt_mode(cfg))  # type: ignore[arg-type]
    return task


def init_ray() -> None:
    import ray

    if not ray.is_initialized():
        # Under `ray job submit` RAY_ADDRESS points at the cluster; otherwise a local one starts.
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, logging_level=logging.WARNING)


class CPUStarvationWarning(UserWarning):
    """Scorer actors reserve (nearly) every CPU of a cluster that cannot grow: the job may wait forever."""


def check_cpu_headroom(actors: int, cpus_per_actor: float, keys: str = "min_actors × num_cpus") -> str | None:
    """Refuse, before launching anything, scorer actors that leave the pool's read tasks no CPU.

    A read task reserves `READ_TASK_CPUS` (a quarter CPU). When `actors × cpus_per_actor` leaves less than
    that of the cluster's CPUs and the cluster cannot grow (no autoscaler), the job would wait forever
    without an error: a `ConfigError` names the keys instead. On an autoscaling cluster more nodes arrive,
    so nothing is refused; when Ray cannot say whether one is configured, a warning is issued (and returned).
    """
    import ray

    from igds_ray.pool import READ_TASK_CPUS

    total = float(ray.cluster_resources().get("CPU", 0.0))
    left = total - actors * cpus_per_actor
    if left >= READ_TASK_CPUS:
        return None
    try:
        from ray.data._internal.cluster_autoscaler.util import is_autoscaling_enabled

        autoscaling: bool | None = is_autoscaling_enabled()
    except Exception:  # noqa: BLE001 - a private Ray API; unknown: warn rather than refuse
        autoscaling = None
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


def run(cfg: ScoreConfig, fail_after_batches: int | None = None,
        hooks: dict[str, Any] | None = None) -> dict[str, Any]:
    """Score the pool into `cfg.out`; a finished output is kept (unless `overwrite`), an interrupted
    one is resumed (its finished parts kept). Returns the manifest."""
    import ray

    task = validate(cfg)
    kwargs = {"cfg": to_dict(cfg), "fail_after_batches": fail_after_batches, "hooks": resolve_hooks(hooks),
              "task": task}

    def build(ds, pool):  # noqa: ANN001, ANN202
        return ds.map_batches(
            FeatureScorer,
            fn_constructor_kwargs=kwargs,
            batch_size=cfg.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(min_size=cfg.min_actors, max_size=cfg.max_actors),
            num_gpus=cfg.num_gpus or None,
            num_cpus=cfg.num_cpus,
        )

    return run_stage("igds", cfg, cfg.pool, cfg.out, cfg.overwrite, build,
                     actor_pool=(cfg.min_actors, cfg.num_cpus, "min_actors × num_cpus"), resumable=True,
                     prompts=prompt_facts(cfg))


# Config keys that change how a stage runs, not what it writes: an attempt begun with other values
# is still resumed. (Batch composition moves scores by float rounding only, ~1e-7.)
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
