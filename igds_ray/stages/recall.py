"""Frequency recall: SAE latents that fire on most task prompts.

Each task example is rendered with several templates; each (example, template) is a unit. At the
configured positions (default: the prompt's last token; special tokens never) the full SAE
encode gives every latent's activation per unit. A latent is a candidate when it is active on
more than `min_frequency` of the units and its mean activation when active exceeds `min_act`;
candidates are ranked by that mean and the top N kept. Runs as Ray Data over the units with the
scorer's actor machinery (LM up to layer L, one model copy per actor).

Output `<run>/features/recall.parquet`: one row per latent active on at least one unit.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from igds_ray.config import IdentifyConfig, ModelConfig, RecallConfig, SAEConfig, from_dict, to_dict
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
from igds_ray.schema import FeatureId
from igds_ray.stages.score import PooledFeatureActs
from igds_ray.tasks import TaskDataError, TaskExample, get_task
from igds_ray.tokenize import ExampleBuilder

log = logging.getLogger(__name__)

RECALL_COLUMNS = ("feature", "index", "frequency", "mean_act", "mean_act_all", "n_active", "n_units",
                  "candidate", "rank")


class RecallActor:
    """Ray Data callable class: prompts in, per-latent (active count, activation sum) of the batch out."""

    def __init__(self, model: dict, sae: dict, layer: int, recall: dict) -> None:
        mcfg, scfg = from_dict(ModelConfig, model), from_dict(SAEConfig, sae)
        rcfg = from_dict(RecallConfig, recall)
        device = resolve_device(mcfg.device)
        if device.type == "cpu" and rcfg.num_cpus >= 1:
            torch.set_num_threads(max(1, int(rcfg.num_cpus)))
        tok = load_tokenizer(mcfg)
        self.positions = rcfg.positions
        self.builder = ExampleBuilder(tok, "last" if rcfg.positions == "last" else "max", rcfg.max_tokens)
        sae_model = load_sae(scfg, device)
        self.d_sae = int(sae_model.cfg.d_sae)
        self.acts = PooledFeatureActs(
            LayerRunner(load_model(mcfg, device, layers=layer + 1), layer), FeatureEncoder(sae_model, None),
            tok.pad_token_id,
            "last" if rcfg.positions == "last" else "max", rcfg.token_budget,
        )

    def unit_acts(self, prompts: list[str]) -> tuple[np.ndarray, int]:
        """[n_usable_units, d_sae] pooled activations, and how many prompts had nothing to read."""
        if self.positions == "last":
            built = self.builder.build_pairs(prompts, [""] * len(prompts))
        else:
            built = self.builder.build_text(prompts)
        examples = [b for b in built if not isinstance(b, str)]
        if not examples:
            return np.zeros((0, self.d_sae), np.float32), len(prompts)
        return self.acts(examples), len(prompts) - len(examples)

    def __call__(self, batch: pa.Table) -> pa.Table:
        acts, skipped = self.unit_acts(batch.column("prompt").to_pylist())
        active = acts > 0
        return pa.table({
            "n": [acts.shape[0]],
            "skipped": [skipped],
            "count": [active.sum(0).astype(np.int64).tolist()],
            "sum": [np.where(active, acts, 0).astype(np.float64).sum(0).tolist()],
        })


def recall_table(count: np.ndarray, total: np.ndarray, n_units: int, layer: int, cfg: RecallConfig) -> pa.Table:
    """Per-latent statistics, candidates flagged and ranked (pure function of the counts)."""
    idx = np.nonzero(count)[0]
    freq = count[idx] / max(n_units, 1)
    mean_act = total[idx] / count[idx]
    mean_all = total[idx] / max(n_units, 1)
    is_cand = (freq > cfg.min_frequency) & (mean_act > cfg.min_act)
    cand = idx[is_cand]
    # Rank by mean activation when active; ties by higher frequency, then lower index.
    order = sorted(range(len(cand)), key=lambda j: (-mean_act[is_cand][j], -freq[is_cand][j], cand[j]))
    rank = np.full(len(idx), -1, dtype=np.int64)
    pos = {int(cand[j]): r for r, j in enumerate(order)}
    for i, latent in enumerate(idx):
        if int(latent) in pos and pos[int(latent)] < cfg.top_n:
            rank[i] = pos[int(latent)]
    return pa.table({
        "feature": [str(FeatureId(layer, int(i))) for i in idx],
        "index": pa.array(idx, pa.int64()),
        "frequency": pa.array(freq, pa.float64()),
        "mean_act": pa.array(mean_act, pa.float64()),
        "mean_act_all": pa.array(mean_all, pa.float64()),
        "n_active": pa.array(count[idx], pa.int64()),
        "n_units": pa.array(np.full(len(idx), n_units), pa.int64()),
        "candidate": pa.array(rank >= 0),
        "rank": pa.array(rank, pa.int64()),
    })


def units(examples: list[TaskExample], task: Any, templates: tuple[int, ...]) -> list[dict]:
    n_t = task.num_templates
    bad = [t for t in templates if not 0 <= t < n_t]
    if bad:
        raise TaskDataError(f"recall.templates: index {bad[0]} but task {task.name!r} has {n_t} templates")
    return [{"id": ex.id, "template": t, "prompt": task.build_prompt(ex, t)} for ex in examples for t in templates]


def run(cfg: IdentifyConfig) -> pa.Table:
    """Write `<run>/features/recall.parquet` (skipped if finished) and return it."""
    import ray
    import pyarrow.parquet as pq

    from igds_ray.stages.score import init_ray
    from igds_ray.storage import StageDir, join
    from igds_ray.tasks import load_task_set

    mi, si = model_info(cfg.model), sae_info(cfg.sae)
    check_compatible(mi, si)
    out = StageDir(join(cfg.run_dir, "features", "recall.parquet"))
    staging = out.begin(cfg.overwrite)
    if staging is None:
        return pq.read_table(out.files()[0], filesystem=None if "://" not in out.uri else out.fs)
    task = get_task(cfg.task.name, **cfg.task.options)
    tset = load_task_set(task, cfg.task.source, split=cfg.task.split, columns=cfg.task.columns or None,
                         limit=cfg.recall.limit, seed=cfg.seed)
    rows = units(tset.examples, task, cfg.recall.templates)
    init_ray()
    t0 = time.time()
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // cfg.recall.batch_size, 64)))
    parts = ds.map_batches(
        RecallActor,
        fn_constructor_kwargs=dict(model=to_dict(cfg.model), sae=to_dict(cfg.sae), layer=si.layer,
                                   recall=to_dict(cfg.recall)),
        batch_size=cfg.recall.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=cfg.recall.actors),
        num_gpus=cfg.recall.num_gpus or None,
        num_cpus=cfg.recall.num_cpus,
    )
    count = np.zeros(si.d_sae, np.int64)
    total = np.zeros(si.d_sae, np.float64)
    n_units = skipped = 0
    for batch in parts.iter_batches(batch_format="pyarrow", batch_size=None):  # one small row per batch
        for r in batch.to_pylist():
            n_units += r["n"]
            skipped += r["skipped"]
            count += np.asarray(r["count"], np.int64)
            total += np.asarray(r["sum"], np.float64)
    if n_units == 0:
        raise TaskDataError(f"recall: none of the {len(rows)} task prompts has a token to read")
    table = recall_table(count, total, n_units, si.layer, cfg.recall)
    pq.write_table(table, f"{staging}/part-0.parquet", filesystem=None if "://" not in out.uri else out.fs)
    n_cand = int(pc.sum(table.column("candidate")).as_py() or 0)
    out.commit(staging, {
        "stage": "recall", "config": to_dict(cfg), "examples": len(tset.examples), "units": n_units,
        "skipped_units": skipped, "latents_active": table.num_rows, "candidates": min(n_cand, cfg.recall.top_n),
        "candidates_above_thresholds": n_cand, "wall_s": round(time.time() - t0, 3),
    })
    if n_cand == 0:
        log.warning("recall: no latent is active on more than %.0f%% of units with mean > %g",
                    100 * cfg.recall.min_frequency, cfg.recall.min_act)
    return table
