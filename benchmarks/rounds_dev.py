"""How should a continued round fine-tune? A probe on the demo world's DEV set (issue 14), never the test set.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/rounds_dev.py --rounds-dir bench_out/rounds --out bench_out/rounds_dev

Takes round 1 and the first new pool file of a `benchmarks/rounds.py` run, and runs round 2 (arms igds and
random, continuing round 1's models) with each continuation recipe, evaluated on the math dev set:
- `repeat`: round 1's recipe again (the default: `rounds.finetune` empty, replay 0.5);
- `epochs5`: 5 epochs instead of 20;
- `lr_div10`: a tenth of round 1's peak learning rate;
- `no_replay`: only the new rows (replay 0).
plus `round1`: round 1's models themselves on the dev set (the baseline every recipe is compared with).
Rule, written before the probe ran: the demo's default recipe is the one with the highest mean dev accuracy
over the two arms; `repeat` stays unless another beats it by more than 1 point. Writes `<out>/rounds-dev.json`.

`--drift`: the drift policy instead. Round 3 of the rounds run (its off-task file flagged by the monitor) again,
continuing its round 2, on the dev set: `train` (as the demo did) against `keep` (`rounds.on_drift: keep`: every
arm keeps round 2's model). Rule, written before this probe ran (after the test-set rounds run had been seen):
`keep` becomes the demo's `rounds.on_drift` only if its mean dev accuracy beats `train`'s by more than 1 point.
Writes `<out>/rounds-drift-dev.json`.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

RECIPES = {"round1": None, "repeat": {}, "epochs5": {"finetune": {"epochs": 5}},
           "lr_div10": {"finetune": {"lr": "div10"}}, "no_replay": {"replay": 0.0}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds-dir", dest="rounds_dir", required=True, help="a benchmarks/rounds.py --out")
    ap.add_argument("--out", required=True)
    ap.add_argument("--drift", action="store_true", help="probe rounds.on_drift on round 3 instead")
    args = ap.parse_args()
    if args.drift:
        return drift_probe(Path(args.rounds_dir).resolve(), Path(args.out).resolve())

    from igds_ray import pipeline
    from igds_ray.config import from_dict
    from igds_ray.stages.score import init_ray

    src, out = Path(args.rounds_dir).resolve(), Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "round-1").exists():
        shutil.copytree(src / "round-1", out / "round-1")  # its scores are found in the copy
    pool = out / "pool"
    if not pool.exists():
        pool.mkdir()
        r1 = json.loads((src / "round-1" / "config.json").read_text())
        for f in sorted(Path(r1["pool"]["path"]).glob("*.parquet")):
            if not f.name.startswith("new-") or f.name == "new-002.parquet":  # round 1's files + the first new one
                shutil.copy2(f, pool / f.name)
    base = json.loads((out / "round-1" / "config.json").read_text())
    dev = dev_file(src)
    init_ray()
    res = {}
    for name, recipe in RECIPES.items():
        rounds = {"continue_from": str(out / "round-1"), "replay": 0.5}
        if recipe is None:
            rounds["min_new_rows"] = 10 ** 9  # every arm keeps round 1's model: round 1 on the dev set
        else:
            ft = dict(recipe.get("finetune", {}))
            if ft.get("lr") == "div10":
                ft["lr"] = base["finetune"]["lr"] / 10
            rounds.update(finetune=ft, replay=recipe.get("replay", 0.5))
        data = {**{k: v for k, v in base.items() if k not in ("run_dir", "rounds", "overwrite")},
                "run_dir": str(out / name), "arms": ["igds", "random"], "rounds": rounds,
                "pool": {**base["pool"], "path": str(pool)},
                "evaluate": {**base["evaluate"], "source": dev, "split": None, "limit": None}}
        pipeline.run(from_dict(pipeline.RunConfig, data))
        m = json.loads((out / name / "eval" / "metrics.json").read_text())
        res[name] = {a: m["arms"][a]["metrics"]["metric"] for a in ("igds", "random")}
        res[name]["mean"] = (res[name]["igds"] + res[name]["random"]) / 2
        print(name, json.dumps(res[name]), flush=True)
    best = max((n for n in res if n != "round1"), key=lambda n: res[n]["mean"])
    chosen = best if res[best]["mean"] > res["repeat"]["mean"] + 0.01 else "repeat"
    res["_rule"] = {"best": best, "chosen": chosen, "dev_set": dev}
    (out / "rounds-dev.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res["_rule"]))


def dev_file(src: Path) -> str:
    """The math dev set of the world the rounds in `src` ran on."""
    from igds_ray.demo.world import WorldSpec, world_at

    world = Path(json.loads((src / "rounds-demo.json").read_text())["world"])
    spec = WorldSpec(**json.loads((world / "world.json").read_text())["spec"])
    return str(world_at(world, spec, {}).task_file("math", "dev"))


def drift_probe(src: Path, out: Path) -> None:
    from igds_ray import pipeline
    from igds_ray.config import from_dict
    from igds_ray.stages.score import init_ray

    out.mkdir(parents=True, exist_ok=True)
    base = json.loads((src / "round-3" / "config.json").read_text())
    dev = dev_file(src)
    init_ray()
    res = {}
    for name in ("train", "keep"):
        rounds = {**base["rounds"], "continue_from": str(src / "round-2"), "keep_models": name == "keep"}
        data = {**{k: v for k, v in base.items() if k not in ("run_dir", "rounds", "overwrite")},
                "run_dir": str(out / f"drift-{name}"), "rounds": rounds,
                "evaluate": {**base["evaluate"], "source": dev, "split": None, "limit": None}}
        pipeline.run(from_dict(pipeline.RunConfig, data))
        m = json.loads((out / f"drift-{name}" / "eval" / "metrics.json").read_text())
        res[name] = {a: m["arms"][a]["metrics"]["metric"] for a in ("igds", "random")}
        res[name]["mean"] = (res[name]["igds"] + res[name]["random"]) / 2
        print(name, json.dumps(res[name]), flush=True)
    res["_rule"] = {"chosen": "keep" if res["keep"]["mean"] > res["train"]["mean"] + 0.01 else "train",
                    "dev_set": dev}
    (out / "rounds-drift-dev.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res["_rule"]))


if __name__ == "__main__":
    main()
