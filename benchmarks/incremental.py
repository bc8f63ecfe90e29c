"""Incremental scoring over rounds of a growing pool (issue 14): forward passes and wall time per round,
against scoring the grown pool from scratch, and a projection to 100M rows + 1M new rows a day.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/incremental.py --world runs/demo/world --feature l2_p22 \
        --out bench_out/incremental [--rounds 3] [--new-rows 500]

Round 0 scores the demo world's pool (its 4 files); each later round adds one file of `--new-rows` new
pool rows (the world's own generator, another seed, fresh ids) and scores incrementally. The scorers
count the rows they run through the model (`forward_log`). Every round the grown pool is also scored
from scratch into another directory, for the wall-time comparison and to check that the scores agree.
Writes `<out>/incremental.json` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path


def new_file(world_dir: Path, pool: Path, r: int, n: int) -> int:
    from igds_ray.demo.world import WorldSpec, new_pool_file

    spec = WorldSpec(**json.loads((world_dir / "world.json").read_text())["spec"])
    return new_pool_file(world_dir, pool, f"round-{r:03d}.parquet", n, spec.seed + 1000 + r)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", required=True, help="a built demo world directory (igds demo writes <run>/world)")
    ap.add_argument("--feature", required=True, help="the IGDS feature to score, e.g. l2_p22")
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-rows", dest="new_rows", type=int, default=500)
    args = ap.parse_args()

    import numpy as np
    import pandas as pd

    from igds_ray.config import ScoreConfig, from_dict
    from igds_ray.stages import score
    from igds_ray.stages.parts import read_summaries
    from igds_ray.stages.score import init_ray
    from igds_ray.storage import StageDir

    world, out = Path(args.world).resolve(), Path(args.out).resolve()
    if out.exists():
        shutil.rmtree(out)
    pool = out / "pool"
    shutil.copytree(world / "pool", pool)
    init_ray()

    def cfg(dest: Path, incremental: bool) -> ScoreConfig:
        return from_dict(ScoreConfig, dict(
            model=str(world / "model"), sae=str(world / "sae"), features=[args.feature],
            pool={"path": str(pool), "prompt_template": "none", "rows_per_read_task": 250}, out=str(dest),
            pooling="prompt_max", max_tokens=128, batch_size=250, incremental=incremental))

    rounds = []
    for r in range(args.rounds + 1):
        added = 0 if r == 0 else new_file(world, pool, r, args.new_rows)
        log = out / f"forward-{r}"
        t0 = time.perf_counter()
        m = score.run(cfg(out / "scores", True), hooks={"forward_log": str(log)})
        wall = time.perf_counter() - t0
        handed, fwd = score.read_forward_log(str(log))
        t1 = time.perf_counter()
        scratch = score.run(cfg(out / f"scratch-{r}", False))
        wall_scratch = time.perf_counter() - t1
        sd = StageDir(str(out / "scores"))
        t2 = time.perf_counter()  # what an increment's plan reads: the committed parts' footers
        read_summaries(sd.fs, [str(out / "scores" / f) for f in m["files"]])
        footer_s = time.perf_counter() - t2
        a = pd.concat([pd.read_parquet(out / "scores" / f) for f in m["files"]]).set_index(["src_file", "src_row"])
        b = pd.read_parquet(out / f"scratch-{r}").set_index(["src_file", "src_row"])
        a, b = a.sort_index(), b.sort_index()
        same = bool((a.index == b.index).all() and np.allclose(a["score"], b["score"], rtol=1e-5, atol=1e-6))
        rounds.append({"round": r, "pool_rows": m["rows"], "new_rows": added if r else m["rows"],
                       "forwarded": fwd, "handed": handed, "reused_rows": m.get("reused_rows", 0),
                       "scored_rows": m["scored_rows"], "version": m["version"], "parts": len(m["files"]),
                       "wall_s": round(wall, 2), "scratch_wall_s": round(wall_scratch, 2),
                       "footer_read_s": round(footer_s, 4), "same_scores_as_scratch": same,
                       "scratch_rows": scratch["rows"]})
        print(json.dumps(rounds[-1]), flush=True)

    # Projection from the measured runs: a least-squares line through the from-scratch walls (wall = start-up +
    # rows / rate: Ray Data and actor start-up, model load) gives the scoring rate; an increment's fixed cost is
    # its wall less its forwarded rows at that rate.
    big = [x for x in rounds if x["round"] > 0]
    slope, start = np.polyfit([x["scratch_rows"] for x in rounds], [x["scratch_wall_s"] for x in rounds], 1)
    rate = float(1.0 / slope) if slope > 0 else float("nan")
    fixed = float(np.median([x["wall_s"] - x["forwarded"] / rate for x in big])) if big else 0.0
    per_part = float(np.median([x["footer_read_s"] / x["parts"] for x in rounds]))
    parts_100m = 20_000  # protocol.MAX_PARTS: write tasks gather >= rows / 20k rows
    proj = {"rate_rows_per_s_2cpu": round(rate, 1), "scratch_startup_s": round(float(start), 2),
            "increment_fixed_s": round(fixed, 2),
            "footer_read_s_per_part": per_part,
            "from_scratch_100m_h": round(100e6 / rate / 3600, 1),
            "increment_1m_new_h": round((1e6 / rate + fixed + parts_100m * per_part) / 3600, 2)}
    res = {"world": str(world), "feature": args.feature, "rounds": rounds, "projection": proj}
    (out / "incremental.json").write_text(json.dumps(res, indent=2))
    print("| round | pool rows | new rows | forwarded | reused | wall (s) | from scratch (s) | same scores |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for x in rounds:
        print(f"| {x['round']} | {x['pool_rows']:,} | {x['new_rows']:,} | {x['forwarded']:,} | {x['reused_rows']:,} "
              f"| {x['wall_s']} | {x['scratch_wall_s']} | {x['same_scores_as_scratch']} |")
    print(json.dumps(proj))


if __name__ == "__main__":
    main()
