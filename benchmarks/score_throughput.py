"""Scorer vs the naive path, and the scoring job's driver memory as the pool grows.

    python benchmarks/score_throughput.py [--rows 96] [--skip-memory] [--device cpu|cuda] [--shape smollm2|gemma2-2b]

1. Throughput, in one process on the same rows and the same micro-batches:
   - scorer: LM run only up to block L (later blocks, final norm and LM head never run), then the
     k chosen latents encoded from slices of W_enc/b_enc/threshold, pooled;
   - naive: full forward with `output_hidden_states=True` (LM head included), full `sae.encode`,
     then slice and pool.
   Default shape: SmolLM2-135M (30 layers, hidden 576, 9 heads / 3 KV heads, MLP 1536, vocab 49152,
   tied embeddings), random weights; SAE of 9216 JumpReLU latents at layer 15; `mean` pooling over
   every token of a `text` column so both paths read the same positions.
2. Driver memory: the whole Ray job (`igds_ray.stages.score.run`) on generated pools of 20k and
   200k rows with a tiny model, each in a fresh driver process; peak RSS of the driver.
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHAPES = {
    # name: (layers, hidden, heads, kv_heads, mlp, vocab, layer, d_sae, tied)
    "smollm2": (30, 576, 9, 3, 1536, 49152, 15, 9216, True),
    "gemma2-2b": (26, 2304, 8, 4, 9216, 256000, 12, 16384, True),
}


def build_shape(shape: str, device, dtype):  # noqa: ANN001, ANN201
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    layers, hidden, heads, kv, mlp, vocab, layer, d_sae, tied = SHAPES[shape]
    torch.manual_seed(0)
    if shape == "gemma2-2b":
        cfg = Gemma2Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                           num_key_value_heads=kv, head_dim=256, intermediate_size=mlp, tie_word_embeddings=tied)
        model = Gemma2ForCausalLM(cfg)
    else:
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                          num_key_value_heads=kv, intermediate_size=mlp, tie_word_embeddings=tied)
        model = LlamaForCausalLM(cfg)
    return model.to(device=device, dtype=dtype).eval(), layer, d_sae, hidden


def throughput(args: argparse.Namespace) -> dict:
    import torch

    from igds_ray.demo.tiny import build_sae, build_tokenizer, corpus, make_rows
    from igds_ray.models.runner import FeatureEncoder, LayerRunner
    from igds_ray.stages.score import PooledFeatureActs, micro_batches
    from igds_ray.tokenize import ExampleBuilder

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, layer, d_sae, hidden = build_shape(args.shape, device, dtype)
    tok = build_tokenizer(corpus())
    sae = build_sae(hidden, d_sae, f"blocks.{layer}.hook_resid_post", "jumprelu", seed=0).to(device)
    with torch.no_grad():  # plausible sparsity: threshold at a typical pre-activation size
        sae.threshold.fill_(0.05)
    feats = [11, 500, 4000, 9000][: args.k]
    rows = make_rows(args.rows, seed=1)
    texts = [r["text"] * args.repeat for r in rows]
    examples = ExampleBuilder(tok, "mean", args.max_tokens).build_text(texts)
    n_tokens = sum(len(e.input_ids) for e in examples)

    runner = LayerRunner(model, layer, prune=False)  # keep all blocks: the naive path needs them
    scorer = PooledFeatureActs(runner, FeatureEncoder(sae, feats), tok.pad_token_id, "mean", args.token_budget)

    @torch.inference_mode()
    def naive(exs):  # noqa: ANN001, ANN202
        out = [None] * len(exs)
        for mb in micro_batches([len(e.input_ids) for e in exs], args.token_budget):
            T = max(len(exs[i].input_ids) for i in mb)
            ids = torch.full((len(mb), T), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(mb), T), dtype=torch.long)
            for r, i in enumerate(mb):
                ids[r, : len(exs[i].input_ids)] = torch.tensor(exs[i].input_ids)
                mask[r, : len(exs[i].input_ids)] = 1
            o = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True, use_cache=False)
            h = o.hidden_states[layer + 1]
            for r, i in enumerate(mb):
                a = sae.encode(h[r, exs[i].positions])[:, feats]
                out[i] = a.float().mean(0)
        return out

    def timed(fn):  # noqa: ANN001, ANN202
        from igds_ray.timing import time_call

        fn(examples[: max(2, len(examples) // 8)])  # warm-up
        best, res = float("inf"), None
        for _ in range(args.repeats):  # CUDA events on a GPU, the wall clock on the CPU
            dt, res = time_call(lambda: fn(examples), device)
            best = min(best, dt)
        return best, res

    t_scorer, s_out = timed(scorer)
    t_naive, n_out = timed(naive)
    import numpy as np

    diff = float(np.abs(np.asarray(s_out) - torch.stack(n_out).cpu().numpy()).max())
    return {
        "shape": args.shape, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "torch_threads": torch.get_num_threads(), "rows": len(examples), "tokens": n_tokens,
        "layer": layer, "num_layers": SHAPES[args.shape][0], "d_sae": d_sae, "k": len(feats),
        "scorer_s": round(t_scorer, 3), "naive_s": round(t_naive, 3),
        "scorer_tokens_per_s": round(n_tokens / t_scorer, 1), "naive_tokens_per_s": round(n_tokens / t_naive, 1),
        "ratio": round(t_naive / t_scorer, 3), "max_abs_diff": diff,
    }


MEMORY_CHILD = r"""
import json, os, resource, sys, threading, time
os.environ["RAY_AUTH_MODE"] = "disabled"
import psutil, ray
from igds_ray.config import ScoreConfig, from_dict
from igds_ray.stages import score
world, pool, out = sys.argv[1], sys.argv[2], sys.argv[3]
ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
ray.data.DataContext.get_current().enable_progress_bars = False
proc = psutil.Process()
base = proc.memory_info().rss
peak = [base]
done = threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.05)
threading.Thread(target=sample, daemon=True).start()
cfg = from_dict(ScoreConfig, dict(model=world + "/model", sae=world + "/sae_jumprelu", features="l0_p3,l0_p17",
        pool=dict(path=pool, rows_per_read_task=5000), out=out, pooling="last", batch_size=1000, max_actors=2))
t = time.time()
m = score.run(cfg)
wall = time.time() - t
done.set()
print(json.dumps({"rows": m["rows"], "wall_s": round(wall, 1),
                  "driver_rss_before_run_mb": round(base / 2**20, 1),
                  "driver_peak_rss_during_run_mb": round(peak[0] / 2**20, 1),
                  "driver_ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
"""


def memory(sizes: list[int]) -> list[dict]:
    from igds_ray.demo.tiny import build_world, make_rows, write_pool

    tmp = Path(tempfile.mkdtemp(prefix="igds-bench-"))
    world = build_world(tmp / "world", n_rows=64, architectures=("jumprelu",))
    rows = make_rows(max(sizes), seed=3)
    results = []
    for n in sizes:
        pool = write_pool(tmp / f"pool{n}", rows[:n], n_files=max(2, n // 10000))
        proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(world.root), str(pool), str(tmp / f"out{n}")],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r["rows_per_s"] = round(r["rows"] / r["wall_s"], 1)
        results.append(r)
        print(f"[memory] {n} rows: {r}", flush=True)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--repeat", type=int, default=2, help="repeat each generated text to lengthen it")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--token-budget", type=int, default=2048)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--memory-sizes", default="20000,200000")
    args = p.parse_args()
    res = throughput(args)
    print(f"[throughput] {res}", flush=True)
    if not args.skip_memory:
        mem = memory([int(s) for s in args.memory_sizes.split(",")])
        res["memory"] = mem
        key = "driver_peak_rss_during_run_mb"
        res["driver_peak_growth"] = round(mem[-1][key] / mem[0][key] - 1, 3)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
