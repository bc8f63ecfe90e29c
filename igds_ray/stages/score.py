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
src_row) must be present exactly once, checked from the parts' summaries (`stages.parts`: counts and an
order-independent checksum, O(parts) on the driver); `duplicate_ids` counts rows sharing an id.

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

from typing import Any

from igds_ray.config import ScoreConfig, to_dict
from igds_ray.models.loading import check_compatible, model_info, sae_info
from igds_ray.stages.protocol import (  # the stage protocol, re-exported
    WRITE_TASK_CPUS,
    CPUStarvationWarning,
    check_cpu_headroom,
    fingerprint,
    init_ray,
    run_stage,
    write_concurrency,
)
from igds_ray.stages.scorer import (  # the hot path, re-exported
    HOOKS_ENV,
    FeatureScorer,
    PooledFeatureActs,
    micro_batches,
    read_forward_log,
    resolve_hooks,
    scored_schema,
)
from igds_ray.tokenize import PromptRenderer, build_task, prompt_facts, prompt_mode

__all__ = ["CPUStarvationWarning", "FeatureScorer", "HOOKS_ENV", "PooledFeatureActs", "WRITE_TASK_CPUS",
           "check_cpu_headroom", "fingerprint", "init_ray", "micro_batches", "read_forward_log", "resolve_hooks",
           "run", "run_stage", "scored_schema", "validate", "write_concurrency"]


def validate(cfg: ScoreConfig) -> Any:  # noqa: ANN401
    """Everything checkable from configs, before any weights are loaded. Returns the task prompts
    are rendered in (None: as stored), its template checked."""
    check_compatible(model_info(cfg.model), sae_info(cfg.sae), cfg.feature_ids)
    task = build_task(cfg)
    if task is not None:
        PromptRenderer(task, cfg.pool.template_index, prompt_mode(cfg))  # type: ignore[arg-type]
    return task


def run(cfg: ScoreConfig, fail_after_batches: int | None = None,
        hooks: dict[str, Any] | None = None) -> dict[str, Any]:
    """Score the pool into `cfg.out`; a finished output is kept (unless `overwrite`), an interrupted
    one is resumed (its finished parts kept). Returns the manifest."""
    import ray

    task = validate(cfg)
    kwargs = {"cfg": to_dict(cfg), "fail_after_batches": fail_after_batches, "hooks": resolve_hooks(hooks),
              "task": task}

    def build(ds, pool):  # noqa: ANN001, ANN202
        from igds_ray.pool import READ_TASK_CPUS
        from igds_ray.stages.scorer import prepare_batch

        # Checks, template rendering and tokenisation run in a CPU stage before the scorer actors, so a GPU
        # actor's time goes to the model. Block by block (no batch_size), at the read tasks' quarter CPU, so
        # Ray Data may fuse it into them (a batch size stops that). With CPU actors (`auto`) they stay in the actor: on 2 CPUs the
        # stage cost 20% (20 files) to 38% (4,000 files) of the wall time (BENCHMARKS.md, "Scale").
        if cfg.tokenize_in == "stage" or (cfg.tokenize_in == "auto" and cfg.num_gpus > 0):
            ds = ds.map_batches(prepare_batch, fn_kwargs={"cfg": kwargs["cfg"], "task": task}, batch_size=None,
                                batch_format="pyarrow", num_cpus=READ_TASK_CPUS)
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
                     prompts=prompt_facts(cfg), incremental=cfg.incremental)


# Config keys that change how a stage runs, not what it writes: an attempt begun with other values
# is still resumed. (Batch composition moves scores by float rounding only, ~1e-7.)
