"""Throughput of the baseline scorers on a generated pool with the tiny demo model.

    python benchmarks/baselines.py [--rows 20000] [--lm-rows 2000] [--shard-rows 5000] [--k1 1000] [--k2 50]

For each of random, loss+ifd (one stage) and zip: the whole Ray job (`run(cfg)`: read, score, write,
exactly-once check, commit) on a local Ray with all CPUs, and, for lm and zip, the scoring step
alone in this process (LMScorer.score_table on one batch; zip_order on one shard), so Ray's fixed
overhead and the per-row cost can be told apart. Every Ray job runs twice: the first pays worker
start-up, the second is reported as warm. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=20000, help="pool rows for random and zip")
    p.add_argument("--lm-rows", type=int, default=2000, help="pool rows for loss+ifd")
    p.add_argument("--shard-rows", type=int, default=5000)
    p.add_argument("--k1", type=int, default=1000)
    p.add_argument("--k2", type=int, default=50)
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    import pyarrow as pa
    import ray

    from igds_ray import pool as P
    from igds_ray.baselines import lm as LM
    from igds_ray.baselines import random as RND
    from igds_ray.baselines import zip as ZIP
    from igds_ray.config import ModelConfig, PoolConfig
    from igds_ray.demo.tiny import build_llama, build_tokenizer, corpus, make_rows, write_pool

    root = Path(tempfile.mkdtemp(prefix="igds-bench-baselines-"))
    tok = build_tokenizer(corpus())
    model = build_llama(len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    rows = make_rows(args.rows, seed=3)
    big = PoolConfig(path=str(write_pool(root / "pool", rows, n_files=8)))
    small = PoolConfig(path=str(write_pool(root / "lm_pool", rows[: args.lm_rows], n_files=4)))
    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False

    def timed(run, cfg_of, n):  # noqa: ANN001, ANN202
        out = {}
        for label in ("cold", "warm"):
            t = time.perf_counter()
            m = run(cfg_of(str(root / f"out-{run.__module__}-{label}")))
            wall = time.perf_counter() - t
            assert m["rows"] == n
            out[f"{label}_s"] = round(wall, 2)
            out[f"{label}_rows_per_s"] = round(n / wall, 1)
        return out

    result: dict = {"rows": args.rows, "lm_rows": args.lm_rows, "cpus": args.cpus,
                    "model": "tiny llama (2 layers, hidden 128, vocab 384)"}
    result["random"] = timed(RND.run, lambda o: RND.RandomConfig(pool=big, out=o), args.rows)

    lm_cfg = lambda o: LM.LMConfig(model=ModelConfig(str(root / "model")), pool=small, out=o,  # noqa: E731
                                   actors=max(1, args.cpus - 1), batch_size=256, max_tokens=256, token_budget=8192)
    result["loss_ifd"] = timed(LM.run, lm_cfg, args.lm_rows)
    scorer = LM.LMScorer(lm_cfg("unused"))
    pool = P.discover(small.path, small.text_columns, None)
    table = P.read_chunk(P.filesystem(small.path)[0], pool, pool.files[0], 0, [0]).slice(0, 256)
    scorer.score_table(table)
    t = time.perf_counter()
    scored = scorer.score_table(table)
    dt = time.perf_counter() - t
    result["loss_ifd"]["in_process_rows_per_s_1cpu"] = round(table.num_rows / dt, 1)
    result["loss_ifd"]["tokens_per_row"] = round(float(pa.compute.mean(scored.column("n_tokens")).as_py()), 1)

    zcfg = lambda o: ZIP.ZipConfig(pool=big, out=o, k1=args.k1, k2=args.k2, shard_rows=args.shard_rows)  # noqa: E731
    result["zip"] = timed(ZIP.run, zcfg, args.rows)
    result["zip"].update(k1=args.k1, k2=args.k2, shard_rows=args.shard_rows,
                         shards=ZIP.n_shards(args.rows, args.shard_rows))
    texts = [f"{r['prompt']}\n{r['response']}".encode() for r in rows[: args.shard_rows]]
    t = time.perf_counter()
    ZIP.zip_order(texts, args.k1, args.k2)
    dt = time.perf_counter() - t
    result["zip"]["one_shard_rows_per_s_1cpu"] = round(len(texts) / dt, 1)
    result["zip"]["mean_row_bytes"] = round(sum(map(len, texts)) / len(texts), 1)
    ray.shutdown()
    return result


if __name__ == "__main__":
    print(json.dumps(main(parse_args())))
