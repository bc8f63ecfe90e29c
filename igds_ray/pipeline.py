"""`igds run`: the whole IGDS pipeline, each stage skipped when its output is finished.

identify (recall + causal) -> score the pool with the chosen features -> select every arm (IGDS,
its ablations, the baselines) -> fine-tune every arm -> evaluate base + arms -> report.
Arms:
- `igds`: the chosen features (top k by causal delta); `igds_k5`: the top 5 of the same search;
  `igds_no_causal`: the top recalled latent, no causal filtering; `igds_no_recall`: causal filtering
  over a random set of latents instead of the recalled candidates; `igds_response`: latents that fire
  more on the base model's correct dev answers than on its wrong ones (`stages/contrast.py`), read
  over the pool's responses (`contrast.pooling`) whatever `score.pooling` is;
- `random`, `loss`, `ifd`, `zip`: the baselines (`igds_ray.baselines`); `full`: every usable row.
Every stage writes a ledger record (wall time, resources, tokens) that the report prices.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal

import numpy as np

from igds_ray.baselines import LABEL_ARMS  # noqa: F401  (re-exported for the demo)
from igds_ray.config import (
    CausalConfig,
    ConfigError,
    IdentifyConfig,
    ModelConfig,
    PoolConfig,
    RecallConfig,
    SAEConfig,
    ScoreConfig,
    SelectConfig,
    TaskConfig,
    _help,
    from_dict,
    to_dict,
)
from igds_ray.ledger import Record, read_all, record
from igds_ray.monitor import MonitorConfig
from igds_ray.rounds import RoundsConfig
from igds_ray.stages.cards import CardsConfig
from igds_ray.stages.contrast import ContrastConfig
from igds_ray.stages.evaluate import EvalConfig
from igds_ray.storage import StageDir, exists, join, read_json, write_json_atomic

log = logging.getLogger(__name__)

IGDS_ARMS = ("igds", "igds_k5", "igds_no_causal", "igds_no_recall", "igds_response")
BASELINE_ARMS = ("full", "random", "loss", "ifd", "zip", "oracle")


@dataclass(frozen=True)
class ScoreOptions:
    pooling: Literal["last", "max", "mean", "prompt_max", "prompt_mean"] = _help(
        "Feature-Resonant Score pooling: last prompt token; max/mean over the response; prompt_max/prompt_mean over "
        "every prompt token (what recall.positions=all reads)", default="last")
    max_tokens: int = _help("tokens per example", default=1024)
    token_budget: int = _help("padded tokens per forward micro-batch", default=16384)
    batch_size: int = _help("rows per Ray Data batch", default=512)
    min_actors: int = _help("scorer actors, minimum", default=1)
    max_actors: int = _help("scorer actors, maximum", default=1)
    num_gpus: float = _help("GPUs per scorer actor", default=0.0)
    num_cpus: float = _help("CPUs per scorer actor", default=1.0)
    incremental: bool = _help("a rerun on a grown pool scores only its new and changed files (a new scores version)",
                              default=False)


@dataclass(frozen=True)
class ReportOptions:
    price_per_gpu_hour: float = _help("$ per GPU-hour for the cost column", default=2.5)
    price_per_cpu_hour: float = _help("$ per CPU-hour for the cost column", default=0.05)
    correct_column: str | None = _help("a boolean pool column (true: correct answer, false: wrong, null: neither; "
                                       "never read by selection): the report gives each IGDS scores directory's "
                                       "AUROC for correct against wrong rows", default=None)
    label_column: str | None = _help("a pool column of row labels (e.g. a quality or source tag, never read by "
                                     "selection): the report tabulates each arm's share of every label", default=None)


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = _help("the base model")
    sae: SAEConfig = _help("the SAE whose latents are searched")
    task: TaskConfig = _help("the task (recall/dev/test data, metric)")
    pool: PoolConfig = _help("the data pool to select from (prompt + response columns)")
    run_dir: str = _help("run directory (local, s3://, gs://)")
    fraction: float = _help("fraction of the pool each selection arm keeps [paper: 0.5]", default=0.5)
    arms: tuple[str, ...] = _help("arms to train and evaluate", default=("igds", "full", "random", "loss", "ifd", "zip"))
    recall: RecallConfig = _help("frequency recall", default_factory=RecallConfig)
    causal: CausalConfig = _help("causal filtering", default_factory=CausalConfig)
    score: ScoreOptions = _help("pool scoring", default_factory=ScoreOptions)
    baselines: dict[str, dict[str, Any]] = _help("options per baseline scorer: {random: {...}, lm: {...}, zip: {...}}",
                                      default_factory=dict)
    finetune: dict[str, Any] = _help("FinetuneConfig keys shared by all arms (lr, epochs, budget, lora_r, ...)",
                                     default_factory=dict)
    evaluate: EvalConfig = _help("evaluation", default_factory=EvalConfig)
    report: ReportOptions = _help("report prices", default_factory=ReportOptions)
    cards: CardsConfig = _help("feature cards (report/cards.json, rendered into report.html)",
                               default_factory=CardsConfig)
    monitor: MonitorConfig = _help("igds monitor: drift thresholds, the monitor set", default_factory=MonitorConfig)
    rounds: RoundsConfig = _help("continuous selection: continue a finished run (round N) as round N+1",
                                 default_factory=RoundsConfig)
    no_recall_candidates: int = _help("random latents searched by the igds_no_recall ablation", default=0)
    contrast: ContrastConfig = _help("latents telling correct answers from wrong ones (the igds_response arm)",
                                     default_factory=ContrastConfig)
    finetune_concurrency: int = _help(
        "arms fine-tuned at once, each in its own Ray task (0: as many as the cluster's CPUs, or GPUs, hold "
        "side by side; 1: one after another). An arm's result does not depend on it", default=1)
    seed: int = _help("seed for sampling, random baseline, training", default=0)
    overwrite: bool = _help("recompute every stage", default=False)
    gpu_type: str | None = _help(
        "GPU type of the cluster's GPU workers (A10G-24GB, L4-24GB, A100-40GB, A100-80GB, H100-80GB, H200-141GB): "
        "`igds run` refuses, before any compute, a config whose stage cannot fit it (`igds plan` shows the "
        "arithmetic); default: the type a running Ray cluster's GPU nodes advertise, else no check", default=None)

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"fraction must be in (0, 1], got {self.fraction}")
        known = set(IGDS_ARMS) | set(BASELINE_ARMS)
        bad = [a for a in self.arms if a not in known]
        if bad:
            raise ConfigError(f"arms: unknown arm {bad[0]!r} (known: {', '.join(sorted(known))})")
        if len(set(self.arms)) != len(self.arms):
            raise ConfigError("arms: an arm is listed twice")
        unknown = set(self.baselines) - {"random", "lm", "zip", "oracle"}
        if unknown:
            raise ConfigError(f"baselines: unknown scorer {sorted(unknown)[0]!r} (known: random, lm, zip, oracle)")
        if self.pool.text_column:
            raise ConfigError("pool: training needs prompt + response columns, not pool.text_column")
        if self.gpu_type is not None:
            from igds_ray.hardware import gpu_type

            gpu_type(self.gpu_type)  # names the known types when it is not one
        if self.finetune_concurrency < 0:
            raise ConfigError(f"finetune_concurrency must be >= 0 (0: auto), got {self.finetune_concurrency}")


class Pipeline:
    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.run_dir = cfg.run_dir
        # arms that failed before fine-tuning (the error, as the report shows it); the others go on
        self.arm_failures: dict[str, str] = {}
        from igds_ray.progress import Progress

        self.progress = Progress()
        # round N when this run continues it (`rounds.continue_from`); facts for the ledger across rounds
        self.prev = None
        self.round_facts: dict[str, Any] = {"arms": {}}
        if cfg.rounds.continue_from:
            from igds_ray import rounds

            self.prev = rounds.previous_config(cfg.rounds.continue_from)
            rounds.check_continuation(cfg, self.prev)

    # -- bookkeeping ---------------------------------------------------------------------------

    def _done_records(self) -> set[tuple[str, str]]:
        return {(r.stage, r.arm) for r in read_all(self.run_dir) if r.status == "ok"}

    def stage(self, name: str, arm: str, fn: Callable[[], Any], cpus: float = 0.0, gpus: float = 0.0,
              used_by: list[str] | None = None, tokens: Callable[[Any], int | None] | None = None,
              rows: Callable[[Any], int | None] | None = None) -> Any:
        """Run one stage and record it; a stage already recorded as ok is still called (it skips its own
        finished output) but its original record is kept."""
        had = (name, arm) in self._done_records()
        t0 = time.time()
        try:
            out = fn()
        except Exception as e:
            self.record_stage(name, arm, t0, had, error=e, cpus=cpus, gpus=gpus, used_by=used_by)
            raise
        self.record_stage(name, arm, t0, had, out=out, cpus=cpus, gpus=gpus, used_by=used_by, tokens=tokens,
                          rows=rows)
        return out

    def record_stage(self, name: str, arm: str, t0: float, had: bool, out: Any = None,
                     error: BaseException | None = None, cpus: float = 0.0, gpus: float = 0.0,
                     used_by: list[str] | None = None, tokens: Callable[[Any], int | None] | None = None,
                     rows: Callable[[Any], int | None] | None = None) -> None:
        """The ledger record of a stage that started at `t0` (`had`: it was already recorded as ok)."""
        wall = time.time() - t0
        n_rows = rows(out) if rows and error is None else None
        if error is not None:
            record(self.run_dir, Record(stage=name, arm=arm, status="failed", wall_s=wall, cpus=cpus,
                                        gpus=gpus, error=f"{type(error).__name__}: {error}"[:2000],
                                        extra={"used_by": used_by or []}))
        elif not had:
            record(self.run_dir, Record(stage=name, arm=arm, wall_s=wall, cpus=cpus, gpus=gpus,
                                        tokens=tokens(out) if tokens else None, rows=n_rows,
                                        extra={"used_by": used_by or []}))
        self.progress.note(name, arm, wall, n_rows, "failed" if error is not None else "ok", recorded=not had)

    # -- feature identification ------------------------------------------------------------------

    def identify_cfg(self, run_dir: str | None = None, **causal: Any) -> IdentifyConfig:
        c = self.cfg
        return IdentifyConfig(model=c.model, sae=c.sae, task=c.task, run_dir=run_dir or c.run_dir, recall=c.recall,
                              causal=dataclasses.replace(c.causal, **causal), seed=c.seed, overwrite=c.overwrite)

    def feature_sets(self) -> dict[str, list[str]]:
        from igds_ray.stages import causal, recall

        c = self.cfg
        igds_arms = [a for a in c.arms if a in IGDS_ARMS]
        if not igds_arms:
            return {}
        if self.prev is not None:  # a continued round: round N's features, no recall or causal pass
            from igds_ray import rounds

            sets = self.stage("features", "-", lambda: rounds.inherit_features(c, self.prev), used_by=igds_arms)
            return {a: sets[a] for a in igds_arms if a in sets}
        rc, cc = c.recall, c.causal
        icfg = self.identify_cfg()
        # igds_response reads answers, not recalled prompt latents: alone, it needs no recall.
        needs_recall = [a for a in igds_arms if a != "igds_response"]
        table = self.stage("recall", "-", lambda: recall.run(icfg), cpus=rc.actors * rc.num_cpus,
                           gpus=rc.actors * rc.num_gpus, used_by=needs_recall) if needs_recall else None
        sets: dict[str, list[str]] = {}
        needs_causal = [a for a in igds_arms if a in ("igds", "igds_k5")]
        if needs_causal:
            res = self.stage("causal", "-", lambda: causal.run(icfg, recall_table=table),
                             cpus=cc.gen_actors * cc.gen_num_cpus, gpus=cc.gen_actors * cc.gen_num_gpus,
                             used_by=needs_causal)
            sets["igds"] = list(res["features"])
            if "igds_k5" in igds_arms:
                import pandas as pd

                trials = pd.read_parquet(StageDir(join(c.run_dir, "features", "causal.parquet")).files()[0])
                top5 = causal.choose(trials.to_dict("records"), 5)
                sets["igds_k5"] = [t["feature"] for t in top5] or list(res["features"])
        if "igds_no_causal" in igds_arms:
            cands = sorted((r for r in table.to_pylist() if r["candidate"]), key=lambda r: r["rank"])
            if not cands:
                raise ConfigError("igds_no_causal: recall found no candidate latent")
            sets["igds_no_causal"] = [cands[0]["feature"]]
        if "igds_no_recall" in igds_arms:
            sets["igds_no_recall"] = self.stage(
                "causal_no_recall", "-", self._no_recall, cpus=cc.gen_actors * cc.gen_num_cpus,
                gpus=cc.gen_actors * cc.gen_num_gpus, used_by=["igds_no_recall"])
        if "igds_response" in igds_arms:
            from igds_ray.stages import contrast
            from igds_ray.tasks import TaskDataError

            ct = c.contrast
            try:
                sets["igds_response"] = list(self.stage(
                    "contrast", "-", lambda: contrast.run(icfg, ct), cpus=ct.num_cpus, gpus=ct.num_gpus,
                    used_by=["igds_response"])["features"])
            except TaskDataError as e:
                # The base's dev answers cannot be contrasted (e.g. it gets almost none right): this arm
                # fails, named in the report with the reason, and the other arms go on.
                log.error("arm igds_response failed: %s", e)
                self.arm_failures["igds_response"] = f"{type(e).__name__}: {e}"
        write_json_atomic(join(c.run_dir, "features", "arms.json"), sets)
        return {a: sets[a] for a in igds_arms if a in sets}

    def _no_recall(self) -> list[str]:
        """Causal filtering over random latents (as many as recall's candidates, or no_recall_candidates)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from igds_ray.models.loading import sae_info
        from igds_ray.schema import FeatureId
        from igds_ray.stages import causal

        c = self.cfg
        sub = join(c.run_dir, "ablations", "igds_no_recall")
        fj = join(sub, "features", "features.json")
        if exists(fj) and not c.overwrite:
            return list(read_json(fj)["features"])
        main = pq.read_table(StageDir(join(c.run_dir, "features", "recall.parquet")).files()[0]).to_pylist()
        n = c.no_recall_candidates or max(1, min(c.recall.top_n, sum(r["candidate"] for r in main)))
        si = sae_info(c.sae)
        rng = np.random.default_rng(c.seed + 7)
        idx = sorted(rng.choice(si.d_sae, size=min(n, si.d_sae), replace=False).tolist())
        table = pa.table({"feature": [str(FeatureId(si.layer, i)) for i in idx], "index": idx,
                          "frequency": [float("nan")] * len(idx), "mean_act": [float("nan")] * len(idx),
                          "candidate": [True] * len(idx), "rank": list(range(len(idx)))})
        res = causal.run(self.identify_cfg(run_dir=sub, fallback="top_recall"), recall_table=table)
        return list(res["features"])

    # -- data ------------------------------------------------------------------------------------

    def score_igds(self, arms: list[str], features: list[str], pooling: str | None = None) -> str:
        from igds_ray.stages import score

        c, s = self.cfg, self.cfg.score
        pooling = pooling or s.pooling
        # Arms with the same feature set and pooling share one scores directory (named as before
        # when the pooling is score.pooling's).
        key = "_".join(features) + ("" if pooling == s.pooling else f"_{pooling}")
        out = join(c.run_dir, "scores", f"frs_{key}")
        incremental, shared = s.incremental, None
        if self.prev is not None:
            from igds_ray import rounds

            shared = rounds.shared_scores(self.prev, key)
            if shared:  # the scores every round of this line grows: only new and changed files are forwarded
                out, incremental = shared, True
        # Raw pool prompts are scored in the template causal filtering generated with (one of recall's).
        if c.pool.template_index not in (0, c.causal.template):
            log.warning("pool.template_index=%d is replaced by causal.template=%d for scoring",
                        c.pool.template_index, c.causal.template)
        pool = dataclasses.replace(c.pool, template_index=c.causal.template)
        cfg = ScoreConfig(model=c.model, sae=c.sae, features=tuple(features), pool=pool, out=out,
                          pooling=pooling, max_tokens=s.max_tokens, token_budget=s.token_budget,
                          batch_size=s.batch_size, min_actors=s.min_actors, max_actors=s.max_actors,
                          num_gpus=s.num_gpus, num_cpus=s.num_cpus, overwrite=c.overwrite and not shared,
                          incremental=incremental,
                          task=c.task.name, task_options=dict(c.task.options))
        self.stage(f"score_{key}", "-", lambda: score.run(cfg), cpus=s.max_actors * s.num_cpus,
                   gpus=s.max_actors * s.num_gpus, used_by=arms, tokens=lambda m: m.get("tokens"),
                   rows=lambda m: m.get("rows"))
        return out

    def score_baseline(self, scorer: str, arms: list[str]) -> str:
        from igds_ray.baselines import lm, oracle, random, zip as zip_
        from igds_ray.baselines.lm import LMConfig
        from igds_ray.baselines.oracle import OracleConfig
        from igds_ray.baselines.random import RandomConfig
        from igds_ray.baselines.zip import ZipConfig

        c = self.cfg
        out = join(c.run_dir, "scores", scorer)
        opts = dict(c.baselines.get(scorer, {}))
        base = dict(pool=to_dict(c.pool), out=out, overwrite=c.overwrite)
        if scorer == "random":
            cfg = from_dict(RandomConfig, {"seed": c.seed, **opts, **base})
            fn, cpus, gpus = (lambda: random.run(cfg)), cfg.num_cpus, 0.0
        elif scorer == "oracle":
            cfg = from_dict(OracleConfig, {"seed": c.seed, **opts, **base})
            fn, cpus, gpus = (lambda: oracle.run(cfg)), cfg.num_cpus, 0.0
        elif scorer == "lm":
            cfg = from_dict(LMConfig, {**opts, **base, "model": to_dict(c.model)})
            fn, cpus, gpus = (lambda: lm.run(cfg)), cfg.actors * cfg.num_cpus, cfg.actors * cfg.num_gpus
        else:
            cfg = from_dict(ZipConfig, {"seed": c.seed, **opts, **base})
            fn, cpus, gpus = (lambda: zip_.run(cfg)), cfg.num_cpus, 0.0
        self.stage(f"score_{scorer}", "-", fn, cpus=cpus, gpus=gpus, used_by=arms,
                   rows=lambda m: m.get("rows"))
        return out

    def select(self, arm: str, scores: str, **kw: Any) -> str:
        from igds_ray.stages import select

        c = self.cfg
        cfg = SelectConfig(scores=scores, out=join(c.run_dir, "selection"), arm=arm,
                           **{"fraction": c.fraction, **kw}, overwrite=c.overwrite, tie_seed=c.seed)
        self.stage("select", arm, lambda: select.run(cfg), cpus=1.0, rows=lambda m: m.get("rows"))
        return join(c.run_dir, "selection", f"{arm}.parquet")

    def selections(self, features: dict[str, list[str]]) -> dict[str, str]:
        from igds_ray.baselines import ARMS

        c = self.cfg
        out: dict[str, str] = {}
        by_features: dict[tuple[tuple[str, ...], str], list[str]] = {}
        for arm in c.arms:
            if arm in IGDS_ARMS and arm in features:  # an arm missing here failed before (arm_failures)
                # igds_response reads its latents over the responses, whatever score.pooling is.
                pooling = c.contrast.pooling if arm == "igds_response" else c.score.pooling
                by_features.setdefault((tuple(features[arm]), pooling), []).append(arm)
        self.progress.expect("select", len([a for a in c.arms if a in BASELINE_ARMS or a in features]))
        for (feats, pooling), arms in by_features.items():
            scores = self.score_igds(arms, list(feats), pooling)
            for arm in arms:
                out[arm] = self.select(arm, scores)
        by_scorer: dict[str, list[str]] = {}
        for arm in c.arms:
            if arm in BASELINE_ARMS:
                by_scorer.setdefault(ARMS[arm].scorer or "random", []).append(arm)
        for scorer, arms in by_scorer.items():
            scores = self.score_baseline(scorer, arms)
            for arm in arms:
                a = ARMS[arm]
                out[arm] = self.select(arm, scores, score_column=a.score_column, max_score=a.max_score,
                                       fraction=a.fraction or c.fraction)
        return out

    # -- models ----------------------------------------------------------------------------------

    def finetune_config(self, arm: str, data: str, start: dict[str, Any] | None = None) -> Any:
        """`start` (a continued round): {"model": ...} or {"init_adapter": ...}, round N's model of the arm."""
        from igds_ray.stages import finetune

        c = self.cfg
        return from_dict(finetune.FinetuneConfig, {
            "seed": c.seed, **c.finetune, "model": to_dict(c.model), **(start or {}), "data": data,
            "out": join(c.run_dir, "models", arm), "arm": arm, "overwrite": c.overwrite,
            "prompt_column": c.pool.prompt_column, "response_column": c.pool.response_column,
            "chat_template": c.pool.chat_template})

    def finetune_slots(self, fcs: list[Any]) -> int:
        """How many arms to fine-tune at once: `finetune_concurrency`, or (0) as many as the cluster's
        CPUs (GPUs when the arms train on GPUs) hold side by side, never more than the arms."""
        n = self.cfg.finetune_concurrency
        if n == 0:
            import ray

            from igds_ray.stages.score import init_ray

            init_ray()
            total = ray.cluster_resources()
            fc = fcs[0] if fcs else None
            if fc is None:
                return 1
            if fc.use_gpu:
                need, have = fc.num_workers * fc.gpus_per_worker, float(total.get("GPU", 0.0))
            else:
                need, have = fc.num_workers * fc.cpus_per_worker, float(total.get("CPU", 0.0))
            n = int(have // need) if need > 0 else len(fcs)
        return max(1, min(n, len(fcs)))

    def finetune(self, selections: dict[str, str]) -> tuple[dict[str, ModelConfig], dict[str, str]]:
        """Fine-tune every arm; one failing arm is reported and the others go on.

        With more than one slot (`finetune_concurrency`), each arm's `finetune.run` runs in its own Ray
        task (which launches that arm's Ray Train run), a few at a time, and the driver only waits.
        Every Ray Train worker holds its CPUs (one torch thread per CPU), so an arm trains the same
        whether it runs alone or beside another. Interrupting the driver cancels the running tasks
        (their trainers go with them; a rerun resumes from the arms' checkpoints).
        """
        from igds_ray.stages import finetune

        c = self.cfg
        starts: dict[str, dict[str, Any]] = {}
        if self.prev is not None:
            selections, starts, kept = self.continue_arms(selections)
        fcs = {arm: self.finetune_config(arm, data, starts.get(arm)) for arm, data in selections.items()}
        slots = self.finetune_slots(list(fcs.values()))
        self.progress.expect("finetune", len(fcs), slots)
        outcomes: dict[str, BaseException | None] = {}

        def resources(fc: Any) -> dict[str, Any]:
            return dict(cpus=fc.num_workers * fc.cpus_per_worker,
                        gpus=fc.num_workers * fc.gpus_per_worker if fc.use_gpu else 0.0)

        counts = dict(tokens=lambda m: (m.get("metrics") or {}).get("tokens"),
                      rows=lambda m: (m.get("metrics") or {}).get("rows"))
        if slots == 1:
            for arm, fc in fcs.items():
                try:
                    self.stage("finetune", arm, lambda fc=fc: finetune.run(fc), **resources(fc), **counts)
                    outcomes[arm] = None
                except Exception as e:  # noqa: BLE001 - reported per arm below
                    outcomes[arm] = e
        else:
            import ray

            # The trainer retries its own workers (FailureConfig); a retried task would start a second trainer.
            task = ray.remote(num_cpus=0, max_retries=0)(finetune.run)
            log.info("fine-tuning %d arms, %d at a time", len(fcs), slots)
            queue, pending = longest_first(fcs), {}
            try:
                while queue or pending:
                    while queue and len(pending) < slots:
                        arm, fc = queue.pop(0)
                        had = ("finetune", arm) in self._done_records()
                        pending[task.remote(fc)] = (arm, fc, time.time(), had)
                    ready, _ = ray.wait(list(pending), num_returns=1)
                    arm, fc, t0, had = pending.pop(ready[0])
                    try:
                        out = ray.get(ready[0])
                    except Exception as e:  # noqa: BLE001 - reported per arm below
                        # the arm's own error (e.g. StageOutputError naming the file), not Ray's wrapper
                        e = getattr(e, "cause", None) or e if isinstance(e, ray.exceptions.RayTaskError) else e
                        self.record_stage("finetune", arm, t0, had, error=e, **resources(fc))
                        outcomes[arm] = e
                    else:
                        self.record_stage("finetune", arm, t0, had, out=out, **resources(fc), **counts)
                        outcomes[arm] = None
            finally:
                for ref in pending:
                    ray.cancel(ref, force=True)
        models: dict[str, ModelConfig] = {}
        failed: dict[str, str] = {}
        for arm in fcs:
            err = outcomes[arm]
            if err is not None:
                log.error("fine-tuning arm %s failed: %s", arm, err)
                failed[arm] = f"{type(err).__name__}: {err}"
                continue
            out = join(c.run_dir, "models", arm)
            models[arm] = (dataclasses.replace(c.model, adapter=out) if fcs[arm].method == "lora"
                           else dataclasses.replace(c.model, name_or_path=out))
        if self.prev is not None:
            models.update(kept)
        return models, failed

    def continue_arms(self, selections: dict[str, str]
                      ) -> tuple[dict[str, str], dict[str, dict[str, Any]], dict[str, ModelConfig]]:
        """A continued round: per arm its training set, the model it starts from, or round N's model kept."""
        from igds_ray import rounds

        return rounds.continue_arms(self, selections)

    # -- the whole run ---------------------------------------------------------------------------

    def run(self) -> str:
        from igds_ray import report
        from igds_ray.stages import evaluate

        c = self.cfg
        self.t0, self.n_records0 = time.time(), len(read_all(c.run_dir))
        write_json_atomic(join(c.run_dir, "config.json"), to_dict(c))
        _write_yaml(join(c.run_dir, "config.yaml"), to_dict(c))
        features = self.feature_sets()
        selections = self.selections(features)
        models, failed = self.finetune(selections)
        failed = {**self.arm_failures, **failed}
        e = c.evaluate
        if c.score.pooling in ("prompt_max", "prompt_mean"):
            # Show the features' activation where they were scored, not at a token scoring never read.
            e = dataclasses.replace(e, pooling=c.score.pooling)
        arms = {"base": c.model, **models}
        feats = features.get("igds") or next(iter(features.values()), None)
        if not feats:
            why = f" (failed: {', '.join(sorted(self.arm_failures))})" if self.arm_failures else ""
            raise ConfigError(f"evaluation measures the IGDS features' activation: no IGDS arm has features{why}; "
                              "include an igds arm")
        ev = evaluate.run(c.run_dir, arms, c.sae, feats, c.task, e, overwrite=c.overwrite)
        done = self._done_records()
        for arm, info in ev["arms"].items():
            if info.get("status") == "ok":
                fresh = ("evaluate", arm) not in done
                if fresh:
                    record(c.run_dir, Record(stage="evaluate", arm=arm, wall_s=info["wall_s"], cpus=e.num_cpus,
                                             gpus=e.num_gpus, rows=info["n"]))
                self.progress.note("evaluate", arm, info["wall_s"], info["n"], recorded=fresh)
        if failed:
            ev["arms"].update({a: {"status": "failed", "error": err} for a, err in failed.items()})
            write_json_atomic(join(c.run_dir, "eval", "metrics.json"), ev)
        if c.cards.enabled:
            from igds_ray.stages import cards

            try:
                self.stage("cards", "-", lambda: cards.run(c, overwrite=c.overwrite), cpus=c.cards.num_cpus,
                           gpus=c.cards.num_gpus)
            except Exception as err:  # noqa: BLE001 - the report still comes out, and says why no cards
                log.error("feature cards failed: %s", err)
        self.write_rounds(ev)
        from igds_ray.progress import dashboard_job_url

        write_json_atomic(join(c.run_dir, "report", "stages.json"),
                          {"table": self.progress.table(), "dashboard": dashboard_job_url()})
        self.progress.close()
        return report.build(c.run_dir, c.report.price_per_gpu_hour, c.report.price_per_cpu_hour,
                            label_column=c.report.label_column, pool=c.pool,
                            correct_column=c.report.correct_column)


    def write_rounds(self, ev: dict[str, Any]) -> None:
        """`<run>/rounds.json`, the ledger across rounds."""
        from igds_ray import rounds

        rounds.write_round(self)


def longest_first(fcs: dict[str, Any]) -> list[tuple[str, Any]]:
    """The arms in the order they start when several train at once: most rows first (ties: config order).

    An arm's time grows with its rows at equal epochs, so starting the longest first keeps a short arm
    from being the only one left running (measured on the demo: `full`, twice a half arm's rows, was
    third of eight). The order changes when an arm runs, never what it learns. A selection without a
    readable manifest counts as the largest, so it is not left to the end either.
    """
    def rows(fc: Any) -> float:
        try:
            return float(StageDir(fc.data).manifest().get("rows") or math.inf)
        except Exception:  # noqa: BLE001 - ordering only; the stage itself reports a bad selection
            return math.inf

    size = {arm: rows(fc) for arm, fc in fcs.items()}
    return sorted(fcs.items(), key=lambda kv: -size[kv[0]])


def _write_yaml(uri: str, data: dict) -> None:
    import yaml

    from igds_ray.storage import filesystem

    fs, path = filesystem(uri)
    with fs.open_output_stream(path) as f:
        f.write(yaml.safe_dump(data, sort_keys=False).encode())


def run(cfg: RunConfig) -> str:
    """Run (or resume) the pipeline; returns the report's path.

    The run directory is locked (`<run_dir>/_LOCK`) for the whole run: a second `igds run` on the
    same directory fails at once with `RunLocked`, naming the holder. The stages lock their own
    directories inside it too (nesting is allowed within one process).
    """
    from igds_ray.storage import lock

    from igds_ray.preflight import check_run

    check_run(cfg)
    with lock(cfg.run_dir, "igds run"):
        return Pipeline(cfg).run()
