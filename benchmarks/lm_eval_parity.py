"""Parity of igds's built-in evaluator with lm-evaluation-harness on a finished run (issue 13, part 4).

For every arm evaluated in `<run>/eval/metrics.json`, lm-eval generates on the run's own test set (the local
task `write_local_task` writes: igds's prompts byte for byte, greedy, the same max new tokens and stop
sequences) with the arm's weights (`models/<arm>/`: a full model dir or a PEFT adapter), and the table shows:

  built-in     the arm's metric in metrics.json (igds's generation + igds's metric)
  igds@lm      igds's metric on lm-eval's generations (isolates the generation loop)
  lm-eval      lm-eval's metric (exact_match on igds's answer extraction for math; chrF/100, ROUGE-L otherwise)
  regex        math only: lm-eval's own regex filter + exact_match, no igds code
  diff         (lm-eval - built-in) x test examples: problems for math, metric-weighted examples otherwise
  gen differ   test examples whose generation differs from eval/<arm>.parquet's prediction

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python benchmarks/lm_eval_parity.py --run-dir runs/demo \
        [--arms base,igds] [--model hf|vllm] [--adapter-mode peft|merged] [--threads 2] [--json out.json]
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
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def load_run(run_dir: str) -> tuple[object, dict, object, list]:
    """(RunConfig, metrics.json, task, test examples) as `igds_ray.stages.evaluate.run` loaded them."""
    from igds_ray.config import from_dict
    from igds_ray.pipeline import RunConfig
    from igds_ray.storage import exists, join, read_json
    from igds_ray.tasks import get_task, load_task_set

    for name in ("config.json", "eval/metrics.json"):
        if not exists(join(run_dir, name)):
            raise SystemExit(f"{run_dir}: no {name} (a finished igds run directory has both)")
    cfg = from_dict(RunConfig, read_json(join(run_dir, "config.json")))
    metrics = read_json(join(run_dir, "eval", "metrics.json"))
    task = get_task(cfg.task.name, **cfg.task.options)
    e = cfg.evaluate
    test = load_task_set(task, e.source or cfg.task.source, split=e.split, columns=cfg.task.columns or None,
                         limit=e.limit, seed=e.seed)
    return cfg, metrics, task, list(test.examples)


def parity(run_dir: str, arms: list[str] | None, model_type: str, adapter_mode: str,
           batch_size: int | None) -> list[dict]:
    import pandas as pd

    from igds_ray.stages.evaluate_lmeval import run_lm_eval
    from igds_ray.stages.lmeval_task import REGEX_FILTER, headline, write_local_task
    from igds_ray.tasks import MathTask

    cfg, metrics, task, examples = load_run(run_dir)
    e = cfg.evaluate
    key, scale = headline(task) or (None, 1.0)
    ok = {a: info for a, info in metrics["arms"].items() if info.get("status") == "ok"}
    todo = [a for a in (arms or ok) if a in ok]
    missing = sorted(set(arms or []) - set(ok))
    if missing:
        print(f"skipped (not evaluated, or failed, in metrics.json): {', '.join(missing)}", file=sys.stderr)
    n = len(examples)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lm-eval-parity-") as tmp:
        include, name = write_local_task(task, examples, e.template, tmp, e.max_new_tokens,
                                         repetition_penalty=e.repetition_penalty)
        for arm in todo:
            info = ok[arm]
            t0 = time.time()
            res = run_lm_eval(info["model"], [name], include, model_type, adapter_mode=adapter_mode,
                              batch_size=batch_size or e.batch_size,
                              vllm_options={"max_model_len": 4096} if model_type == "vllm" else None)
            samples = res["samples"][name]
            preds = [s["prediction"] for s in samples]
            eval_file = Path(run_dir) / "eval" / f"{arm}.parquet"
            differ = None
            if eval_file.is_file():
                ours = pd.read_parquet(eval_file, columns=["id", "prediction"])
                if list(ours["id"]) != [x.id for x in examples]:
                    raise SystemExit(f"{eval_file}: its ids are not this run's test set as reloaded")
                differ = int(sum(a != b for a, b in zip(preds, ours["prediction"])))
            got = res["tasks"][name]
            lm = got[key] * scale if key in got else None
            built = float(info["metrics"]["metric"])
            rows.append({
                "arm": arm, "n": n, "builtin": built,
                "igds_on_lm_eval": float(task.corpus_metric(preds, examples)["metric"]),
                "lm_eval": lm,
                "regex": got.get(f"exact_match,{REGEX_FILTER}") if isinstance(task, MathTask) else None,
                "diff": None if lm is None else round((lm - built) * n, 2),
                "gen_differ": differ, "wall_s": round(time.time() - t0, 1),
                "model": res["model_args"].get("pretrained"), "adapter": res["adapter"],
            })
            print(f"[{arm}] done in {rows[-1]['wall_s']} s", file=sys.stderr)
    return rows


def table(rows: list[dict]) -> str:
    def f(v: object, fmt: str = "{:.4f}") -> str:
        return "-" if v is None else fmt.format(v) if isinstance(v, float) else str(v)

    head = "| arm | n | built-in | igds@lm | lm-eval | regex | diff | gen differ | s |"
    out = [head, "|" + "---|" * 9]
    for r in rows:
        out.append(f"| {r['arm']} | {r['n']} | {f(r['builtin'])} | {f(r['igds_on_lm_eval'])} | {f(r['lm_eval'])} | "
                   f"{f(r['regex'])} | {f(r['diff'], '{:+g}')} | {f(r['gen_differ'])} | {f(r['wall_s'], '{:g}')} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", required=True, help="a finished igds run (eval/metrics.json, models/<arm>/)")
    p.add_argument("--arms", default=None, help="comma-separated arms (default: every arm evaluated ok)")
    p.add_argument("--model", choices=("hf", "vllm"), default="hf", help="lm-eval model type")
    p.add_argument("--adapter-mode", choices=("peft", "merged"), default="peft", help="LoRA arms: peft= or merged")
    p.add_argument("--batch-size", type=int, default=None, help="default: the run's evaluate.batch_size")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", default=None, help="also write the rows here")
    a = p.parse_args(argv)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    rows = parity(a.run_dir, a.arms.split(",") if a.arms else None, a.model, a.adapter_mode, a.batch_size)
    from igds_ray.stages.evaluate_lmeval import lm_eval_version

    print(f"lm-eval {lm_eval_version()}, model {a.model}, adapters {a.adapter_mode}, run {a.run_dir}")
    print(table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
