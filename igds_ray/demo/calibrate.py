"""The world's own check that it can test the claim: P1 (fine-tuning helps) and P2 (selection has headroom).

The world build fine-tunes the freshly pretrained base model twice, in process, with the demo
pipeline's fine-tuning settings (full fine-tuning, response-only loss, the same tokenisation, batch
order and learning-rate schedule as `igds_ray.stages.finetune`, but without Ray Train):
- `full`: every pool row;
- `oracle`: the top half of the pool by the world's `utility` label (useful rows first, then
  neutral ones; harmful ones last), a seeded sample inside each label class,
and measures greedy math accuracy on the **dev** set. P1 holds when `full` beats the base by at
least `P1_MIN`; P2 when `oracle` beats `full` by at least `P2_MIN`. Only these two facts decide the
world's parameters (see BENCHMARKS.md, "world calibration"); no IGDS result ever does, and the test
set is never read here. The pipeline's arms (Ray Train, evaluated on the test set) are the real
measurement; this is a cheap, in-process check that runs on every world build.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

P1_MIN = 0.10  # full beats base by >= 10 points of math accuracy (issue 10, P1)
P2_MIN = 0.05  # oracle beats full by >= 5 points (P2)


def oracle_half(rows: Sequence[dict], fraction: float = 0.5, seed: int = 0) -> list[dict]:
    """The top `fraction` of rows by `utility` (higher first), a seeded uniform sample within a class."""
    from igds_ray.baselines.common import uniform01

    u = uniform01(seed, [r["id"] for r in rows])
    order = sorted(range(len(rows)), key=lambda i: (-rows[i]["utility"], -u[i]))
    return [rows[i] for i in order[: int(round(fraction * len(rows)))]]


def finetune_in_process(model_dir: Path, rows: Sequence[dict], epochs: int, lr: float, batch_size: int,
                        max_tokens: int, seed: int, warmup_ratio: float = 0.05) -> tuple[torch.nn.Module, Any, dict]:
    """Full fine-tuning of the model in `model_dir` on (prompt, response) rows; returns (model, tokenizer, stats)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from igds_ray.stages.finetune import collate, epoch_order, lr_lambda, tokenize_pairs

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    # Rows in id order, as the pipeline's trainer sorts them, so the order depends on (rows, seed) only.
    rows = sorted(rows, key=lambda r: r["id"])
    ex = tokenize_pairs(tok, [r["prompt"] for r in rows], [r["response"] for r in rows], max_tokens)
    spe = len(ex) // batch_size
    total = spe * epochs
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("linear", int(round(warmup_ratio * total)), total))
    t0, losses = time.perf_counter(), []
    for epoch in range(epochs):
        order = epoch_order(len(ex), seed, epoch)
        for s in range(spe):
            batch = collate([ex[i] for i in order[s * batch_size:(s + 1) * batch_size]], tok.pad_token_id)
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    model.eval()
    return model, tok, {"rows": len(ex), "steps": total, "wall_s": round(time.perf_counter() - t0, 1),
                        "loss_last": round(float(np.mean(losses[-10:])), 4) if losses else None}


def measure(model_dir: Path, pool: Sequence[dict], dev: Sequence[dict], base_dev: float, epochs: int, lr: float,
            batch_size: int, max_tokens: int, seed: int, progress: bool = True) -> dict[str, Any]:
    """P1 and P2 on the dev set: base, full-pool and oracle-half fine-tunes at equal epochs."""
    from igds_ray.demo.world import math_accuracy

    out: dict[str, Any] = {"set": "dev", "n_dev": len(dev), "epochs": epochs, "lr": lr, "batch_size": batch_size,
                           "seed": seed, "base": base_dev, "p1_min": P1_MIN, "p2_min": P2_MIN}
    for arm, rows in (("full", list(pool)), ("oracle", oracle_half(pool, 0.5, seed))):
        model, tok, st = finetune_in_process(model_dir, rows, epochs, lr, batch_size, max_tokens, seed)
        out[arm] = round(math_accuracy(model, tok, list(dev)), 4)
        out[f"{arm}_train"] = st
        if progress:
            print(f"[world] calibration: {arm} ({st['rows']} rows, {st['steps']} steps, {st['wall_s']}s) -> "
                  f"dev accuracy {out[arm]:.1%}", flush=True)
    out["p1_full_minus_base"] = round(out["full"] - base_dev, 4)
    out["p2_oracle_minus_full"] = round(out["oracle"] - out["full"], 4)
    out["p1"] = bool(out["p1_full_minus_base"] >= P1_MIN)
    out["p2"] = bool(out["p2_oracle_minus_full"] >= P2_MIN)
    return out
