"""Causal (interventional) filtering on Ray Tune, with paired statistics.

The dev examples are split (seeded) into a search part and a held-out confirm part
(`causal.confirm_fraction`). One Tune trial per (candidate latent x factor) generates on the search
part under the intervention at the SAE's layer (every position, prefill and decode): `scale` multiplies
the latent by the factor (the paper's amplification, 0 ablates); `clamp` sets it to factor x the
latent's p99 activation on the dev prompts. Each trial reports per-example scores and per-example
teacher-forced log-likelihoods of the references, so the driver pairs them with the base run on the
same examples (`causal_stats`): a mean delta with a bootstrap CI, a one-sided p-value (exact McNemar
for 0/1 scores, sign-flip otherwise) and Holm's correction across all trials. The top
`confirm_top` latents that pass are re-run with their best factor on the confirm part; a latent is
kept when that recheck passes Holm over the rechecked ones and the generation metric does not drop.

The base is run on every generation actor, twice (the noise floor): if the runs disagree, trials are
compared with the per-example worst case and a warning says so. Models are loaded once, in long-lived
generation actors (`gen_actors`); trials are thin clients of those actors.

Outputs: `<run>/features/causal.parquet` (every trial with its figures), `causal_examples.parquet`
(the per-example arrays), `features.json` (chosen ids like `l14_p11575` with their figures, how they
were selected, the noise floor). An interrupted search resumes with `Tuner.restore` from
`<run>/features/tune/`: finished trials are not rerun.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from typing import Any

import numpy as np
import pyarrow as pa

from igds_ray.config import IdentifyConfig, to_dict
from igds_ray.errors import IGDSError
from igds_ray.schema import FeatureId
from igds_ray.stages import causal_stats as st
from igds_ray.stages.causal_stats import choose, spearman

__all__ = ["GenerationWorker", "NoHelpfulFeature", "choose", "run", "spearman"]

log = logging.getLogger(__name__)
P99 = 0.99


class NoHelpfulFeature(IGDSError, RuntimeError):
    """No candidate latent passed the causal test and no fallback was configured."""


class GenerationWorker:
    """A long-lived generation actor: one model (+ SAE) copy, the dev set split in parts, the task metric."""

    def __init__(self, backend: str, model: dict, sae: dict, task: Any, examples: list[dict],
                 parts: dict[str, list[int]], template: int, sampling: dict, layer: int, batch_size: int,
                 loglik: bool, mode: str = "scale", features: tuple[int, ...] = (), num_gpus: float = 0.0) -> None:
        from igds_ray.config import ModelConfig, SAEConfig, from_dict
        from igds_ray.generation import SamplingConfig, make_backend
        from igds_ray.tasks import TaskExample

        t0 = time.time()
        exs = [TaskExample.from_dict(e) for e in examples]
        mcfg = from_dict(ModelConfig, model)
        if backend == "hf":
            kwargs: dict[str, Any] = {"batch_size": batch_size}
        else:  # the memory plan: a context as long as the longest dev sequence, a share of the GPU per engine
            from igds_ray.plan import vllm_options

            kwargs = vllm_options(mcfg, [task.build_prompt(e, template) for e in exs],
                                  [task.reference_answer(e) for e in exs] if loglik else [],
                                  int(sampling["max_new_tokens"]), num_gpus)
        self.backend = make_backend(backend, mcfg, from_dict(SAEConfig, sae), **kwargs)
        self.load_s = time.time() - t0
        self.task = task
        self.parts = {name: [exs[i] for i in idx] for name, idx in parts.items()}
        self.prompts = {name: [task.build_prompt(e, template) for e in ex] for name, ex in self.parts.items()}
        self.references = {name: [task.reference_answer(e) for e in ex] for name, ex in self.parts.items()}
        self.sampling = SamplingConfig(**sampling)
        self.layer = layer
        self.loglik = loglik
        self.mode = mode
        self.calls = {"base": 0, "trial": 0, "confirm": 0}
        self.p99: dict[int, float] = {}
        if mode == "clamp" and features:
            # Search prompts only, so the confirm part stays untouched by anything the search uses.
            qs = self.backend.activation_quantile(self.prompts["search"], layer, list(features), P99)
            self.p99 = {int(f): float(q) for f, q in zip(features, qs)}

    def info(self) -> dict:
        return {"load_s": self.load_s, "calls": dict(self.calls)}

    def act_p99(self) -> dict[int, float]:
        return dict(self.p99)

    def intervention(self, feature: int, factor: float) -> tuple[Any, float | None]:
        from igds_ray.generation import Intervention

        if self.mode == "clamp":
            value = float(factor) * self.p99[int(feature)]
            return Intervention(self.layer, (int(feature),), float(factor), mode="clamp", value=value), value
        return Intervention(self.layer, (int(feature),), float(factor)), None

    def evaluate(self, feature: int | None, factor: float | None, part: str = "search") -> dict:
        self.calls["base" if feature is None else ("trial" if part == "search" else "confirm")] += 1
        iv, value = (None, None) if feature is None else self.intervention(feature, factor)
        examples, prompts = self.parts[part], self.prompts[part]
        t0 = time.time()
        preds = self.backend.generate(prompts, self.sampling, iv)
        gen_s = time.time() - t0
        m = self.task.corpus_metric(preds, examples)
        scores = [float(self.task.score(p, e)) for p, e in zip(preds, examples)]
        out = {"metric": float(m["metric"]), "n": len(preds), "n_unparseable": int(m.get("n_unparseable", 0)),
               "gen_s": gen_s, "loglik": float("nan"), "loglik_s": float("nan"), "scores": scores,
               "logliks": [float("nan")] * len(preds), "clamp_value": value}
        if self.loglik:
            t1 = time.time()
            ll = [float(x) for x in self.backend.loglik(prompts, self.references[part], iv)]
            out.update(logliks=ll, loglik=float(np.nanmean(ll)) if not np.isnan(ll).all() else float("nan"),
                       loglik_s=time.time() - t1)
        return out


def _trial(config: dict, actor_names: list[str]) -> None:
    import ray
    from ray import tune

    c = config["candidate"]
    actor = ray.get_actor(actor_names[c["slot"] % len(actor_names)])
    tune.report(ray.get(actor.evaluate.remote(c["index"], c["factor"], "search")))


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


def _base_runs(actors: list[Any], parts: list[str]) -> tuple[dict[str, dict], dict[str, Any], list[dict]]:
    """The base on every actor, twice, per part: the base trials are compared with and the noise floor."""
    import ray

    jobs = [(a, r, p) for a in range(len(actors)) for r in range(2) for p in parts]
    runs = ray.get([actors[a].evaluate.remote(None, None, p) for a, r, p in jobs])
    bases, floor = {}, {"runs": []}
    for p in parts:
        mine = [run for (a, r, q), run in zip(jobs, runs) if q == p]
        bases[p], floor[p] = st.noise_floor(mine)
    floor["runs"] = [{"actor": a, "repeat": r, "part": p, "metric": run["metric"], "loglik": run["loglik"],
                      "n": run["n"]} for (a, r, p), run in zip(jobs, runs)]
    bad = [p for p in parts if floor[p]["base_is_worst_case"]]
    floor["base_used"] = "per-example worst case (max) over the base runs: they disagree" if bad else "the base runs agree"
    if bad:
        log.warning("base runs disagree on the %s part(s) (max metric difference %s, examples disagreeing %s): every "
                    "trial is compared with the per-example worst case", ", ".join(bad),
                    [floor[p]["metric_max_abs_diff"] for p in bad], [floor[p]["examples_disagreeing"] for p in bad])
    examples = [{"kind": "base", "feature": None, "factor": None, "part": p, "actor": a, "repeat": r,
                 "scores": run["scores"], "logliks": run["logliks"]} for (a, r, p), run in zip(jobs, runs)]
    return bases, floor, examples


def _collect(grid: Any, by_index: dict[int, dict], layer: int, p99: dict[int, float]) -> list[dict]:
    nan = float("nan")
    trials = []
    for res in grid:
        cand = res.config["candidate"]
        r = by_index[cand["index"]]
        m = res.metrics or {}
        ok = res.error is None and "metric" in m and "scores" in m
        trials.append({
            "feature": str(FeatureId(layer, cand["index"])), "index": cand["index"], "factor": cand["factor"],
            "status": "ok" if ok else "error", "error": None if ok else _root_error(res.error),
            "metric": m.get("metric", nan) if ok else nan, "loglik": m.get("loglik", nan) if ok else nan,
            "n_unparseable": m.get("n_unparseable", -1) if ok else -1,
            "gen_s": m.get("gen_s", nan) if ok else nan, "loglik_s": m.get("loglik_s", nan) if ok else nan,
            "clamp_value": m.get("clamp_value") if ok else None, "act_p99": p99.get(cand["index"]),
            "recall_rank": cand["recall_rank"], "frequency": r["frequency"], "mean_act": r["mean_act"],
            "scores": list(m["scores"]) if ok else None, "logliks": list(m["logliks"]) if ok else None,
        })
    trials.sort(key=lambda t: (t["recall_rank"], t["factor"]))
    return trials


CONFIRM_COLUMNS = ("confirm_delta", "confirm_ci_low", "confirm_ci_high", "confirm_p", "confirm_p_holm",
                   "confirm_metric_delta", "confirm_test", "n_confirm")
DETAIL_COLUMNS = ("feature", "index", "factor", "metric", "delta", "delta_ci_low", "delta_ci_high", "p_value",
                  "p_holm", "test", "loglik_delta", "loglik_ci_low", "loglik_ci_high", "loglik_p", "loglik_p_holm",
                  "passed_holm", *CONFIRM_COLUMNS, "clamp_value", "act_p99", "recall_rank", "frequency", "mean_act")


def _select(trials: list[dict], actors: list[Any], bases: dict[str, dict], cfg: IdentifyConfig,
            seed: int) -> tuple[list[dict], list[dict], list[dict]]:
    """Holm over the search trials, then the held-out recheck; marks `selection_rank` and `kept` in place.
    Returns (ranked latents, rechecked, per-example rows of the recheck)."""
    import ray

    c = cfg.causal
    st.assess(trials, bases["search"], alpha=c.alpha, rank_by=c.rank_by, n_boot=c.n_boot, seed=seed)
    ranked = st.rank_latents(trials, c.rank_by)
    for t in trials:
        t.update({"selection_rank": -1, "kept": False, **{k: None if k == "confirm_test" else float("nan")
                                                           for k in CONFIRM_COLUMNS}})
    for i, t in enumerate(ranked):
        t["selection_rank"] = i
    if c.confirm_fraction == 0:
        for t in ranked:
            t["kept"] = True
        return ranked, [], []
    rechecked = ranked[: c.confirm_top]
    runs = ray.get([actors[i % len(actors)].evaluate.remote(t["index"], t["factor"], "confirm")
                    for i, t in enumerate(rechecked)])
    for t, r in zip(rechecked, runs):
        t["confirm_scores"], t["confirm_logliks"] = r["scores"], r["logliks"]
    st.confirm(rechecked, bases["confirm"], alpha=c.alpha, rank_by=c.rank_by, n_boot=c.n_boot, seed=seed)
    rows = [{"kind": "confirm", "feature": t["feature"], "factor": t["factor"], "part": "confirm", "actor": None,
             "repeat": None, "scores": t.pop("confirm_scores"), "logliks": t.pop("confirm_logliks")} for t in rechecked]
    return ranked, rechecked, rows


def run(cfg: IdentifyConfig, recall_table: pa.Table | None = None) -> dict[str, Any]:
    """Run (or resume) the search; write causal.parquet and features.json; return features.json's content."""
    import os

    import pyarrow.parquet as pq
    import ray
    from ray import tune

    from igds_ray.models.loading import sae_info
    from igds_ray.stages.score import init_ray
    from igds_ray.storage import StageDir, exists, filesystem, join, read_json, write_json_atomic
    from igds_ray.tasks import TaskDataError, get_task, load_task_set

    c = cfg.causal
    seed = cfg.seed if c.stats_seed is None else c.stats_seed
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
    try:
        search_idx, confirm_idx = st.split_dev(len(dev.examples), c.confirm_fraction, seed)
    except ValueError as e:
        raise TaskDataError(str(e)) from None
    parts = {"search": search_idx, **({"confirm": confirm_idx} if confirm_idx else {})}
    # Save Tune's experiment state every second (default: at least every 10 s), so a crash loses
    # at most the trials finished in the last second; the driver reads this when it builds the search.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    init_ray()
    t_start = time.time()
    sampling = dict(max_new_tokens=c.max_new_tokens, repetition_penalty=c.repetition_penalty,
                    stop=tuple(getattr(task, "stop_sequences", ()) or ()))
    Worker = ray.remote(GenerationWorker)
    names = [f"igds-gen-{uuid.uuid4().hex[:8]}-{i}" for i in range(c.gen_actors)]
    cand_ids = tuple(int(r["index"]) for r in rec)
    actors = [
        Worker.options(name=n, num_cpus=c.gen_num_cpus, num_gpus=c.gen_num_gpus or None).remote(
            c.backend, to_dict(cfg.model), to_dict(cfg.sae), task, [e.to_dict() for e in dev.examples], parts,
            c.template, sampling, si.layer, c.gen_batch_size, c.loglik, c.mode, cand_ids, c.gen_num_gpus)
        for n in names
    ]
    infos = ray.get([a.info.remote() for a in actors])
    p99 = ray.get(actors[0].act_p99.remote())
    t_loaded = time.time()
    bases, floor, example_rows = _base_runs(actors, list(parts))
    log.info("base metric %.4f on %d search examples", bases["search"]["metric"], len(search_idx))

    candidates = [{"index": int(r["index"]), "factor": float(v), "slot": i, "recall_rank": int(r["rank"])}
                  for i, (r, v) in enumerate((r, v) for r in rec for v in c.factors)]
    trainable = tune.with_resources(tune.with_parameters(_trial, actor_names=names), {"cpu": c.trial_num_cpus})
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
    trials = _collect(grid, {int(r["index"]): r for r in rec}, si.layer, p99)
    ranked, rechecked, confirm_rows = _select(trials, actors, bases, cfg, seed)
    search_wall = time.time() - t_start
    calls = [i["calls"] for i in ray.get([a.info.remote() for a in actors])]
    for a in actors:
        ray.kill(a)

    example_rows += [{"kind": "trial", "feature": t["feature"], "factor": t["factor"], "part": "search",
                      "actor": None, "repeat": None, "scores": t.pop("scores"), "logliks": t.pop("logliks")}
                     for t in trials] + confirm_rows
    fs, ex_path = filesystem(join(cfg.run_dir, "features", "causal_examples.parquet"))
    fs.create_dir(ex_path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(pa.Table.from_pylist(example_rows), ex_path, filesystem=fs)
    staging = out.begin(overwrite=True)
    pq.write_table(pa.Table.from_pylist(trials), f"{staging}/part-0.parquet",
                   filesystem=None if "://" not in out.uri else out.fs)
    ok = [t for t in trials if t["status"] == "ok"]
    ll_ok = [t for t in ok if not math.isnan(t["loglik_delta"])]
    load_wall = t_loaded - t_start
    summary = {
        "base_metric": bases["search"]["metric"], "base_loglik": bases["search"]["loglik"],
        "base_confirm_metric": bases["confirm"]["metric"] if "confirm" in bases else None,
        "dev_examples": len(dev.examples), "n_search": len(search_idx), "n_confirm": len(confirm_idx),
        "trials": len(trials), "failed_trials": len(trials) - len(ok), "latents_passed_holm": len(ranked),
        "rechecked": len(rechecked), "alpha": c.alpha, "rank_by": c.rank_by, "mode": c.mode, "n_boot": c.n_boot,
        "stats_seed": seed, "tests": sorted({t["test"] for t in ok} | {t["loglik_test"] for t in ll_ok}),
        "noise_floor": floor,
        "evaluations_this_run": sum(sum(x.values()) for x in calls),
        "trial_evaluations_this_run": sum(x["trial"] for x in calls),
        "search_wall_s": round(search_wall, 3), "model_load_wall_s": round(load_wall, 3),
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
    selected_by, reason = "causal", None
    if not chosen:
        reason = st.fallback_reason(trials, ranked, rechecked, alpha=c.alpha, rank_by=c.rank_by)
        if c.fallback != "top_recall":
            raise NoHelpfulFeature(
                f"no candidate latent passed the causal test: {reason}; base {bases['search']['metric']:.4f} on "
                f"{len(search_idx)} search examples, {len(ok)} trials ran, {len(trials) - len(ok)} failed. Try "
                "more factors, causal.mode: clamp, causal.rank_by: loglik (a continuous measure, for a base that gets "
                "few dev examples right), a larger dev set, or causal.fallback: top_recall"
            )
        log.warning("causal filter kept no latent (%s): falling back to the top recalled latent(s)", reason)
        selected_by = "fallback"
        chosen = [{"feature": str(FeatureId(si.layer, int(r["index"]))), "index": int(r["index"]),
                   "recall_rank": int(r["rank"]), "frequency": r["frequency"], "mean_act": r["mean_act"],
                   "act_p99": p99.get(int(r["index"]))} for r in rec[: c.k]]
    result = {
        "layer": si.layer,
        "features": [t["feature"] for t in chosen],
        "selected_by": selected_by,
        "fallback_reason": reason,
        "details": [{k: t.get(k) for k in DETAIL_COLUMNS} for t in chosen],
        **summary,
    }
    write_json_atomic(features_json, result)
    return result
