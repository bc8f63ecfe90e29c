"""Evaluate the base model and every fine-tuned arm on the task's test split, and measure the mechanism.

Per arm (each a Ray task with its own resources, arms in parallel): greedy generation through a
generation backend, the task metric, and the chosen SAE features' activation at each test prompt
(last prompt token) under that arm's weights. Outputs:
- `<run>/eval/<arm>.parquet`: one row per test example: id, prompt, prediction, reference, answer
  (extracted), score, acts (per chosen feature), feature_score (their sum);
- `<run>/eval/metrics.json`: per arm the metric dict, feature-activation medians, timings, or the
  error that stopped it; plus the mechanism: activation gain vs metric gain across arms.
A failing arm (e.g. an adapter that does not load) is recorded as failed; the others finish.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from igds_ray.config import ModelConfig, SAEConfig, TaskConfig, _help, from_dict, to_dict
from igds_ray.errors import ConfigError

log = logging.getLogger(__name__)

BASE_ARM = "base"


@dataclass(frozen=True)
class EvalConfig:
    source: str | None = _help("test examples; default: the task's source", default=None)
    split: str | None = _help("test split", default="test")
    limit: int | None = _help("test examples (seeded sample); None = all", default=500)
    template: int = _help("prompt template index", default=0)
    backend: Literal["hf", "vllm", "lm_eval"] = _help(
        "generation backend; lm_eval = lm-evaluation-harness generates from the same prompts (a local task) and "
        "scores with its own metrics", default="hf")
    max_new_tokens: int = _help("generation length", default=128)
    repetition_penalty: float = _help("generation repetition penalty", default=1.0)
    batch_size: int = _help("prompts per generate call", default=32)
    num_cpus: float = _help("CPUs per arm evaluation", default=1.0)
    num_gpus: float = _help("GPUs per arm evaluation", default=0.0)
    seed: int = _help("seed for sampling the test set", default=0)
    pooling: Literal["last", "prompt_max", "prompt_mean"] = _help(
        "where the chosen features' activation is read on the test prompts; `igds run` reads them where scoring "
        "did when score.pooling reads the prompt (prompt_max/prompt_mean), else at the last token", default="last")
    lm_eval_tasks: tuple[str, ...] = _help(
        "real lm-eval tasks run on every arm besides the test set (e.g. gsm8k; datasets from the HF hub); "
        "any backend; empty = none", default=())
    lm_eval_model: Literal["hf", "vllm"] = _help("lm-eval model type for backend lm_eval and lm_eval_tasks",
                                                 default="hf")
    lm_eval_adapter: Literal["peft", "merged"] = _help(
        "a LoRA arm under lm-eval: peft = lm-eval applies the adapter (hf peft=, vllm lora_local_path=); "
        "merged = the merged weights, as the built-in backends use", default="peft")
    lm_eval_limit: int | None = _help("examples per lm_eval_tasks task; None = all", default=None)

    def __post_init__(self) -> None:
        if self.lm_eval_limit is not None and self.lm_eval_limit < 1:
            raise ConfigError(f"evaluate.lm_eval_limit: must be >= 1 or null, got {self.lm_eval_limit}")
        if len(set(self.lm_eval_tasks)) != len(self.lm_eval_tasks):
            raise ConfigError(f"evaluate.lm_eval_tasks: a task is listed twice: {list(self.lm_eval_tasks)}")


def _evaluate_arm(arm: str, model: dict, sae: dict, features: list[str], task: Any, examples: list[dict],
                  ecfg: dict) -> tuple[pa.Table, dict]:
    """Runs inside a Ray task: one model load serves both generation and the feature activations."""
    import torch

    from igds_ray.generation import SamplingConfig
    from igds_ray.generation.hf import HFBackend
    from igds_ray.models.loading import load_sae
    from igds_ray.models.runner import FeatureEncoder, LayerRunner
    from igds_ray.schema import parse_features
    from igds_ray.stages.score import PooledFeatureActs
    from igds_ray.tasks import TaskExample
    from igds_ray.tokenize import ExampleBuilder

    e = from_dict(EvalConfig, ecfg)
    mcfg = from_dict(ModelConfig, model)
    if e.num_cpus >= 1:
        torch.set_num_threads(max(1, int(e.num_cpus)))
    exs = [TaskExample.from_dict(x) for x in examples]
    prompts = [task.build_prompt(x, e.template) for x in exs]
    t0 = t_start = time.time()
    lm_info = None
    if e.lm_eval_tasks and e.backend != "lm_eval":  # first: its model is freed before this arm's loads
        from igds_ray.stages.evaluate_lmeval import evaluate_arm

        lm_info = evaluate_arm(mcfg, task, exs, prompts, e, local=False)[1]
        _free_accelerator_memory()
        t0 = time.time()
    sampling = SamplingConfig(max_new_tokens=e.max_new_tokens, repetition_penalty=e.repetition_penalty,
                              stop=tuple(getattr(task, "stop_sequences", ()) or ()))
    if e.backend == "lm_eval":
        from igds_ray.stages.evaluate_lmeval import evaluate_arm

        # lm-eval's model is closed before the HF copy that reads the activations loads (as for vLLM).
        preds, lm_info = evaluate_arm(mcfg, task, exs, prompts, e)
        _free_accelerator_memory()
        load_s, gen_s = lm_info["load_s"], lm_info["eval_s"]
        t2 = time.time()
        backend = HFBackend(mcfg, None, batch_size=e.batch_size)
        load_s += time.time() - t2
    elif e.backend == "vllm":
        from igds_ray.generation import make_backend
        from igds_ray.plan import vllm_options

        # The memory plan: vLLM and the HF copy that reads activations never share the GPU. The engine is
        # sized to the longest test prompt and closed after generating, before the HF model loads.
        gen_backend = make_backend("vllm", mcfg, None, **vllm_options(mcfg, prompts, [], e.max_new_tokens, e.num_gpus))
        load_s = time.time() - t0
        t1 = time.time()
        try:
            preds = gen_backend.generate(prompts, sampling)
        finally:
            gen_backend.close()
            del gen_backend
            _free_accelerator_memory()
        gen_s = time.time() - t1
        t2 = time.time()
        backend = HFBackend(mcfg, None, batch_size=e.batch_size)  # activations need the torch model
        load_s += time.time() - t2
    else:
        backend = HFBackend(mcfg, None, batch_size=e.batch_size)
        load_s = time.time() - t0
        t1 = time.time()
        preds = backend.generate(prompts, sampling)
        gen_s = time.time() - t1
    metrics = task.corpus_metric(preds, exs)
    scores = [task.score(p, x) for p, x in zip(preds, exs)]
    answers = [task.extract(p) for p in preds]

    feats = parse_features(features)
    sae_model = load_sae(from_dict(SAEConfig, sae), backend.device)
    builder = ExampleBuilder(backend.tok, ecfg["pooling"], 4096)
    acts_fn = PooledFeatureActs(LayerRunner(backend.model, feats[0].layer, prune=False),
                                FeatureEncoder(sae_model, [f.index for f in feats]), backend.tok.pad_token_id,
                                ecfg["pooling"], 16384)
    built = builder.build_pairs(prompts, [""] * len(prompts))
    ok = [i for i, b in enumerate(built) if not isinstance(b, str)]
    acts = np.full((len(prompts), len(feats)), np.nan, np.float32)
    if ok:
        acts[ok] = acts_fn([built[i] for i in ok])
    table = pa.table({
        "id": [x.id for x in exs], "prompt": prompts, "prediction": preds,
        "reference": [task.reference_answer(x) for x in exs], "answer": answers,
        "score": pa.array(scores, pa.float64()),
        "acts": pa.array([None if np.isnan(a).any() else a.tolist() for a in acts], pa.list_(pa.float32())),
        "feature_score": pa.array([None if np.isnan(a).any() else float(a.sum()) for a in acts], pa.float64()),
    })
    med = np.nanmedian(acts, axis=0) if len(acts) else np.full(len(feats), np.nan)
    info = {
        "status": "ok", "metrics": {k: float(v) for k, v in metrics.items()}, "n": len(exs),
        "feature_median": {str(f): float(m) for f, m in zip(feats, med)},
        "feature_score_median": float(np.nanmedian(acts.sum(1))) if len(acts) else float("nan"),
        "feature_score_mean": float(np.nanmean(acts.sum(1))) if len(acts) else float("nan"),
        "load_s": round(load_s, 3), "generate_s": round(gen_s, 3), "wall_s": round(time.time() - t_start, 3),
        "model": model,
    }
    if lm_info is not None:
        info["lm_eval"] = lm_info
    return table, info


def _free_accelerator_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def pearson(x: list[float], y: list[float]) -> float:
    a, b = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def mechanism(arms: dict[str, dict]) -> dict[str, Any]:
    """Across fine-tuned arms: activation gain (median feature score vs base) against metric gain."""
    from igds_ray.stages.causal import spearman

    base = arms.get(BASE_ARM)
    if not base or base.get("status") != "ok":
        return {"note": "base model evaluation missing or failed"}
    rows = []
    for name, a in arms.items():
        if name == BASE_ARM or a.get("status") != "ok":
            continue
        rows.append({"arm": name,
                     "activation_gain": a["feature_score_median"] - base["feature_score_median"],
                     "metric_gain": a["metrics"]["metric"] - base["metrics"]["metric"]})
    xs, ys = [r["activation_gain"] for r in rows], [r["metric_gain"] for r in rows]
    return {"per_arm": rows, "pearson": pearson(xs, ys) if rows else None,
            "spearman": spearman(xs, ys) if len(rows) >= 2 else None,
            "base_feature_score_median": base["feature_score_median"]}


def run(run_dir: str, arms: dict[str, ModelConfig], sae: SAEConfig, features: list[str], task_cfg: TaskConfig,
        ecfg: EvalConfig, overwrite: bool = False) -> dict[str, Any]:
    """Evaluate each arm not yet evaluated (skips arms whose eval/<arm>.parquet exists); write metrics.json."""
    import pyarrow.parquet as pq
    import ray

    from igds_ray.stages.score import init_ray
    from igds_ray.storage import exists, filesystem, join, read_json, write_json_atomic
    from igds_ray.tasks import get_task, load_task_set

    task = get_task(task_cfg.name, **task_cfg.options)
    test = load_task_set(task, ecfg.source or task_cfg.source, split=ecfg.split, columns=task_cfg.columns or None,
                         limit=ecfg.limit, seed=ecfg.seed)
    if ecfg.backend == "lm_eval" or ecfg.lm_eval_tasks:
        from igds_ray.stages.evaluate_lmeval import check_task_names, require_lm_eval

        require_lm_eval()  # before any arm starts: a missing package or a misspelt task fails here, once
        check_task_names(ecfg.lm_eval_tasks)
    metrics_uri = join(run_dir, "eval", "metrics.json")
    done: dict[str, dict] = read_json(metrics_uri)["arms"] if exists(metrics_uri) and not overwrite else {}
    todo = {a: m for a, m in arms.items()
            if overwrite or a not in done or done[a].get("status") != "ok" or done[a].get("model") != to_dict(m)}
    init_ray()
    remote = ray.remote(_evaluate_arm).options(num_cpus=ecfg.num_cpus, num_gpus=ecfg.num_gpus or None)
    examples = [x.to_dict() for x in test.examples]
    refs = {a: remote.remote(a, to_dict(m), to_dict(sae), list(features), task, examples, to_dict(ecfg))
            for a, m in todo.items()}
    results = dict(done)
    fs, _ = filesystem(run_dir)
    for arm, ref in refs.items():
        try:
            table, info = ray.get(ref)
        except Exception as e:  # one failing arm must not stop the others
            cause = getattr(e, "cause", None) or e  # the arm's own exception, not Ray's wrapper
            log.error("evaluation of arm %s failed: %s", arm, cause)
            results[arm] = {"status": "failed", "error": f"{type(cause).__name__}: {str(cause)[-2000:]}",
                            "model": to_dict(todo[arm])}
            continue
        path = join(run_dir, "eval", f"{arm}.parquet")
        _, p = filesystem(path)
        fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
        pq.write_table(table, p + ".tmp", filesystem=fs)
        fs.move(p + ".tmp", p)
        results[arm] = info
    out = {"task": task_cfg.name, "test_examples": len(test.examples), "features": list(features),
           "arms": results, "mechanism": mechanism(results)}
    write_json_atomic(metrics_uri, out)
    return out
