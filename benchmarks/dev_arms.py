"""Choose a demo default on the **dev** set (issue 10): run the demo's pipeline on a built world with
evaluation pointed at the dev problems instead of the test problems, for the arms and config
overrides given. The test set is never read, so a default chosen from these figures is not tuned to
the reported results.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/dev_arms.py --world runs/demo3/world --out bench_out/devll \
        --seeds 2 --arms igds,igds_no_causal,igds_response,random --set causal.rank_by=loglik

`--set key.sub=VALUE` overrides one key of the demo's config (VALUE is read as JSON, else as a string).
Writes `<out>/seed-N/` run directories (their `eval/metrics.json` hold **dev** accuracy) and, with
more than one seed, `<out>/seeds.md`.
"""

from __future__ import annotations

import argparse
import json


def parse_set(items: list[str]) -> dict:
    out: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {item!r}: expected key.sub=VALUE")
        try:
            val = json.loads(raw)
        except json.JSONDecodeError:
            val = raw
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = val
    return out


def main(argv: list[str] | None = None) -> None:
    from igds_ray.demo.run import run_demo
    from igds_ray.demo.world import WorldSpec, build_world

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", required=True, help="a built (or to-be-built) world directory")
    ap.add_argument("--world-seed", type=int, default=0, help="the world spec's seed (must match a built world)")
    ap.add_argument("--out", required=True, help="run directory for the probe")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--arms", default="igds,random", help="comma-separated arms")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    a = ap.parse_args(argv)
    world = build_world(a.world, WorldSpec(seed=a.world_seed), progress=True)
    overrides = parse_set(a.set)
    ev = overrides.setdefault("evaluate", {})
    if "source" in ev:
        raise SystemExit("--set evaluate.source: this probe always evaluates on the world's dev set")
    ev.update(source=str(world.task_file("math", "dev")), split=None, limit=None)
    print(f"[dev_arms] evaluation on the DEV set: {ev['source']}; overrides {json.dumps(overrides)}", flush=True)
    run_demo(a.out, seeds=a.seeds, world_dir=a.world, world_seed=a.world_seed,
             arms=tuple(x for x in a.arms.split(",") if x), overrides=overrides, eval_set="DEV")


if __name__ == "__main__":
    main()
