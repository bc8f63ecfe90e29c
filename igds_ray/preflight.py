"""Checks before any compute, each failing in one line that names the config key and the cause.

- storage: every input and output URI can be reached (an unknown bucket or missing credentials is a
  pyarrow `OSError` deep inside a stage otherwise);
- models: a local model directory holds a `config.json`, a hub id is in the local cache when
  `HF_HUB_OFFLINE` is set, an SAE directory holds its weights;
- GPU fit (`igds run`): where stages ask for GPUs of a known type, the memory plan (`igds_ray.plan`)
  must fit every stage on them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from igds_ray.errors import ConfigError

log = logging.getLogger(__name__)


def reachable(key: str, uri: str) -> None:
    """`uri`'s filesystem answers (the path itself may not exist yet: outputs are created later)."""
    from igds_ray.storage import filesystem

    try:
        fs, path = filesystem(uri)
        fs.get_file_info(path)
    except Exception as e:  # pyarrow's OSError for an unknown bucket, missing credentials, a bad scheme, ...
        text = str(e).strip()
        cause = text.splitlines()[0][:300] if text else type(e).__name__
        raise ConfigError(f"{key} {uri!r} cannot be reached: {cause}") from None


def model_reachable(key: str, name_or_path: str, revision: str | None = None) -> None:
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ConfigError(f"{key} {name_or_path!r}: no config.json in that directory")
        return
    if "://" in name_or_path:
        return  # a remote directory: read by transformers when the stage loads it
    if name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.count("/") != 1:
        raise ConfigError(f"{key} {name_or_path!r}: no such directory (and not a hub id of the form org/name)")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name_or_path, "config.json", revision=revision), str):
            raise ConfigError(f"{key} {name_or_path!r}: not in the local Hugging Face cache, and HF_HUB_OFFLINE is "
                              "set (download it first, or point to a local directory)")


def sae_reachable(sae: Any) -> None:
    if sae.path is not None and not (Path(sae.path) / "sae_weights.safetensors").is_file():
        raise ConfigError(f"sae.path {sae.path!r}: no sae_weights.safetensors there")


def uses_gpus(cfg: Any) -> bool:
    lm = cfg.baselines.get("lm", {})
    return any(x and x > 0 for x in (cfg.recall.num_gpus, cfg.causal.gen_num_gpus, cfg.score.num_gpus,
                                     lm.get("num_gpus"), cfg.evaluate.num_gpus)) or bool(cfg.finetune.get("use_gpu"))


def check_run(cfg: Any) -> None:
    """`igds run`'s checks: storage (run_dir, pool.path), the model and SAE, then the GPU memory plan."""
    from igds_ray.plan import plan

    reachable("run_dir", cfg.run_dir)
    reachable("pool.path", cfg.pool.path)
    model_reachable("model.name_or_path", cfg.model.name_or_path, cfg.model.revision)
    sae_reachable(cfg.sae)
    gpu = cfg.gpu_type or cluster_gpu_type()
    if not gpu or not uses_gpus(cfg):
        return
    try:
        p = plan(cfg, gpu)
    except ConfigError as e:  # no shape or pool statistics to plan with: say so, do not block the run
        log.warning("memory plan skipped (%s)", e)
        return
    refusal = p.refusal()
    if refusal:
        raise ConfigError(f"{refusal} (`igds plan --config ... --gpu-type {p.gpu}` shows every stage)")


def cluster_gpu_type() -> str | None:
    """The GPU type a running Ray cluster's nodes advertise (`accelerator_type:A10G`), if one is connected."""
    import ray

    from igds_ray.hardware import ACCELERATOR_ALIASES, GPU_TYPES

    if not ray.is_initialized():
        return None
    for key in ray.cluster_resources():
        name = key.removeprefix("accelerator_type:")
        if key.startswith("accelerator_type:") and (name in GPU_TYPES or name in ACCELERATOR_ALIASES):
            return name
    return None
