"""Pickled bytes of one pool read task as the pool's file count grows (issue 12, part 2).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/read_task_size.py [--files 20,1000,10000]

A pool of N files with 5 row groups of 1,000 rows each is described in memory (no file is written: a
read task is pickled, never run), split into read tasks as `igds score` splits it (8,192 rows per task),
and the first, a middle and the last task are pickled with Ray's serializer (cloudpickle). A task
used to close over the whole `Pool` (every file and row group); it now carries its own `ChunkSpec`.
"""

from __future__ import annotations

import argparse
import json

import pyarrow as pa
import ray.cloudpickle as cloudpickle

from igds_ray.pool import Pool, PoolFile, make_datasource


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", default="20,1000,10000")
    args = ap.parse_args()
    out = []
    for n in (int(x) for x in args.files.split(",")):
        files = tuple(PoolFile(f"/pool/part-{i:06d}.parquet", f"part-{i:06d}.parquet", (1000,) * 5, 1 << 20)
                      for i in range(n))
        pool = Pool("/pool", files, ("prompt", "response"), "id", pa.string())
        tasks = make_datasource(pool, 8192).get_read_tasks(1)
        sizes = [len(cloudpickle.dumps(tasks[i])) for i in (0, len(tasks) // 2, len(tasks) - 1)]
        out.append({"files": n, "tasks": len(tasks), "task_bytes": max(sizes)})
        print(f"{n:>6} files: {len(tasks):>6} read tasks, {max(sizes):,} bytes per pickled task", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
