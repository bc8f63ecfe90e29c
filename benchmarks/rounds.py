"""Rounds of continuous selection on the demo world (issue 14): forwarding, wall time and cost per round against
a from-scratch run on the same grown pool, and a projection to a 100M-row pool growing by 1M rows a day.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/rounds.py --world runs/demo/world --out bench_out/rounds \
        [--rounds 3] [--new-rows 1000]

It runs `igds demo --rounds N` (round 1 on the world's pool; before each later round one new file lands, the
last one off-task: the drift case), then `igds run` from scratch on the final grown pool with the same config
(features found again, every row scored, every arm trained from the base on its whole selection). Writes
`<out>/rounds-bench.json` and prints a table.

Projection (from this run's measured rates, stated as such): scoring rows/s from the from-scratch run's score
stage, fine-tuning rows/s (training rows x epochs per second) from its igds arm; a day's round forwards the new
rows and trains on their selected part plus the replay share; a from-scratch run forwards the whole pool and
trains on its selected half.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-rows", dest="new_rows", type=int, default=None)
    args = ap.parse_args()

    from igds_ray import pipeline
    from igds_ray.config import from_dict
    from igds_ray.demo.run import run_rounds
    from igds_ray.ledger import read_all

    out = Path(args.out).resolve()
    summary = run_rounds(str(out), args.rounds, world_dir=args.world, new_rows=args.new_rows)
    last = json.loads((out / f"round-{args.rounds}" / "config.json").read_text())
    data = {k: v for k, v in last.items() if k not in ("run_dir", "rounds", "overwrite")}
    scratch_dir = out / "scratch"
    t0 = time.perf_counter()
    pipeline.run(from_dict(pipeline.RunConfig, {**data, "run_dir": str(scratch_dir)}))
    scratch_wall = time.perf_counter() - t0
    recs = read_all(str(scratch_dir))
    scratch_metrics = json.loads((scratch_dir / "eval" / "metrics.json").read_text())
    score = next(r for r in recs if r.stage.startswith("score_l"))
    ft = next(r for r in recs if r.stage == "finetune" and r.arm == "igds")
    epochs = data["finetune"].get("epochs", 1)
    score_rate = score.rows / score.wall_s
    train_rate = ft.rows * epochs / ft.wall_s  # includes the trainer's start-up: a lower bound on the rate
    replay = last["rounds"]["replay"]
    frac = data.get("fraction", 0.5)
    pool, new = 100e6, 1e6
    day_rows_trained = new * frac / (1 - replay)
    round_epochs = last["rounds"].get("finetune", {}).get("epochs", epochs)
    proj = {
        "score_rows_per_s": round(score_rate, 1), "train_row_epochs_per_s": round(train_rate, 1), "epochs": epochs,
        "round_epochs": round_epochs,
        "scratch_h": round((pool / score_rate + pool * frac * epochs / train_rate) / 3600, 1),
        "round_h": round((new / score_rate + day_rows_trained * round_epochs / train_rate) / 3600, 2),
        "assumes": f"{frac:.0%} kept, new rows selected at the pool's rate, replay {replay}, this machine's rates",
    }
    res = {"rounds": summary["rounds"], "scratch": {"wall_s": round(scratch_wall, 1), "pool_rows": score.rows,
                                                    "metrics": {a: i.get("metrics", {}).get("metric")
                                                                for a, i in scratch_metrics["arms"].items()},
                                                    "features": scratch_metrics.get("features")},
           "projection": proj}
    (out / "rounds-bench.json").write_text(json.dumps(res, indent=2, default=str))
    print("| round | pool rows | forwarded | igds fresh + replayed | igds metric (Δ prev) | random metric | wall (s) "
          "| drift |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in summary["rounds"]:
        a, b = r["arms"].get("igds", {}), r["arms"].get("random", {})
        d = a.get("d_previous")
        print(f"| {r['round']} | {r.get('pool_rows')} | {r.get('forwarded_rows')} | {a.get('fresh_rows')} + "
              f"{a.get('replay_rows')} | {a.get('metric')} ({'–' if d is None else f'{d:+.4f}'}) | {b.get('metric')} "
              f"| {r['wall_s']} | {r.get('drift')} |")
    print(f"| scratch | {score.rows} | {score.rows} | – | {res['scratch']['metrics'].get('igds')} | "
          f"{res['scratch']['metrics'].get('random')} | {res['scratch']['wall_s']} | – |")
    print(json.dumps(proj))


if __name__ == "__main__":
    main()
