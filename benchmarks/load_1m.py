"""A million-row load test of the scoring job: is the driver's memory flat, and what rows/s?

    nice python benchmarks/load_1m.py [--rows 1000000] [--files 10] [--actors 1] [--num-cpus 1]
                                      [--batch-size 2048] [--rows-per-read-task 8192] [--keep DIR]

1. Generates a pool of `--rows` short prompt/response rows (the tiny demo world's generator,
   `igds_ray.demo.tiny.make_rows`) in `--files` Parquet files of 10k-row row groups, file by file
   (the generator never holds the whole pool), and a tiny model + JumpReLU SAE (`build_world`).
2. Runs the whole scoring job (`igds_ray.stages.score.run`: Ray Data read -> scorer actors -> part
   writes -> exactly-once check -> commit) in a fresh driver process with its own local Ray, and
   samples that driver's RSS every 0.2 s from a thread.
Reports: rows, wall time, rows/s (whole job, and the Ray Data part alone), the driver's RSS before
the run, its peak, its RSS at 10% / 50% / 90% of the wall time (flat = the driver does not grow
with the pool), and the RSS at the end of the Ray job vs after the driver-side check/commit. Ends
with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHILD = r"""
import json, os, sys, threading, time
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
import psutil, ray
from igds_ray.config import ScoreConfig, from_dict
from igds_ray.stages import score
world, pool, out, opts = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
ray.init(num_cpus=opts["cluster_cpus"], include_dashboard=False, logging_level="ERROR", log_to_driver=False)
ray.data.DataContext.get_current().enable_progress_bars = False
proc = psutil.Process()
samples = []  # (seconds since the run started, driver RSS bytes)
done = threading.Event()
t0 = [time.time()]
def sample():
    while not done.is_set():
        samples.append((time.time() - t0[0], proc.memory_info().rss))
        time.sleep(0.2)
cfg = from_dict(ScoreConfig, dict(model=world + "/model", sae=world + "/sae_jumprelu", features="l0_p3,l0_p17,l0_p40",
        pool=dict(path=pool, rows_per_read_task=opts["rows_per_read_task"]), out=out, pooling="last",
        batch_size=opts["batch_size"], min_actors=opts["actors"], max_actors=opts["actors"],
        num_cpus=opts["num_cpus"]))
base = proc.memory_info().rss
t0[0] = time.time()
threading.Thread(target=sample, daemon=True).start()
m = score.run(cfg)
wall = time.time() - t0[0]
done.set()
print(json.dumps({"manifest": {k: m[k] for k in ("rows", "errors", "tokens", "wall_s", "resumed_rows",
                                                  "duplicate_ids")},
                  "parts": len(m["files"]), "wall_s": wall, "base_rss": base, "samples": samples}))
"""


def make_pool(root: Path, rows: int, files: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from igds_ray.demo.tiny import make_rows

    root.mkdir(parents=True, exist_ok=True)
    per = -(-rows // files)
    for f in range(files):
        n = min(per, rows - f * per)
        if n <= 0:
            break
        part = make_rows(n, seed=1000 + f)
        pq.write_table(pa.table({"prompt": [r["prompt"] for r in part], "response": [r["response"] for r in part]}),
                       root / f"part-{f:03d}.parquet", row_group_size=10_000)
    return root


def rss_at(samples: list[tuple[float, int]], t: float) -> int:
    """RSS of the last sample taken at or before `t` seconds."""
    best = samples[0][1]
    for s, r in samples:
        if s > t:
            break
        best = r
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--files", type=int, default=10)
    p.add_argument("--actors", type=int, default=1)
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per scorer actor")
    p.add_argument("--cluster-cpus", type=int, default=os.cpu_count() or 2)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--rows-per-read-task", type=int, default=8192)
    p.add_argument("--keep", help="keep the generated pool/world/output here (default: a temp dir, removed)")
    args = p.parse_args()

    from igds_ray.demo.tiny import build_world

    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="igds-load1m-"))
    try:
        t = time.time()
        world = build_world(tmp / "world", n_rows=64, architectures=("jumprelu",))
        pool = make_pool(tmp / "pool", args.rows, args.files)
        gen_s = time.time() - t
        pool_mb = sum(f.stat().st_size for f in pool.glob("*.parquet")) / 2**20
        print(f"[load_1m] pool: {args.rows} rows in {args.files} files, {pool_mb:.1f} MiB, generated in {gen_s:.0f} s",
              flush=True)
        opts = {"actors": args.actors, "num_cpus": args.num_cpus, "cluster_cpus": args.cluster_cpus,
                "batch_size": args.batch_size, "rows_per_read_task": args.rows_per_read_task}
        proc = subprocess.run([sys.executable, "-c", CHILD, str(world.root), str(pool), str(tmp / "scores"),
                               json.dumps(opts)], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-5000:])
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        samples, wall, m = r["samples"], r["wall_s"], r["manifest"]
        mib = 2**20
        peak = max(s for _, s in samples)
        ray_job_s = m["wall_s"]  # the Ray Data part (read -> score -> write), as the manifest records it
        res = {
            "rows": m["rows"], "errors": m["errors"], "tokens": m["tokens"], "parts": r["parts"],
            "duplicate_ids": m["duplicate_ids"], "pool_files": args.files, "pool_mib": round(pool_mb, 1),
            "actors": args.actors, "num_cpus_per_actor": args.num_cpus, "cluster_cpus": args.cluster_cpus,
            "batch_size": args.batch_size, "rows_per_read_task": args.rows_per_read_task,
            "wall_s": round(wall, 1), "ray_job_s": round(ray_job_s, 1),
            "rows_per_s": round(m["rows"] / wall, 1), "rows_per_s_ray_job": round(m["rows"] / ray_job_s, 1),
            "driver_rss_before_mib": round(r["base_rss"] / mib, 1),
            "driver_peak_rss_mib": round(peak / mib, 1),
            **{f"driver_rss_at_{q}pct_mib": round(rss_at(samples, wall * q / 100) / mib, 1) for q in (10, 50, 90)},
            "driver_rss_end_of_ray_job_mib": round(rss_at(samples, ray_job_s) / mib, 1),
            "driver_rss_last_sample_mib": round(samples[-1][1] / mib, 1),
            "samples": len(samples),
        }
        print(json.dumps(res), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
