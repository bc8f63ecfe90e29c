"""`igds demo`: the embedded tiny default, end to end on whatever Ray is at hand.

For now (foundation stage) it builds a tiny world in code — tokenizer, Llama-shaped model with
seeded random weights, a calibrated JumpReLU SAE, a mixed Parquet pool — picks the two latents
most often active at the last prompt token of the pool's math prompts (a quick in-process
stand-in until the recall + causal stages land), scores the pool on Ray Data, keeps the top
half and prints the top of the ranking. Everything lands under `--run-dir` as the run-directory
contract lays it out.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import torch

from igds_ray.config import ScoreConfig, SelectConfig, from_dict


def quick_features(world, n_prompts: int = 64, k: int = 2) -> list[str]:  # noqa: ANN001
    """The k latents most often active (then highest mean) at the last token of math prompts."""
    from sae_lens import SAE
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from igds_ray.models.runner import LayerRunner

    tok = AutoTokenizer.from_pretrained(world.model_dir)
    model = AutoModelForCausalLM.from_pretrained(world.model_dir).eval()
    sae = SAE.load_from_disk(world.saes["jumprelu"])
    rows = pd.read_parquet(world.pool_dir)
    prompts = [p for p in rows["prompt"] if "How many" in p][:n_prompts]
    enc = tok(prompts, return_tensors="pt", padding=True)
    hidden = LayerRunner(model, world.layer, prune=False)(enc["input_ids"], enc["attention_mask"])
    last = enc["attention_mask"].sum(1) - 1
    with torch.no_grad():
        acts = sae.encode(hidden[torch.arange(len(prompts)), last])
    freq = (acts > 0).float().mean(0)
    mean = acts.mean(0)
    order = sorted(range(acts.shape[1]), key=lambda j: (-float(freq[j]), -float(mean[j]), j))
    return [f"l{world.layer}_p{j}" for j in order[:k]]


def run_demo(run_dir: str, rows: int = 2000, seed: int = 0, top: int = 10) -> dict:
    from igds_ray.demo.tiny import build_world
    from igds_ray.stages import score, select

    root = Path(run_dir).resolve()
    t0 = time.time()
    world_dir = root / "world"
    print(f"[demo] building the tiny world in {world_dir} ...", flush=True)
    world = build_world(world_dir, n_rows=rows, n_files=4, hidden_size=128, num_layers=4, layer=1,
                        d_sae=256, architectures=("jumprelu",), seed=seed)
    features = quick_features(world)
    (root / "features").mkdir(parents=True, exist_ok=True)
    (root / "features" / "features.json").write_text(json.dumps(
        {"features": features, "method": "quick frequency pick (stand-in for recall + causal filtering)"}, indent=2))
    print(f"[demo] features: {', '.join(features)}  ({time.time() - t0:.1f}s)", flush=True)

    scfg = from_dict(ScoreConfig, dict(
        model=str(world.model_dir), sae=str(world.saes["jumprelu"]), features=features,
        pool=dict(path=str(world.pool_dir), rows_per_read_task=500), out=str(root / "scores"),
        pooling="last", batch_size=250, min_actors=1, max_actors=2, overwrite=True,
    ))
    sm = score.run(scfg)
    print(f"[demo] scored {sm['rows']} rows ({sm['errors']} errors) in {sm['wall_s']:.1f}s", flush=True)
    sel = select.run(from_dict(SelectConfig, dict(scores=str(root / "scores"), out=str(root / "selection"),
                                                 fraction=0.5, overwrite=True)))
    chosen = pd.read_parquet(root / "selection" / "igds.parquet").sort_values("rank")
    print(f"[demo] kept {sel['rows']} of {sel['rows_scored']} rows -> {root / 'selection' / 'igds.parquet'}")
    pd.set_option("display.width", 160)
    pd.set_option("display.max_colwidth", 60)
    print(chosen[["rank", "score", "prompt", "response"]].head(top).to_string(index=False))
    is_math = chosen["prompt"].str.contains("How many")
    all_rows = pd.read_parquet(world.pool_dir)
    share_pool = float(all_rows["prompt"].str.contains("How many").mean())
    print(f"[demo] math share: selected {float(is_math.mean()):.1%} vs pool {share_pool:.1%}; "
          f"total {time.time() - t0:.1f}s")
    return {"scores": sm, "selection": sel, "features": features}
