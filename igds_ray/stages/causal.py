"""Causal (interventional) filtering on Ray Tune.

The base model's task metric on a dev set is measured once; then one Tune trial per
(candidate latent x factor) generates on the same dev set with the latent multiplied by the factor
at the SAE's layer (every position, prefill and decode) and reports the metric and
delta = metric(intervened) - metric(base). Models are loaded once, in long-lived generation actors
(`gen_actors`, each with its resources); trials are thin clients of those actors, so a trial costs
one generation pass, not a model load. Latents with delta > 0 are ranked by their best delta and
the top k kept.

Each trial also measures the teacher-forced mean log-likelihood of the dev references under the
same intervention (one forward pass, no decoding): a cheap causal signal whose rank agreement with
the generation metric is reported, so large candidate sets can be pre-screened.

Outputs: `<run>/features/causal.parquet` (every trial), `<run>/features/features.json`
(chosen ids like `l14_p11575` with their delta, factor and recall stats). An interrupted search
is resumed with `Tuner.restore` from `<run>/features/tune/`: finished trials are not rerun.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from igds_ray.config import IdentifyConfig, to_dict
from igds_ray.errors import IGDSError
from igds_ray.schema import FeatureId

log = logging.getLogger(__name__)


class NoHelpfulFeature(IGDSError, RuntimeError):
    """No candidate latent improved the dev metric and no fallback was configured."""


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation with average ranks for ties (NaN if either side is constant)."""

    def ranks(v: np.ndarray) -> np.ndarray:
        order = np.argsort(v, kind="mergesort")
        r = np.empty(len(v), dtype=np.float64)
        r[order] = np.arange(len(v), dtype=np.float64)
        for val in np.unique(v):  # average ranks of ties
            m = v == val
            r[m] = r[m].mean()
        return r

    a, b = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(a) < 2 or np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan")
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


class GenerationWorker:
    """A long-lived generation actor: one model (+ SAE) copy, the dev set, the task metric."""

    def __init__(self, backend: str, model: dict, sae: dict, task: Any, examples: list[dict], template: int,
                 sampling: dict, layer: int, batch_size: int, loglik: bool) -> None:
        from igds_ray.config import ModelConfig, SAEConfig, from_dict
        from igds_ray.generation import SamplingConfig, make_backend
        from igds_ray.tasks import TaskExample

        t0 = time.time()
        kwargs = {"batch_size": batch_size} if backend == "hf" else {}
        self.backend = make_backend(backend, from_dict(ModelConfig, model), from_dict(SAEConfig, sae), **kwargs)
        self.load_s = time.time() - t0
        self.task = task
        self.examples = [TaskExample.from_dict(e) for e in examples]
        self.prompts = [task.build_prompt(e, template) for e in self.examples]
        self.references = [task.reference_answer(e) for e in self.examples]
        self.sampling = SamplingConfig(**sampling)
        self.layer = layer
        self.loglik = loglik
        self.calls = 0

    def info(self) -> dict:
        return {"load_s": self.load_s, "calls": self.calls}

    def evaluate(self, feature: int | None, factor: float | None) -> dict:
        from igds_ray.generation import Intervention

        self.calls += 1
        iv = None if feature is None else Intervention(self.layer, (int(feature),), float(factor))
        t0 = time.time()
        preds = self.backend.generate(self.prompts, self.sampling, iv)
        gen_s = time.time() - t0
        m = self.task.corpus_metric(preds, self.examples)
        out = {"metric": float(m["metric"]), "n": len(preds), "n_unparseable": int(m.get("n_unparseable", 0)),
               "gen_s": gen_s, "loglik": float("nan"), "loglik_s": float("nan")}
        if self.loglik:
            t1 = time.time()
            ll = self.backend.loglik(self.prompts, self.references, iv)
            out["loglik"] = float(np.nanmean(ll))
            out["loglik_s"] = time.time() - t1
        return out


def _trial(config: dict, actor_names: list[str], base: dict) -> None:
    import ray
    from ray import tune

    c = config["candidate"]
    actor = ray.get_actor(actor_names[c["slot"] % len(actor_names)])
    r = ray.get(actor.evaluate.remote(c["index"], c["factor"]))
    r["delta"] = r["metric"] - base["metric"]
    r["loglik_delta"] = r["loglik"] - base["loglik"]
    tune.report(r)


def _feature_agreement(trials: list[dict]) -> dict[str, Any]:
    """Per latent (best over factors): rank agreement of the log-likelihood gain with the metric gain,
    and whether both put the same latent first."""
    best_m: dict[int, float] = {}
    best_l: dict[int, float] = {}
    for t in trials:
        best_m[t["index"]] = max(best_m.get(t["index"], -np.inf), t["delta"])
        best_l[t["index"]] = max(best_l.get(t["index"], -np.inf), t["loglik_delta"])
    if len(best_m) < 2:
        return {"loglik_vs_metric_spearman_per_feature": None, "loglik_top1_matches_metric_top1": None}
    keys = sorted(best_m)
    top_m = max(keys, key=lambda i: (best_m[i], -i))
    top_l = max(keys, key=lambda i: (best_l[i], -i))
    return {
        "loglik_vs_metric_spearman_per_feature": spearman([best_l[i] for i in keys], [best_m[i] for i in keys]),
        "loglik_top1_matches_metric_top1": bool(top_m == top_l),
    }


def _root_error(err: BaseException | None) -> str:
    """The original exception of a failed trial, not Ray's chain of wrappers around it."""
    seen = 0
    while err is not None and getattr(err, "cause", None) is not None and seen < 10:
        err, seen = err.cause, seen + 1
    return f"{type(err).__name__}: {err}"[-2000:] if err is not None else "unknown error (no metrics reported)"


def choose(trials: list[dict], k: int) -> list[dict]:
    """Latents whose best delta > 0, ranked by best delta (then loglik gain, then recall rank); top k."""
    best: dict[int, dict] = {}
    for t in trials:
        if t["status"] != "ok" or not t["delta"] > 0:
            continue
        cur = best.get(t["index"])
        key = (t["delta"], np.nan_to_num(t["loglik_delta"], nan=-np.inf))
        if cur is None or key > (cur["delta"], np.nan_to_num(cur["loglik_delta"], nan=-np.inf)):
            best[t["index"]] = t
    ranked = sorted(best.values(), key=lambda t: (-t["delta"], -np.nan_to_num(t["loglik_delta"], nan=-np.inf),
                                                   t["recall_rank"], t["index"]))
    return ranked[:k]


def run(cfg: IdentifyConfig, recall_table: pa.Table | None = None) -> dict[str, Any]:
    """Run (or resume) the search; write causal.parquet and features.json; return features.json's content."""
    import os

    import pyarrow.parquet as pq
    import ray
    from ray import tune

    from igds_ray.models.loading import sae_info
    from igds_ray.stages.score import init_ray
    from igds_ray.storage import StageDir, exists, join, read_json, write_json_atomic
    from igds_ray.tasks import TaskDataError, get_task, load_task_set

    c = cfg.causal
    features_json = join(cfg.run_dir, "features", "features.json")
    out = StageDir(join(cfg.run_dir, "features", "causal.parquet"))
    if out.done() and exists(features_json) and not cfg.overwrite:
        return read_json(features_json)
    if recall_table is None:
        recall_table = pq.read_table(StageDir(join(cfg.run_dir, "features", "recall.parquet")).files()[0])
    rec = [r for r in recall_table.to_pylist() if r["candidate"]]
    rec.sort(key=lambda r: r["rank"])
    if not rec:
        raise NoHelpfulFeature(
            "recall found no candidate latent (none passes min_frequency/min_act): lower the thresholds or use "
            "more task examples"
        )
    si = sae_info(cfg.sae)
    task = get_task(cfg.task.name, **cfg.task.options)
    dev = load_task_set(task, cfg.task.dev_source or cfg.task.source, split=cfg.task.dev_split,
                        columns=cfg.task.columns or None, limit=c.dev_limit, seed=cfg.seed + 1)
    if len(dev.examples) < c.min_dev:
        raise TaskDataError(
            f"causal filtering needs at least causal.min_dev={c.min_dev} dev examples; "
            f"{cfg.task.dev_source or cfg.task.source} (split {cfg.task.dev_split}) has {len(dev.examples)} usable"
        )
    # Save Tune's experiment state every second (default: at least every 10 s), so a crash loses
    # at most the trials finished in the last second; the driver reads this when it builds the search.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    init_ray()
    t_start = time.time()
    sampling = dict(max_new_tokens=c.max_new_tokens, repetition_penalty=c.repetition_penalty,
                    stop=tuple(getattr(task, "stop_sequences", ()) or ()))
    Worker = ray.remote(GenerationWorker)
    tag = uuid.uuid4().hex[:8]
    names = [f"igds-gen-{tag}-{i}" for i in range(c.gen_actors)]
    actors = [
        Worker.options(name=n, num_cpus=c.gen_num_cpus, num_gpus=c.gen_num_gpus or None).remote(
            c.backend, to_dict(cfg.model), to_dict(cfg.sae), task, [e.to_dict() for e in dev.examples],
            c.template, sampling, si.layer, c.gen_batch_size, c.loglik)
        for n in names
    ]
    infos = ray.get([a.info.remote() for a in actors])
    t_loaded = time.time()
    base = ray.get(actors[0].evaluate.remote(None, None))
    log.info("base metric %.4f on %d dev examples", base["metric"], base["n"])

    candidates = [{"index": int(r["index"]), "factor": float(v), "slot": i, "recall_rank": int(r["rank"])}
                  for i, (r, v) in enumerate((r, v) for r in rec for v in c.factors)]
    trainable = tune.with_resources(tune.with_parameters(_trial, actor_names=names, base=base),
                                    {"cpu": c.trial_num_cpus})
    storage = os.path.abspath(join(cfg.run_dir, "features", "tune")) if "://" not in cfg.run_dir else join(
        cfg.run_dir, "features", "tune")
    path = join(storage, "causal")
    if tune.Tuner.can_restore(path) and not cfg.overwrite:
        log.info("resuming the causal search from %s", path)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"candidate": tune.grid_search(candidates)},
            # Trials are thin clients of the generation actors: reusing the trial actors saves a
            # process start per trial.
            tune_config=tune.TuneConfig(max_concurrent_trials=c.gen_actors, reuse_actors=True),
            run_config=tune.RunConfig(storage_path=storage, name="causal", verbose=0),
        )
    grid = tuner.fit()
    search_wall = time.time() - t_start
    calls = sum(i["calls"] for i in ray.get([a.info.remote() for a in actors]))
    for a in actors:
        ray.kill(a)

    by_rank = {int(r["index"]): r for r in rec}
    trials = []
    for res in grid:
        cand = res.config["candidate"]
        r = by_rank[cand["index"]]
        m = res.metrics or {}
        ok = res.error is None and "metric" in m
        trials.append({
            "feature": str(FeatureId(si.layer, cand["index"])), "index": cand["index"], "factor": cand["factor"],
            "status": "ok" if ok else "error", "error": None if ok else _root_error(res.error),
            "metric": m.get("metric", float("nan")) if ok else float("nan"),
            "delta": m.get("delta", float("nan")) if ok else float("nan"),
            "loglik": m.get("loglik", float("nan")) if ok else float("nan"),
            "loglik_delta": m.get("loglik_delta", float("nan")) if ok else float("nan"),
            "n_unparseable": m.get("n_unparseable", -1) if ok else -1,
            "gen_s": m.get("gen_s", float("nan")) if ok else float("nan"),
            "loglik_s": m.get("loglik_s", float("nan")) if ok else float("nan"),
            "recall_rank": cand["recall_rank"], "frequency": r["frequency"], "mean_act": r["mean_act"],
        })
    trials.sort(key=lambda t: (t["recall_rank"], t["factor"]))
    staging = out.begin(overwrite=True)
    pq.write_table(pa.Table.from_pylist(trials), f"{staging}/part-0.parquet",
                   filesystem=None if "://" not in out.uri else out.fs)
    ok = [t for t in trials if t["status"] == "ok"]
    ll_ok = [t for t in ok if not math.isnan(t["loglik_delta"])]
    load_wall = t_loaded - t_start
    summary = {
        "base_metric": base["metric"], "base_loglik": base["loglik"], "dev_examples": base["n"],
        "base_n_unparseable": base["n_unparseable"], "trials": len(trials), "failed_trials": len(trials) - len(ok),
        "evaluations_this_run": calls, "search_wall_s": round(search_wall, 3), "model_load_wall_s": round(load_wall, 3),
        "model_load_share": round(load_wall / search_wall, 4) if search_wall else None,
        "actor_load_s": [round(i["load_s"], 3) for i in infos],
        "mean_trial_gen_s": round(float(np.mean([t["gen_s"] for t in ok])), 4) if ok else None,
        "mean_trial_loglik_s": round(float(np.nanmean([t["loglik_s"] for t in ok])), 4) if ll_ok else None,
        "loglik_vs_metric_spearman": spearman([t["loglik_delta"] for t in ll_ok], [t["delta"] for t in ll_ok])
        if ll_ok else None,
        **_feature_agreement(ll_ok),
        "backend": c.backend,
    }
    out.commit(staging, {"stage": "causal", "config": to_dict(cfg), **summary})

    chosen = choose(trials, c.k)
    selected_by = "causal"
    if not chosen:
        if c.fallback != "top_recall":
            raise NoHelpfulFeature(
                f"no candidate latent improved the dev metric (base {base['metric']:.4f}; {len(ok)} trials ran, "
                f"{len(trials) - len(ok)} failed; best delta "
                f"{max((t['delta'] for t in ok), default=float('nan')):.4f}). Try more factors, a larger dev set, "
                "or causal.fallback: top_recall"
            )
        selected_by = "fallback:top_recall"
        top = rec[: c.k]
        chosen = [{"feature": str(FeatureId(si.layer, int(r["index"]))), "index": int(r["index"]), "factor": None,
                   "delta": None, "metric": None, "loglik_delta": None, "recall_rank": int(r["rank"]),
                   "frequency": r["frequency"], "mean_act": r["mean_act"]} for r in top]
    result = {
        "layer": si.layer,
        "features": [t["feature"] for t in chosen],
        "selected_by": selected_by,
        "details": [{k: t[k] for k in ("feature", "index", "factor", "delta", "metric", "loglik_delta",
                                        "recall_rank", "frequency", "mean_act")} for t in chosen],
        **summary,
    }
    write_json_atomic(features_json, result)
    return result
