"""Why IGDS does or does not win on the demo world: what its SAE latents can tell apart.

    python benchmarks/demo_feature_quality.py --world runs/demo/world [--features l2_p257,...] [--sizes 256,1024]

For every latent of the world's SAE (and, with --sizes, of extra SAEs trained the same way with other
widths), pool its activation over each pool row (max over prompt tokens; max over response tokens)
and report the AUROC of the best latent for:
  - math vs everything else (can a feature find the task's data?),
  - correct vs wrong worked answers among math rows (can a feature find the *good* task data?),
plus the same AUROCs for the features the pipeline chose (--features). Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def auroc(scores, labels):  # noqa: ANN001, ANN201
    """AUROC of each column of `scores` [n, d] for boolean `labels` [n] (ties count half), by ranks."""
    import numpy as np
    from scipy.stats import rankdata

    labels = np.asarray(labels, bool)
    ranks = np.apply_along_axis(rankdata, 0, scores)
    n1, n0 = labels.sum(), (~labels).sum()
    return (ranks[labels].sum(0) - n1 * (n1 + 1) / 2) / (n1 * n0)


def pooled_acts(model_dir: Path, sae, layer: int, rows: list[dict]):  # noqa: ANN001, ANN201
    """[n, d_sae] max activation over prompt tokens and over response tokens of each row."""
    import torch
    from transformers import AutoTokenizer

    from igds_ray.models.runner import LayerRunner
    from transformers import AutoModelForCausalLM

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    runner = LayerRunner(model, layer, prune=True)
    p_out, r_out = [], []
    for i in range(0, len(rows), 64):
        part = rows[i:i + 64]
        ids = [tok(r["prompt"]).input_ids + tok(r["response"], add_special_tokens=False).input_ids for r in part]
        n_p = [len(tok(r["prompt"]).input_ids) for r in part]
        width = max(map(len, ids))
        x = torch.full((len(ids), width), tok.pad_token_id)
        mask = torch.zeros_like(x)
        for j, seq in enumerate(ids):
            x[j, :len(seq)] = torch.tensor(seq)
            mask[j, :len(seq)] = 1
        with torch.no_grad():
            acts = sae.encode(runner(x, mask))  # [b, t, d_sae]
        for j, seq in enumerate(ids):
            p_out.append(acts[j, 1:n_p[j]].max(0).values)  # skip BOS
            r_out.append(acts[j, n_p[j]:len(seq)].max(0).values if len(seq) > n_p[j] else torch.zeros(acts.shape[-1]))
    return torch.stack(p_out).numpy(), torch.stack(r_out).numpy()


def analyse(model_dir: Path, sae, layer: int, rows: list[dict], chosen: list[int]) -> dict:
    import numpy as np

    p, r = pooled_acts(model_dir, sae, layer, rows)
    kinds = np.array([x["kind"] for x in rows])
    is_math = np.array([k.startswith("math_") and k not in ("math_like_lookup", "math_other_format") for k in kinds])
    has_answer = np.array([x["correct"] is not None for x in rows])
    correct = np.array([bool(x["correct"]) for x in rows])
    out = {}
    for name, acts in (("prompt_max", p), ("response_max", r)):
        a_task = auroc(acts, is_math)
        a_ok = auroc(acts[has_answer], correct[has_answer])
        alive = acts.max(0) > 0
        a_task_alive, a_ok_alive = np.where(alive, a_task, 0.5), np.where(alive, a_ok, 0.5)
        out[name] = {
            "best_task_auroc": float(np.max(np.abs(a_task_alive - 0.5)) + 0.5),
            "best_correct_vs_wrong_auroc": float(np.max(np.abs(a_ok_alive - 0.5)) + 0.5),
            "latents_task_auroc_over_0.9": int(((a_task_alive > 0.9) | (a_task_alive < 0.1)).sum()),
            "chosen": {f"p{c}": {"task_auroc": float(a_task[c]), "correct_vs_wrong_auroc": float(a_ok[c])}
                       for c in chosen},
        }
    return out


def main() -> None:
    import pandas as pd
    from sae_lens import SAE

    ap = argparse.ArgumentParser()
    ap.add_argument("--world", required=True)
    ap.add_argument("--features", default="", help="comma-separated chosen features, e.g. l2_p257")
    ap.add_argument("--sizes", default="", help="also train SAEs of these widths (sae-lens runner) and compare")
    ap.add_argument("--rows", type=int, default=1200)
    args = ap.parse_args()
    world = Path(args.world)
    info = json.loads((world / "world.json").read_text())
    layer = info["spec"]["layer"]
    rows = pd.read_parquet(world / "pool").head(args.rows).to_dict("records")
    chosen = [int(f.split("_p")[1]) for f in args.features.split(",") if f]
    t0 = time.time()
    res = {"world": str(world), "rows": len(rows), "layer": layer,
           f"sae_{info['spec']['d_sae']}": {**analyse(world / "model", SAE.load_from_disk(str(world / "sae")), layer,
                                                      rows, chosen), "fve": info["stats"]["sae"].get("fve")}}
    if args.sizes:
        import itertools
        import tempfile

        from igds_ray.demo.sae_train import train_sae
        from igds_ray.demo.world import WorldSpec, math_sets, pretraining_documents, pretraining_math_prompt, \
            prompt_formats

        spec = WorldSpec(**info["spec"])
        _, tp, sp = prompt_formats()
        held = math_sets(spec.seed, spec.n_recall, spec.n_dev, spec.n_test)[3]
        # the world's own SAE texts (build_world): its pretraining mixture, seed + 7
        texts = list(itertools.islice(pretraining_documents(spec.seed + 7, pretraining_math_prompt(spec), tp, sp, held,
                                                            spec.math_share, spec.arith_share),
                                      spec.sae_tokens // 20))
        for d in [int(x) for x in args.sizes.split(",")]:
            with tempfile.TemporaryDirectory() as tmp:
                st = train_sae(world / "model", texts, layer, Path(tmp) / "sae", d_sae=d, k=spec.sae_k,
                               training_tokens=spec.sae_tokens, lr=spec.sae_lr, seed=spec.seed, progress=False)
                res[f"sae_{d}"] = {**analyse(world / "model", SAE.load_from_disk(str(Path(tmp) / "sae")), layer, rows,
                                             []), "fve": st["fve"], "dead_fraction": st["dead_fraction"]}
    res["wall_s"] = round(time.time() - t0, 1)
    for k, v in res.items():
        if k.startswith("sae_"):
            print(k, {n: {m: v[n][m] for m in ("best_task_auroc", "best_correct_vs_wrong_auroc")}
                      for n in ("prompt_max", "response_max")}, "chosen:", v["prompt_max"]["chosen"])
    print(json.dumps(res, default=float))


if __name__ == "__main__":
    main()
