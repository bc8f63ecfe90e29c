"""Calibrate the demo world on P1 and P2 alone (issue 10): build worlds over a few pretraining
mixtures and report, on the **dev** set, the base model's math accuracy, full-pool fine-tuning and
the oracle half (both in process, the demo's fine-tuning settings). No IGDS stage runs here and the
test set is never read, so the world's parameters cannot be tuned to IGDS's result.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/world_calibration.py --out bench_out/calib \
        --grid "math_share=0.1,arith_share=0.0" "math_share=0.2,arith_share=0.0" [--quick] [--seeds 0 1]

Prints one line per (setting, world seed) and writes `<out>/calibration.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path


def parse_setting(text: str) -> dict:
    from igds_ray.demo.world import WorldSpec

    types = {f.name: f.type for f in dataclasses.fields(WorldSpec)}
    out = {}
    for part in filter(None, text.split(",")):
        key, _, val = part.partition("=")
        if key not in types:
            raise SystemExit(f"unknown WorldSpec field {key!r}")
        t = str(types[key])
        out[key] = (None if val == "None" else val if t == "str" else
                    int(val) if "int" in t and "." not in val else float(val))
    return out


def remeasure(world, ft: dict, setting: str, seed: int) -> dict:
    """P1/P2 of a built world under other fine-tuning settings (same base model, same pool, same dev set)."""
    import pandas as pd

    from igds_ray.demo.calibrate import measure

    spec = dataclasses.replace(world.spec, **ft)
    pool = pd.read_parquet(world.pool_dir).to_dict("records")
    dev = pd.read_parquet(world.task_file("math", "dev")).to_dict("records")
    t0 = time.perf_counter()
    c = measure(world.model_dir, pool, dev, world.stats["base_dev_accuracy"], spec.ft_epochs, spec.ft_lr,
                spec.ft_batch, spec.ft_max_tokens, range(spec.calib_seeds), progress=True,
                threads=spec.threads)
    return {"setting": setting, "ft": ft, "world_seed": seed, "key": spec.key(), "base_dev": c["base"],
            "full_dev": c["full"], "oracle_dev": c["oracle"], "full_seeds": c["full_seeds"],
            "oracle_seeds": c["oracle_seeds"], "p2_se2": c["p2_se2"], "p1": c["p1"], "p2": c["p2"],
            "p1_margin": c["p1_full_minus_base"], "p2_margin": c["p2_oracle_minus_full"],
            "measure_s": round(time.perf_counter() - t0, 1)}


def repool(world_dir: Path, setting: str) -> dict:
    """P1/P2 of a built world's base model with the pool regenerated under other pool settings (e.g.
    wrong_answers=slip): the pool plays no part in pretraining or SAE training, so the base is the same."""
    from igds_ray.demo.calibrate import measure
    from igds_ray.demo.world import WorldSpec, math_sets, pool_rows, prompt_formats, summarization_sets, \
        translation_sets

    info = json.loads((world_dir / "world.json").read_text())
    spec = dataclasses.replace(WorldSpec(**info["spec"]), **parse_setting(setting))
    mp, tp, sp = prompt_formats()
    m = math_sets(spec.seed, spec.n_recall, spec.n_dev, spec.n_test)
    held = m[3] | translation_sets(spec.seed, spec.n_recall, spec.n_dev, spec.n_test)[3] | \
        summarization_sets(spec.seed, spec.n_recall, spec.n_dev, spec.n_test)[3]
    pool = pool_rows(spec.seed, spec.pool_rows, mp, tp, sp, held, spec.wrong_answers, spec.wrong_share,
                     spec.truncated_share)
    t0 = time.perf_counter()
    c = measure(world_dir / "model", pool, m[1], info["stats"]["base_dev_accuracy"], spec.ft_epochs, spec.ft_lr,
                spec.ft_batch, spec.ft_max_tokens, range(spec.calib_seeds), progress=True,
                threads=spec.threads)
    return {"world": str(world_dir), "repool": setting, "key": spec.key(), "base_dev": c["base"],
            "full_dev": c["full"], "oracle_dev": c["oracle"], "full_seeds": c["full_seeds"],
            "oracle_seeds": c["oracle_seeds"], "p2_se2": c["p2_se2"], "p1": c["p1"], "p2": c["p2"],
            "p1_margin": c["p1_full_minus_base"], "p2_margin": c["p2_oracle_minus_full"],
            "measure_s": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> None:
    from igds_ray.demo.world import WorldSpec, build_world

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench_out/calib")
    ap.add_argument("--grid", nargs="+", default=["math_share=0.1,arith_share=0.0"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--quick", action="store_true", help="the quick world's sizes")
    ap.add_argument("--keep", action="store_true", help="keep the built worlds")
    ap.add_argument("--ft-grid", nargs="*", default=[],
                    help="extra fine-tuning settings measured on each built world without rebuilding it, e.g. "
                         "ft_epochs=10,ft_lr=0.003 (the base model and the pool do not depend on them)")
    ap.add_argument("--repool", nargs=2, metavar=("WORLD_DIR", "SETTING"), action="append", default=[],
                    help="measure a built world's base model on a pool regenerated with SETTING (pool fields only)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for wdir, setting in args.repool:
        results.append(repool(Path(wdir), setting))
        print(json.dumps(results[-1]), flush=True)
    if args.repool:
        args.grid = []
    for setting in args.grid:
        kw = parse_setting(setting)
        for seed in args.seeds:
            base = WorldSpec.quick(seed) if args.quick else WorldSpec(seed=seed)
            spec = dataclasses.replace(base, **kw)
            wdir = out / f"world-{spec.key()}"
            t0 = time.perf_counter()
            world = build_world(wdir, spec, progress=True)
            c = world.stats["calibration"]
            row = {"setting": setting, "world_seed": seed, "quick": args.quick, "key": spec.key(),
                   "base_dev": c["base"], "full_dev": c["full"], "oracle_dev": c["oracle"],
                   "full_seeds": c["full_seeds"], "oracle_seeds": c["oracle_seeds"], "p2_se2": c["p2_se2"],
                   "p1": c["p1"], "p2": c["p2"], "p1_margin": c["p1_full_minus_base"],
                   "p2_margin": c["p2_oracle_minus_full"], "build_s": round(time.perf_counter() - t0, 1),
                   "pretrain_loss": world.stats["pretrain"]["loss_last"], "sae_fve": world.stats["sae"].get("fve")}
            results.append(row)
            print(json.dumps(row), flush=True)
            for ft in args.ft_grid:
                results.append(remeasure(world, parse_setting(ft), setting, seed))
                print(json.dumps(results[-1]), flush=True)
            if not args.keep:
                shutil.rmtree(wdir, ignore_errors=True)
    (out / "calibration.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
