"""Throughput and peak memory of one LoRA epoch through the real fine-tuning stage (Ray Train V2, one worker).

    python benchmarks/finetune_throughput.py                                  # tiny Llama on the CPU
    python benchmarks/finetune_throughput.py --shape gemma2-2b --device cuda  # Gemma-2-2B shape, random weights

The model is built in code with seeded random weights and saved with `save_pretrained` (the tiny
byte-level BPE tokenizer is saved with it; its ids are valid for any vocabulary), a selection of
`--rows` synthetic prompt/response rows of about `--seq-len` tokens is committed, and
`igds_ray.stages.finetune.run` trains one epoch. Figures come from the run's own `train_metrics.json`:
tokens/s = non-padding tokens / time in forward+backward+optimizer (checkpoint writes excluded);
peak memory = the worker's max RSS and `torch.cuda.max_memory_allocated`. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {
    # name: (layers, hidden, heads, kv_heads, head_dim, mlp, vocab)
    "tiny": (2, 128, 2, 1, 64, 256, None),
    "gemma2-tiny": (2, 128, 2, 1, 64, 256, None),  # the Gemma-2 code path at tiny size (runs anywhere)
    "gemma2-2b": (26, 2304, 8, 4, 256, 9216, 256000),
}


def build_model_dir(shape: str, out: Path, device: str) -> Path:
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from igds_ray.demo.tiny import build_llama, build_tokenizer, corpus

    tok = build_tokenizer(corpus())
    layers, hidden, heads, kv, head_dim, mlp, vocab = SHAPES[shape]
    vocab = vocab or len(tok)
    if shape == "tiny":
        model = build_llama(len(tok), hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv,
                            intermediate_size=mlp, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id)
    else:
        cfg = Gemma2Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                           num_key_value_heads=kv, head_dim=head_dim, intermediate_size=mlp, tie_word_embeddings=True,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id, attn_implementation="eager")
        torch.manual_seed(0)
        with torch.device(device):  # random init on the GPU: minutes faster than on the CPU
            model = Gemma2ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    del model
    return out


def synthetic_rows(n: int, seq_len: int, seed: int = 0) -> list[dict]:
    from igds_ray.demo.tiny import make_rows

    rng = random.Random(seed)
    words = "the a one two three cat dog bird tree river stone apple price total sum count".split()
    rows = make_rows(n, seed=seed)
    for r in rows:  # pad each response to about seq_len tokens (the tiny BPE: ~1.3 tokens per word)
        r["response"] += " " + " ".join(rng.choice(words) for _ in range(max(0, int(seq_len / 1.3) - 20)))
    return rows


def write_selection(path: Path, rows: list[dict]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from igds_ray.storage import StageDir

    sd = StageDir(str(path))
    staging = sd.begin(overwrite=True)
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(len(rows))], "prompt": [r["prompt"] for r in rows],
                             "response": [r["response"] for r in rows]}), f"{staging}/part-0.parquet")
    sd.commit(staging, {"stage": "select", "rows": len(rows)})
    return str(path)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--rows", type=int, default=None, help="rows in the epoch (default: 256 tiny, 512 gemma2-2b)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per row (default: 128 tiny, 512 gemma2-2b)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--cpus", type=float, default=1.0, help="CPUs of the training worker")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--workdir", default=None, help="keep files here (default: a temporary directory)")
    args = ap.parse_args(argv)
    big = args.shape.startswith("gemma2") and args.shape != "gemma2-tiny"
    gemma = args.shape.startswith("gemma2")
    rows = args.rows or (512 if big else 256)
    seq_len = args.seq_len or (512 if big else 128)

    import ray

    from igds_ray.config import from_dict
    from igds_ray.stages.finetune import FinetuneConfig, run

    tmp = tempfile.TemporaryDirectory() if args.workdir is None else None
    root = Path(args.workdir or tmp.name)
    t0 = time.time()
    model_dir = build_model_dir(args.shape, root / "model", args.device)
    build_s = time.time() - t0
    data = write_selection(root / "selection" / "bench.parquet", synthetic_rows(rows, seq_len))
    ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             num_cpus=max(2, int(args.cpus) + 1))
    cfg = from_dict(FinetuneConfig, dict(
        model=dict(name_or_path=str(model_dir), attn_implementation="eager" if gemma else None),
        data=data, out=str(root / "models" / "bench"), arm="bench", batch_size=args.batch_size,
        max_tokens=seq_len + 64, lora_r=args.lora_r, lora_alpha=2 * args.lora_r, budget="epochs", epochs=1,
        use_gpu=args.device == "cuda", cpus_per_worker=args.cpus, max_failures=0, overwrite=True,
        gradient_checkpointing=args.gradient_checkpointing, log_every=10_000,
    ))
    t1 = time.time()
    m = run(cfg)["metrics"]
    wall = time.time() - t1
    ray.shutdown()
    result = {
        "benchmark": "finetune_throughput", "shape": args.shape, "device": args.device, "method": "lora",
        "lora_r": args.lora_r, "rows": m["rows"], "steps": m["steps"], "batch_size": args.batch_size,
        "tokens": m["tokens"], "target_tokens": m["target_tokens"], "tokens_per_s": m["tokens_per_s"],
        "step_s": round(m["compute_s"] / max(1, m["steps"]), 4), "compute_s": m["compute_s"],
        "train_s": m["train_s"], "stage_wall_s": round(wall, 2), "model_build_s": round(build_s, 2),
        "peak_rss_mb": m["peak_rss_mb"], "peak_gpu_mb": m["peak_gpu_mb"],
        "first_loss": round(m["first_loss"], 4), "final_loss": round(m["final_loss"], 4),
    }
    print(json.dumps(result))
    if tmp is not None:
        tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
