"""The real-scale configs in configs/ parse into a RunConfig and name things that exist (offline checks)."""

from __future__ import annotations

from pathlib import Path

import pytest

from igds_ray import pipeline
from igds_ray.config import from_dict, load_yaml
from igds_ray.stages.finetune import FinetuneConfig

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_configs_for_every_model_and_task():
    names = {p.stem for p in CONFIGS}
    assert {"gemma2_2b_math", "gemma2_2b_summarization", "gemma2_2b_translation", "llama31_8b_math",
            "qwen3_8b_math"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_is_valid(path):
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    from igds_ray.models.loading import layer_from_hook_name  # noqa: F401  (the layer check below)
    from igds_ray.tasks import get_task

    cfg = from_dict(pipeline.RunConfig, load_yaml(path))
    get_task(cfg.task.name, **cfg.task.options)  # the task and its options exist
    if cfg.sae.release:
        d = get_pretrained_saes_directory()
        assert cfg.sae.release in d, cfg.sae.release
        assert cfg.sae.sae_id in d[cfg.sae.release].saes_map, cfg.sae.sae_id
        assert d[cfg.sae.release].model.split("/")[-1].lower() in cfg.model.name_or_path.lower()
    # The fine-tune section is a valid FinetuneConfig once the pipeline fills in the per-arm keys.
    fc = from_dict(FinetuneConfig, {**cfg.finetune, "model": {"name_or_path": cfg.model.name_or_path},
                                    "data": "x", "out": "/tmp/x", "arm": "igds"})
    # Real-scale runs put the heavy stages on GPUs.
    assert fc.use_gpu and cfg.score.num_gpus > 0 and cfg.causal.gen_num_gpus > 0 and cfg.evaluate.num_gpus > 0
    assert cfg.causal.backend == "vllm" and cfg.model.dtype == "bfloat16"
    assert cfg.run_dir.startswith("s3://") and cfg.pool.path.startswith("s3://")
