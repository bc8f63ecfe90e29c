"""Task feature identification: frequency recall, then causal filtering. Each step is skipped when its
output in `<run>/features/` is finished, so an interrupted run picks up where it stopped."""

from __future__ import annotations

from typing import Any

from igds_ray.config import IdentifyConfig
from igds_ray.stages import causal, recall


def run(cfg: IdentifyConfig) -> dict[str, Any]:
    from igds_ray.preflight import model_reachable, reachable, sae_reachable

    reachable("run_dir", cfg.run_dir)
    model_reachable("model.name_or_path", cfg.model.name_or_path, cfg.model.revision)
    sae_reachable(cfg.sae)
    table = recall.run(cfg)
    return causal.run(cfg, recall_table=table)
