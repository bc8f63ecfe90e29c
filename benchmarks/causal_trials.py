"""Causal-filter search: time per trial, share of wall time spent loading models, and the
log-likelihood pre-screen's speed-up and rank agreement with the generation metric.

    python benchmarks/causal_trials.py [--backend hf|vllm] [--dev 64] [--new-tokens 16]

Runs `igds identify` (recall + causal filtering on Ray Tune) on the planted tiny world
(`igds_ray.demo.tiny.build_planted_world`: a 2-layer Llama whose SAE has one latent that, amplified,
makes the model say a target word) and prints one JSON line. The vLLM backend needs the
`.venv-vllm` environment (`scripts/make_vllm_venv.sh`).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    p.add_argument("--dev", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--factors", default="0,4,30")
    p.add_argument("--gen-actors", type=int, default=1)
    args = p.parse_args()

    import ray

    from igds_ray.config import IdentifyConfig, from_dict
    from igds_ray.demo.tiny import build_planted_world, says_target_task
    from igds_ray.stages import identify
    from igds_ray.tasks import register_task

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    tmp = Path(tempfile.mkdtemp(prefix="igds-causal-"))
    world = build_planted_world(tmp / "world", n_rows=max(120, args.dev + 40))
    register_task("says_target", says_target_task(), overwrite=True)
    cfg = from_dict(IdentifyConfig, dict(
        model=str(world / "model"), sae=str(world / "sae"), run_dir=str(tmp / "run"),
        task=dict(name="says_target", source=str(world / "task.parquet"), split=None, dev_split=None),
        recall=dict(limit=40, templates=[0], min_frequency=0.6, top_n=64, batch_size=20),
        causal=dict(factors=[float(f) for f in args.factors.split(",")], dev_limit=args.dev, min_dev=10,
                    max_new_tokens=args.new_tokens, gen_batch_size=args.dev, backend=args.backend,
                    gen_actors=args.gen_actors),
    ))
    t0 = time.time()
    res = identify.run(cfg)
    wall = time.time() - t0
    out = {k: res[k] for k in ("features", "base_metric", "trials", "failed_trials", "search_wall_s",
                                "model_load_wall_s", "model_load_share", "mean_trial_gen_s", "mean_trial_loglik_s",
                                "loglik_vs_metric_spearman", "loglik_vs_metric_spearman_per_feature",
                                "loglik_top1_matches_metric_top1", "backend")}
    out["identify_wall_s"] = round(wall, 2)
    out["trial_throughput_per_min"] = round(60 * res["trials"] / res["search_wall_s"], 1)
    if res["mean_trial_gen_s"] and res["mean_trial_loglik_s"]:
        out["loglik_speedup"] = round(res["mean_trial_gen_s"] / res["mean_trial_loglik_s"], 1)
    out.update(dev_examples=args.dev, max_new_tokens=args.new_tokens)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
