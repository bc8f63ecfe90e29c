"""`igds report`: `<run>/report/report.md` and PNG plots, built only from the run's own files
(eval/metrics.json, eval/<arm>.parquet, selection manifests, the ledger)."""

from __future__ import annotations

import math
from typing import Any

from igds_ray.ledger import Record, read_all
from igds_ray.storage import StageDir, exists, join, read_json, write_json_atomic

BASE = "base"
FULL = "full"
from igds_ray.baselines import LABEL_ARMS as CEILING  # noqa: E402  (arms that read the pool's labels)


def arm_label(arm: str) -> str:
    return f"{arm} (ceiling: reads labels)" if arm in CEILING else arm


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:+.{digits}f}" if digits < 0 else f"{v:.{digits}f}"
    return str(v)


def _signed(v: float | None) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:+.4f}"


def arm_rows(run_dir: str, price_gpu_h: float, price_cpu_h: float) -> tuple[list[dict], dict]:
    metrics = read_json(join(run_dir, "eval", "metrics.json"))
    ledger = read_all(run_dir)
    by_arm: dict[str, list[Record]] = {}
    for r in ledger:
        by_arm.setdefault(r.arm, []).append(r)
    shared = by_arm.get("-", [])
    arms = metrics["arms"]
    base_metric = arms.get(BASE, {}).get("metrics", {}).get("metric") if arms.get(BASE, {}).get("status") == "ok" else None
    full_metric = arms.get(FULL, {}).get("metrics", {}).get("metric") if arms.get(FULL, {}).get("status") == "ok" else None
    rows = []
    for arm, info in arms.items():
        recs = by_arm.get(arm, [])
        # Stages shared by several arms (feature identification, scoring) are charged to every arm
        # that used them: the cost a user pays to produce that arm's data from scratch.
        uses = [r for r in shared if arm in r.extra.get("used_by", [])]
        stage_recs = uses + recs
        sel = join(run_dir, "selection", f"{arm}.parquet")
        frac = None
        n_rows = None
        if arm != BASE and StageDir(sel).done():
            m = StageDir(sel).manifest()
            n_rows = m.get("rows")
            frac = (m["rows"] / m["rows_scored"]) if m.get("rows_scored") else None
        train = next((r for r in recs if r.stage == "finetune"), None)
        metric = info.get("metrics", {}).get("metric") if info.get("status") == "ok" else None
        gpu_h = sum(r.gpu_hours for r in stage_recs)
        cpu_h = sum(r.cpu_hours for r in stage_recs)
        rows.append({
            "arm": arm, "status": info.get("status"), "error": info.get("error"),
            "fraction": frac, "rows": n_rows, "metric": metric,
            "d_full": (metric - full_metric) if metric is not None and full_metric is not None and arm != FULL else None,
            "d_base": (metric - base_metric) if metric is not None and base_metric is not None and arm != BASE else None,
            "train_tokens": train.tokens if train else None,
            "wall": {r.stage: round(r.wall_s, 1) for r in stage_recs},
            "gpu_h": gpu_h, "cpu_h": cpu_h, "cost": gpu_h * price_gpu_h + cpu_h * price_cpu_h,
            "feature_score_median": info.get("feature_score_median"),
        })
    return rows, metrics


def verdicts(rows: list[dict]) -> list[str]:
    """Plain sentences saying which arm beats which, whatever the outcome."""
    ok = {r["arm"]: r for r in rows if r["metric"] is not None}
    out = []
    igds = [a for a in ok if a.startswith("igds")]
    others = [a for a in ok if not a.startswith("igds") and a != BASE and a not in CEILING]
    for a in sorted(igds):
        beats = [o for o in others if ok[a]["metric"] > ok[o]["metric"]]
        loses = [o for o in others if ok[a]["metric"] < ok[o]["metric"]]
        ties = [o for o in others if ok[a]["metric"] == ok[o]["metric"]]
        s = f"- **{a}** ({ok[a]['metric']:.4f}) beats {', '.join(beats) or 'no baseline'}"
        if loses:
            s += f"; loses to {', '.join(loses)}"
        if ties:
            s += f"; ties {', '.join(ties)}"
        out.append(s + ".")
    for c in (c for c in CEILING if c in ok):
        s = f"- Ceiling **{c}** (reads the pool's labels, which no method may): {ok[c]['metric']:.4f}"
        if FULL in ok and "igds" in ok and ok[c]["metric"] > ok[FULL]["metric"]:
            gap = (ok["igds"]["metric"] - ok[FULL]["metric"]) / (ok[c]["metric"] - ok[FULL]["metric"])
            s += f"; igds closes {gap:.0%} of the gap from full to it"
        elif FULL in ok and ok[c]["metric"] <= ok[FULL]["metric"]:
            s += (f"; it does not beat full ({ok[FULL]['metric']:.4f}), so this run shows no room for any selection "
                  "above full data")
        out.append(s + ".")
    if BASE in ok:
        worse = [a for a in ok if a != BASE and ok[a]["metric"] < ok[BASE]["metric"]]
        if worse:
            out.append(f"- Below the base model ({ok[BASE]['metric']:.4f}): {', '.join(worse)}.")
    if ok:
        values = {r["metric"] for r in ok.values()}
        if len(values) == 1:
            out.append(f"- Every arm, the base model included, scores {values.pop():.4f}: nothing beats anything.")
        else:
            top = max(values)
            best = [a for a, r in ok.items() if r["metric"] == top]
            out.append(f"- Best: **{', '.join(best)}** ({top:.4f}).")
    failed = [r["arm"] for r in rows if r["status"] != "ok"]
    if failed:
        out.append(f"- Failed arms (no metric): {', '.join(failed)}.")
    return out


def feature_verdict(run_dir: str) -> list[str]:
    """A sentence when IGDS ran without a causally validated feature (features.json says how it chose)."""
    path = join(run_dir, "features", "features.json")
    if not exists(path):
        return []
    f = read_json(path)
    how = str(f.get("selected_by", ""))
    if how.startswith("fallback"):
        why = f.get("fallback_reason") or "no candidate passed the causal filter"
        return [f"- **IGDS ran without a causally validated feature**: {', '.join(f.get('features', []))} chosen by "
                f"{how} ({why})."]
    return []


def plots(run_dir: str, rows: list[dict], out_dir: str) -> list[str]:
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    made = []
    ok = [r for r in rows if r["metric"] is not None]
    if ok:
        fig, ax = plt.subplots(figsize=(max(5, len(ok) * 0.9), 3.5))
        ax.bar([r["arm"] for r in ok], [r["metric"] for r in ok],
               color=["tab:red" if r["arm"].startswith("igds") else "tab:gray" for r in ok])
        ax.set_ylabel("test metric")
        ax.set_title("Task metric by arm")
        ax.tick_params(axis="x", rotation=30)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "metric_by_arm.png"), dpi=110)
        plt.close(fig)
        made.append("metric_by_arm.png")

        data, labels = [], []
        for r in rows:
            p = os.path.join(run_dir, "eval", f"{r['arm']}.parquet")
            if r["status"] == "ok" and os.path.exists(p):
                v = pd.read_parquet(p, columns=["feature_score"])["feature_score"].dropna()
                if len(v):
                    data.append(v.to_numpy())
                    labels.append(r["arm"])
        if data:
            fig, ax = plt.subplots(figsize=(max(5, len(data) * 0.9), 3.5))
            ax.boxplot(data, showfliers=False)
            ax.set_xticks(range(1, len(labels) + 1), labels, rotation=30)
            ax.set_ylabel("chosen features' activation (sum)")
            ax.set_title("Task-feature activation on test prompts, per arm")
            fig.tight_layout()
            fig.savefig(os.path.join(out_dir, "activation_by_arm.png"), dpi=110)
            plt.close(fig)
            made.append("activation_by_arm.png")

        fig, ax = plt.subplots(figsize=(5, 3.5))
        for r in ok:
            ax.scatter(r["cost"], r["metric"], color="tab:red" if r["arm"].startswith("igds") else "tab:gray")
            ax.annotate(r["arm"], (r["cost"], r["metric"]), fontsize=8)
        ax.set_xlabel("estimated cost ($)")
        ax.set_ylabel("test metric")
        ax.set_title("Cost against metric")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "cost_vs_metric.png"), dpi=110)
        plt.close(fig)
        made.append("cost_vs_metric.png")
    return made


def composition(run_dir: str, arms: list[str], pool: Any, label_column: str) -> dict[str, dict[str, float]]:
    """Share of each label (a pool column) in the pool and in each arm's selection, rows matched by
    (src_file, src_row) in bounded memory (`igds_ray.labels`); a selected row the pool lacks counts as
    "(not a pool row)"."""
    from igds_ray.labels import PoolColumn, composition_counts

    col = PoolColumn(pool.path, label_column, "report.label_column")
    total = col.counts()
    n = max(1, sum(total.values()))
    out = {"pool": {k: v / n for k, v in total.items()}}
    for arm in arms:
        sel = join(run_dir, "selection", f"{arm}.parquet")
        if not StageDir(sel).done():
            continue
        counts = composition_counts(sel, col)
        k = max(1, sum(counts.values()))
        out[arm] = {label: c / k for label, c in counts.items()}
    return out


def selection_facts(run_dir: str, arms: list[str]) -> list[str]:
    """Per arm, from its selection manifest: the share of scored rows at exactly 0, the cutoff score,
    the tie block at the cutoff (kept / rows scoring exactly the cutoff), and for scores that
    rendered prompts into the task template, how many. Arms selected before these facts were
    recorded show dashes."""
    out = ["## Selection cutoffs", "",
           "| arm | kept / scored | zero share | cutoff score | tie block kept / total | prompts rendered |",
           "| --- | --- | --- | --- | --- | --- |"]
    for arm in arms:
        sel = StageDir(join(run_dir, "selection", f"{arm}.parquet"))
        if not sel.done():
            continue
        m = sel.manifest()
        cut, tie = m.get("cutoff") or {}, m.get("tie_block") or {}
        zero = m.get("zero_share")
        rendered = "–"
        if m.get("scores") and StageDir(m["scores"]).done():
            p = StageDir(m["scores"]).manifest().get("prompts") or {}
            if p:
                rendered = (f"{p.get('rendered_rows', 0)} ({p.get('applied')}, task template {p['template_index']})"
                            if p.get("applied") in ("auto", "task") else f"0 ({p.get('applied')})")
        zero_s = "–" if zero is None else f"{zero:.1%}"
        tie_s = f"{tie['kept']} / {tie['rows']}" if tie else "–"
        out.append(f"| {arm} | {m.get('rows', '–')} / {m.get('rows_scored', '–')} | {zero_s} "
                   f"| {_fmt(cut.get('score'))} | {tie_s} | {rendered} |")
    return out + [""] if len(out) > 4 else []


def build(run_dir: str, price_per_gpu_hour: float = 2.5, price_per_cpu_hour: float = 0.05,
          label_column: str | None = None, pool: Any = None, correct_column: str | None = None) -> str:
    """Write `<run>/report/report.md` (+ PNGs); returns its path. Local run directories only for plots."""
    import os

    if not exists(join(run_dir, "eval", "metrics.json")):
        from igds_ray.errors import StageOutputError

        raise StageOutputError(f"{run_dir}: no eval/metrics.json yet; run the evaluation first")
    rows, metrics = arm_rows(run_dir, price_per_gpu_hour, price_per_cpu_hour)
    out_dir = os.path.join(run_dir, "report")
    os.makedirs(out_dir, exist_ok=True)
    images = plots(run_dir, rows, out_dir)
    feats = metrics.get("features", [])
    lines = [
        "# IGDS run report", "",
        f"Task: **{metrics.get('task')}**, {metrics.get('test_examples')} test examples; "
        f"IGDS features: {', '.join(feats) or '–'}. Prices: ${price_per_gpu_hour}/GPU-h, ${price_per_cpu_hour}/CPU-h.",
        "",
        "| arm | data fraction | rows | metric | Δ vs full | Δ vs base | train tokens | wall time per stage (s) "
        "| GPU-h | CPU-h | est. cost ($) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        wall = ", ".join(f"{k} {v}" for k, v in r["wall"].items()) or "–"
        lines.append(
            f"| {arm_label(r['arm'])}{'' if r['status'] == 'ok' else ' (failed)'} | {_fmt(r['fraction'], 3)} "
            f"| {_fmt(r['rows'])} "
            f"| {_fmt(r['metric'])} | {_signed(r['d_full'])} | {_signed(r['d_base'])} | {_fmt(r['train_tokens'])} "
            f"| {wall} | {r['gpu_h']:.4f} | {r['cpu_h']:.4f} | {r['cost']:.4f} |"
        )
    lines += ["", "## Verdict", *feature_verdict(run_dir), *verdicts(rows), ""]
    mech = metrics.get("mechanism", {})
    if mech.get("per_arm"):
        lines += ["## Mechanism", "",
                  f"Median activation of the chosen features on test prompts (base: "
                  f"{_fmt(mech.get('base_feature_score_median'))}); gain vs base against metric gain vs base:", "",
                  "| arm | activation gain | metric gain |", "| --- | --- | --- |"]
        lines += [f"| {p['arm']} | {_signed(p['activation_gain'])} | {_signed(p['metric_gain'])} |"
                  for p in mech["per_arm"]]
        lines += ["", f"Correlation across arms: Pearson {_fmt(mech.get('pearson'), 3)}, "
                      f"Spearman {_fmt(mech.get('spearman'), 3)}.", ""]
    lines += selection_facts(run_dir, [r["arm"] for r in rows if r["arm"] != BASE])
    if label_column and pool is not None:
        comp = composition(run_dir, [r["arm"] for r in rows if r["arm"] != BASE], pool, label_column)
        labels = sorted(comp["pool"], key=lambda k: -comp["pool"][k])
        lines += [f"## What each arm kept (share of `{label_column}`)", "",
                  "| arm | " + " | ".join(labels) + " |", "| --- |" + " --- |" * len(labels)]
        for arm, shares in comp.items():
            lines.append(f"| {arm} | " + " | ".join(f"{shares.get(k, 0.0):.1%}" for k in labels) + " |")
        lines.append("")
        write_json_atomic(join(run_dir, "report", "composition.json"), comp)
    if correct_column and pool is not None:
        from igds_ray.stages.contrast import arm_label_aurocs

        aucs = arm_label_aurocs(run_dir, [r["arm"] for r in rows if r["arm"].startswith("igds")], pool.path,
                                correct_column)
        lines += [f"## Does each IGDS score tell correct answers from wrong ones? (AUROC on `{correct_column}`)", "",
                  "| scores | arms | AUROC | correct rows | wrong rows |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {a['scores']} | {', '.join(a['arms'])} | {_fmt(a['auroc'], 3)} | {a['n_correct']} "
                  f"| {a['n_wrong']} |" for a in aucs]
        lines.append("")
        write_json_atomic(join(run_dir, "report", "correct_auroc.json"), aucs)
    from igds_ray.rounds import report_lines

    lines += report_lines(run_dir)
    stages_uri = join(run_dir, "report", "stages.json")
    if exists(stages_uri):
        st = read_json(stages_uri)
        lines += ["## Stages of the last `igds run`", ""]
        if st.get("dashboard"):
            lines += [f"Ray dashboard: {st['dashboard']}", ""]
        lines += [*st["table"].splitlines(), ""]
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        lines += ["## Failed arms", ""] + [f"- {r['arm']}: {r['error']}" for r in failed] + [""]
    lines += [f"![{i}]({i})" for i in images]
    path = os.path.join(out_dir, "report.md")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)
    from igds_ray import report_html

    cards_uri = join(run_dir, "report", "cards.json")
    report_html.write(os.path.join(out_dir, "report.html"), lines, out_dir,
                      read_json(cards_uri) if exists(cards_uri) else None)
    return path
