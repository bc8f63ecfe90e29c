"""Scale: does anything on the driver grow with the pool's rows or files? (issue 12)

    nice python benchmarks/scale.py [--sizes 100000x20,100000x4000,1000000x20,10000000x20] [--work DIR]
                                    [--select-sizes 1000000x20,10000000x20] [--json OUT]

For each `ROWSxFILES` size, in a fresh driver process with its own local Ray (2 CPUs here), with the tiny
world's model and SAE (`build_world`) and a generated pool (`load_1m.make_pool`, kept under `--work` so a
rerun reuses it):
1. `igds score` (`score.run`: read -> scorer actor -> part writes -> exactly-once check -> commit), the
   driver's RSS sampled every 0.2 s from a thread;
2. for the sizes in `--select-sizes`, `igds select` (top 50%, through the distributed path:
   `local_max_rows=0`, text fetched back from the pool) in another fresh driver, sampled the same way.
Then the per-file and per-task costs are measured directly (a read task's pickled bytes; the driver's
bytes per pool file and per part summary) and projected to 1B rows in 100k files. Prints a Markdown
table and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from load_1m import make_pool  # noqa: E402  (the pool generator, shared)

CHILD = r"""
import json, os, sys, threading, time
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
import psutil, ray
what, world, pool, out, scores = sys.argv[1:6]
ray.init(num_cpus=int(os.environ.get("SCALE_CPUS", "2")), include_dashboard=False, logging_level="ERROR",
         log_to_driver=False)
proc = psutil.Process()
samples, done = [], threading.Event()
def sample():
    while not done.is_set():
        samples.append(proc.memory_info().rss)
        time.sleep(0.2)
from igds_ray.config import ScoreConfig, SelectConfig, from_dict
from igds_ray.stages import score, select
base = proc.memory_info().rss
threading.Thread(target=sample, daemon=True).start()
t0 = time.time()
if what == "score":
    cfg = from_dict(ScoreConfig, dict(model=world + "/model", sae=world + "/sae_jumprelu",
            features="l0_p3,l0_p17,l0_p40", pool=dict(path=pool), out=out, pooling="last", batch_size=2048,
            min_actors=1, max_actors=1, num_cpus=1))
    m = score.run(cfg)
    res = {k: m[k] for k in ("rows", "errors", "tokens", "wall_s", "duplicate_ids", "duplicate_ids_counted")}
    res["parts"] = len(m["files"])
else:
    cfg = from_dict(SelectConfig, dict(scores=scores, out=out, fraction=0.5, local_max_rows=0))
    m = select.run(cfg)
    res = {k: m[k] for k in ("rows", "rows_scored", "ranked_in", "tie_block", "zero_rows")}
wall = time.time() - t0
done.set()
res.update(wall=wall, base_rss=base, peak_rss=max(samples + [base]), samples=len(samples))
print(json.dumps(res))
"""

MIB = 2 ** 20


def child(what: str, world: Path, pool: Path, out: Path, scores: Path | None = None) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, what, str(world), str(pool), str(out), str(scores or "")],
                          capture_output=True, text=True, check=False,
                          env={**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"})  # the child's Ray Data only
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed:\n{proc.stderr[-5000:]}")
    # the result is the last JSON line (Ray or a library may print to stdout too)
    return json.loads(next(ln for ln in reversed(proc.stdout.strip().splitlines()) if ln.startswith("{")))


def per_file_costs(pool_dir: Path) -> dict:
    """What the driver holds per pool file and per part, and what a read task pickles to."""
    import ray.cloudpickle as cloudpickle

    from igds_ray.pool import discover, make_datasource
    from igds_ray.stages.parts import summarize

    import pyarrow as pa

    pool = discover(str(pool_dir), ("prompt", "response"), None)
    tasks = make_datasource(pool, pool.rows_per_read_task()).get_read_tasks(1)
    task_bytes = max(len(cloudpickle.dumps(t)) for t in (tasks[0], tasks[len(tasks) // 2], tasks[-1]))
    per_file = len(pickle.dumps(pool)) / len(pool.files)
    # A part's summary as the driver keeps it (the write return, without the resume runs), as JSON text.
    t = pa.table({"id": ["x"] * 8192, "score": [1.0] * 8192, "n_tokens": pa.array([5] * 8192, pa.int32()),
                  "truncated": [False] * 8192, "error": pa.nulls(8192, pa.string()),
                  "src_file": ["part-000.parquet"] * 8192, "src_row": list(range(8192))})
    s = summarize(t, "0" * 32)
    s.pop("runs")
    return {"read_tasks": len(tasks), "rows_per_read_task": pool.rows_per_read_task(),
            "read_task_pickled_bytes": task_bytes, "driver_bytes_per_pool_file": round(per_file),
            "driver_bytes_per_part_summary": len(json.dumps(s)) + 100}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100000x20,100000x4000,1000000x20,10000000x20")
    p.add_argument("--select-sizes", default="1000000x20,10000000x20", help="sizes also selected (distributed path)")
    p.add_argument("--work", help="keep pools and outputs here (default: a temp dir)")
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args()

    from igds_ray.demo.tiny import build_world

    work = Path(args.work or tempfile.mkdtemp(prefix="igds-scale-"))
    world = work / "world"
    if not (world / "model").exists():
        build_world(world, n_rows=64, architectures=("jumprelu",))
    results = []
    for size in args.sizes.split(","):
        rows, files = (int(x) for x in size.split("x"))
        pool = work / f"pool-{size}"
        if not pool.exists():
            t = time.time()
            make_pool(pool, rows, files)
            print(f"[scale] {size}: pool generated in {time.time() - t:.0f} s", flush=True)
        out = work / f"scores-{size}"
        cached = work / f"score-result-{size}.json"  # a rerun reuses a finished measurement of this size
        if cached.exists() and (out / "_SUCCESS").exists():
            r = json.loads(cached.read_text())
            print(f"[scale] {size}: score measurement reused from {cached}", flush=True)
        else:
            if out.exists():
                import shutil

                shutil.rmtree(out)
            r = {"size": size, "rows": rows, "files": files, **per_file_costs(pool)}
            s = child("score", world, pool, out)
            r.update(score_wall_s=round(s["wall"], 1), score_rows_per_s=round(rows / s["wall"], 1),
                     score_parts=s["parts"], score_driver_before_mib=round(s["base_rss"] / MIB, 1),
                     score_driver_peak_mib=round(s["peak_rss"] / MIB, 1),
                     duplicate_ids_counted=s["duplicate_ids_counted"])
            cached.write_text(json.dumps(r))
            print(f"[scale] {size}: scored in {s['wall']:.0f} s, driver peak {s['peak_rss'] / MIB:.0f} MiB", flush=True)
        if size in args.select_sizes.split(",") and "select_wall_s" not in r:
            sel = work / f"selection-{size}"
            if sel.exists():
                import shutil

                shutil.rmtree(sel)
            q = child("select", world, pool, sel, out)
            r.update(select_wall_s=round(q["wall"], 1), select_rows_per_s=round(rows / q["wall"], 1),
                     select_rows=q["rows"], select_driver_peak_mib=round(q["peak_rss"] / MIB, 1))
            cached.write_text(json.dumps(r))
            print(f"[scale] {size}: selected {q['rows']} rows in {q['wall']:.0f} s, driver peak "
                  f"{q['peak_rss'] / MIB:.0f} MiB", flush=True)
        part = next(iter(sorted(out.glob("*.parquet"))))
        import pyarrow.parquet as pq

        t = pq.read_table(part, columns=["id", "score", "src_file", "src_row"])
        r["select_object_store_bytes_per_row"] = round(t.nbytes / t.num_rows + 8, 1)  # + the tie key
        results.append(r)

    # Projection to 1B rows in 100k files, from the measured per-file / per-part / per-task costs.
    big = max(results, key=lambda r: (r["rows"], -r["files"]))  # the largest pool in the fewest files
    rows_per_part = big["rows"] / big["score_parts"]
    parts_1b = 1e9 / rows_per_part
    tasks_1b = 100_000 * max(1, (1e9 / 100_000) // big["rows_per_read_task"] + 1)
    proj = {
        "pool_files": 100_000, "rows": 1_000_000_000,
        "read_tasks": int(tasks_1b),
        "parts": int(parts_1b),
        "driver_pool_mib": round(100_000 * big["driver_bytes_per_pool_file"] / MIB, 1),
        "driver_part_summaries_mib": round(parts_1b * big["driver_bytes_per_part_summary"] / MIB, 1),
        "read_task_pickled_bytes": big["read_task_pickled_bytes"],
        "read_tasks_pickled_mib": round(tasks_1b * big["read_task_pickled_bytes"] / MIB, 1),
        # select materialises (id, score, tie, src_file, src_row) once, in the object store (spilled to disk)
        "select_object_store_gib": round(1e9 * big["select_object_store_bytes_per_row"] / 2**30, 1),
    }
    print("\n| pool | score wall | rows/s | parts | driver before | driver peak | select wall | select rows/s | "
          "select driver peak | read task (bytes) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['rows']:,} rows / {r['files']:,} files | {r['score_wall_s']} s | {r['score_rows_per_s']:,.0f} | "
              f"{r['score_parts']:,} | {r['score_driver_before_mib']} MiB | {r['score_driver_peak_mib']} MiB | "
              f"{r.get('select_wall_s', '–')} s | {r.get('select_rows_per_s', '–')} | "
              f"{r.get('select_driver_peak_mib', '–')} MiB | {r['read_task_pickled_bytes']} |")
    print(f"\nprojection, 1B rows in 100k files: {json.dumps(proj)}")
    out = {"results": results, "projection_1b": proj}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
