"""Feature-Resonant Scores for a Parquet pool: Ray Data streams the pool through an actor pool of
scorers, each holding one copy of the LM (run only up to layer L) and a k-feature SAE encoder.

Output (`<out>/`, committed with `_SUCCESS`): one row per pool row with `id`, `score` (sum of the
chosen features' pooled activations), `acts` (the k pooled activations, in feature order),
`n_tokens` (tokens run through the model for that row), `truncated`, `error` (why a row has no
score; never dropped), `src_file`, `src_row`.
"""

from __future__ import annotations

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
from igds_ray.errors import StageOutputError
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
from igds_ray.tokenize import Example, ExampleBuilder

log = logging.getLogger(__name__)
# index_reduce_ is exact for amax/mean; torch flags the API itself as beta.
warnings.filterwarnings("ignore", message="index_reduce", category=UserWarning)


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


class PooledFeatureActs:
    """The model + SAE half of scoring: examples in, pooled k-feature activations out."""

    def __init__(self, runner: LayerRunner, encoder: FeatureEncoder, pad_id: int, pooling: str, token_budget: int):
        self.runner, self.encoder = runner, encoder
        self.pad_id, self.pooling, self.token_budget = pad_id, pooling, token_budget
        self.tokens_forwarded = 0  # padded tokens through the model, for throughput figures

    @torch.inference_mode()
    def __call__(self, examples: Sequence[Example]) -> np.ndarray:
        """acts: [n_examples, k] float32."""
        out = np.zeros((len(examples), self.encoder.k), dtype=np.float32)
        for mb in micro_batches([len(e.input_ids) for e in examples], self.token_budget):
            T = max(len(examples[i].input_ids) for i in mb)
            ids = torch.full((len(mb), T), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(mb), T), dtype=torch.long)
            for r, i in enumerate(mb):
                n = len(examples[i].input_ids)
                ids[r, :n] = torch.tensor(examples[i].input_ids)
                mask[r, :n] = 1
            dev = self.runner_device
            hidden = self.runner(ids.to(dev), mask.to(dev))  # [b, T, d]
            self.tokens_forwarded += len(mb) * T
            rows = torch.tensor([r for r, i in enumerate(mb) for _ in examples[i].positions], device=hidden.device)
            cols = torch.tensor([p for i in mb for p in examples[i].positions], device=hidden.device)
            acts = self.encoder(hidden[rows, cols]).float()  # [n_positions, k]
            if self.pooling == "last":
                pooled = acts  # one position per row, in row order
            else:
                pooled = torch.zeros((len(mb), acts.shape[1]), dtype=acts.dtype, device=acts.device)
                pooled.index_reduce_(0, rows, acts, "amax" if self.pooling == "max" else "mean", include_self=False)
            out[mb] = pooled.cpu().numpy()
        return out

    @property
    def runner_device(self) -> torch.device:
        return next(self.runner.model.parameters()).device


class FeatureScorer:
    """Ray Data callable class: one model + SAE per actor, loaded once in `__init__`."""

    def __init__(self, cfg: dict[str, Any] | ScoreConfig, fail_after_batches: int | None = None) -> None:
        self.cfg = cfg if isinstance(cfg, ScoreConfig) else from_dict(ScoreConfig, cfg)
        c = self.cfg
        device = resolve_device(c.model.device)
        if device.type == "cpu" and c.num_cpus >= 1:
            torch.set_num_threads(max(1, int(c.num_cpus)))
        feats = c.feature_ids
        self.tokenizer = load_tokenizer(c.model)
        model = load_model(c.model, device)
        sae = load_sae(c.sae, device)
        self.layer = feats[0].layer
        self.builder = ExampleBuilder(self.tokenizer, c.pooling, c.max_tokens, c.pool.chat_template)
        self.acts = PooledFeatureActs(
            LayerRunner(model, self.layer, prune=True),
            FeatureEncoder(sae, [f.index for f in feats]),
            self.tokenizer.pad_token_id,
            c.pooling,
            c.token_budget,
        )
        # Test hook for crash-recovery tests: the actor process exits after this many batches.
        self._fail_after = fail_after_batches
        self._batches = 0

    def __call__(self, table: pa.Table) -> pa.Table:
        self._batches += 1
        if self._fail_after is not None and self._batches > self._fail_after:
            os._exit(1)
        return self.score_table(table)

    def score_table(self, table: pa.Table) -> pa.Table:
        c = self.cfg
        n = table.num_rows
        errors: list[str | None] = table.column(S.INPUT_ERROR).to_pylist()
        cols = {name: table.column(name).to_pylist() for name in c.pool.text_columns}
        for i in range(n):
            if errors[i] is None:
                for name in c.pool.text_columns:
                    if name == c.pool.response_column and c.pooling == "last" and not c.pool.text_column:
                        continue  # the response is not read by `last`; an empty one is allowed
                    if not cols[name][i].strip():
                        errors[i] = f"{name} is empty or whitespace only"
                        break
        ok = [i for i in range(n) if errors[i] is None]
        if c.pool.text_column:
            built = self.builder.build_text([cols[c.pool.text_column][i] for i in ok])
        else:
            built = self.builder.build_pairs(
                [cols[c.pool.prompt_column][i] for i in ok], [cols[c.pool.response_column][i] for i in ok]
            )
        examples: list[Example] = []
        rows: list[int] = []
        for i, b in zip(ok, built):
            if isinstance(b, str):
                errors[i] = b
            else:
                examples.append(b)
                rows.append(i)
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
            },
            schema=S.scores_schema(id_col.type),
        )


def validate(cfg: ScoreConfig) -> None:
    """Everything checkable from configs, before any weights are loaded."""
    check_compatible(model_info(cfg.model), sae_info(cfg.sae), cfg.feature_ids)


def init_ray() -> None:
    import ray

    if not ray.is_initialized():
        # Under `ray job submit` RAY_ADDRESS points at the cluster; otherwise a local one starts.
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, logging_level=logging.WARNING)


def run(cfg: ScoreConfig, fail_after_batches: int | None = None) -> dict[str, Any]:
    """Score the pool into `cfg.out`; a finished output is kept (unless `overwrite`). Returns the manifest."""
    import ray

    validate(cfg)

    def build(ds, pool):  # noqa: ANN001, ANN202
        return ds.map_batches(
            FeatureScorer,
            fn_constructor_kwargs={"cfg": to_dict(cfg), "fail_after_batches": fail_after_batches},
            batch_size=cfg.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(min_size=cfg.min_actors, max_size=cfg.max_actors),
            num_gpus=cfg.num_gpus or None,
            num_cpus=cfg.num_cpus,
        )

    return run_stage("igds", cfg, cfg.pool, cfg.out, cfg.overwrite, build)


def run_stage(
    method: str,
    cfg: Any,
    pool_cfg: PoolConfig,
    out_uri: str,
    overwrite: bool,
    build: Callable[["ray.data.Dataset", Any], "ray.data.Dataset"],  # noqa: F821
) -> dict[str, Any]:
    """Discover the pool, `build(ds, pool)` the scoring plan, write it, check every pool row is there
    exactly once, commit. A finished output is kept unless `overwrite`. Returns the manifest.

    The same protocol as `igds_ray.stages.score.run` (and the same manifest keys, which `select`
    reads for `write_rows`), with a stronger exactly-once check: every (src_file, src_row) of the
    pool appears once, not just the right number of rows.
    """
    import pyarrow.dataset as pads

    from igds_ray import pool as P
    from igds_ray.storage import StageDir

    pool = P.discover(pool_cfg.path, pool_cfg.text_columns, pool_cfg.id_column)
    out = StageDir(out_uri)
    staging = out.begin(overwrite)
    if staging is None:
        log.info("%s is finished; skipping (overwrite=true recomputes)", out_uri)
        return out.manifest()
    init_ray()
    t0 = time.time()
    ds = build(P.read_pool(pool, pool_cfg.rows_per_read_task), pool)
    ds.write_parquet(staging, filesystem=out.fs if "://" in out_uri else None)
    wall = time.time() - t0

    written = pads.dataset(staging.split("://", 1)[-1] if "://" in staging else staging, format="parquet",
                           filesystem=out.fs)
    file_index = {f.rel: i for i, f in enumerate(pool.files)}
    keys, n_err, n_trunc, tokens = [], 0, 0, 0
    for batch in written.to_batches(columns=[S.ERROR, S.TRUNCATED, S.N_TOKENS, S.SRC_FILE, S.SRC_ROW]):
        n_err += batch.num_rows - batch.column(0).null_count
        n_trunc += int(np.asarray(batch.column(1).to_numpy(zero_copy_only=False)).sum())
        tokens += int(np.asarray(batch.column(2).to_numpy(zero_copy_only=False), dtype=np.int64).sum())
        try:
            f = np.array([file_index[r] for r in batch.column(3).to_pylist()], dtype=np.int64)
        except KeyError as e:
            raise StageOutputError(f"{method} wrote a row of unknown pool file {e}: not committing {out_uri}") from None
        keys.append(f << 40 | batch.column(4).to_numpy(zero_copy_only=False).astype(np.int64))
    allkeys = np.concatenate(keys) if keys else np.zeros(0, np.int64)
    n_rows, n_unique = len(allkeys), len(np.unique(allkeys))
    if n_rows != pool.num_rows or n_unique != pool.num_rows:
        raise StageOutputError(
            f"{method} wrote {n_rows} rows ({n_unique} distinct pool rows) for a pool of {pool.num_rows}: "
            f"not committing {out_uri}"
        )
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
        "wall_s": round(wall, 3),
    }
    return out.commit(staging, manifest)
