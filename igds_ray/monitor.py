"""`igds monitor --run-dir RUN [--pool PATH]`: one monitoring round of a finished run (issue 14, part 2).

Each round:
1. **scores the pool incrementally** with the run's IGDS scoring config (`score.incremental`): only files that
   are new or changed since the last round go through the model; their rows are this round's new data;
2. **pool drift**: the chosen features' score on the new rows against the rows scored before them: the
   population stability index (PSI, over 10 bins at the reference's deciles) and the two-sample
   Kolmogorov-Smirnov statistic, from fixed-width histograms (memory does not grow with the pool; the KS
   figure's error is at most one histogram bin's mass). Beside them, the share of new rows at or above
   the IGDS selection's cutoff (the run kept `fraction` of the pool: does new data still resonate?).
   The reference is the pool scored so far, not the selected half: the selection is the top of the
   same distribution, so it differs from any new data by construction;
3. **the adapter**: the IGDS arm's model on a monitor set (`monitor.limit` examples of the test set, or
   `monitor.source`): its task metric, the features' activation at the prompts, and their activation on
   the model's own outputs (max over the generated tokens);
4. **recall**: recall re-run on the task set; whether every chosen feature still passes it.
It writes `<run>/monitor/round-N.json` and `rounds.png` (every round so far), prints one status line, and
exits 3 when PSI or KS exceeds `monitor.psi_max` / `monitor.ks_max`, the share of new rows above the cutoff
falls below `monitor.min_selected_share`, or a feature fails recall.
"""

from __future__ import annotations

import dataclasses
import logging
import posixpath
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from igds_ray import schema as S
from igds_ray.config import _help
from igds_ray.errors import StageOutputError

log = logging.getLogger(__name__)
HIST_BINS = 4096  # fixed-width bins for PSI and KS
DRIFT_EXIT = 3


@dataclass(frozen=True)
class MonitorConfig:
    arm: str = _help("the IGDS arm monitored (its features, scores, selection and model)", default="igds")
    psi_max: float = _help("drift when the PSI of the new rows' scores exceeds this (0.25: a major shift, the "
                           "usual rule of thumb)", default=0.25)
    ks_max: float = _help("drift when the Kolmogorov-Smirnov statistic exceeds this", default=0.3)
    min_selected_share: float = _help("drift when fewer new rows than this share score at or above the selection's "
                                      "cutoff (0: off)", default=0.0)
    source: str | None = _help("monitor set for the adapter's metric; default: the evaluation's test set",
                               default=None)
    limit: int = _help("monitor-set examples (seeded sample)", default=100)
    recall: bool = _help("re-run recall and check that every chosen feature still passes it", default=True)


def _scan(uri: str, names: list[str], new_files: set[str], lo: float | None = None, hi: float | None = None
          ) -> tuple[np.ndarray, np.ndarray] | tuple[float, float]:
    """Without (lo, hi): the scores' range. With them: (reference, new) histograms of the score, a row being new
    when its pool file is in `new_files`. One part in memory at a time."""
    import pyarrow.parquet as pq

    from igds_ray.storage import StageDir

    sd = StageDir(uri)
    ref, new = np.zeros(HIST_BINS, np.int64), np.zeros(HIST_BINS, np.int64)
    rlo, rhi = np.inf, -np.inf
    for n in names:
        with sd.fs.open_input_file(posixpath.join(sd.path, n)) as f:
            t = pq.read_table(f, columns=[S.SCORE, S.SRC_FILE])
        v = np.asarray(t.column(S.SCORE).to_numpy(zero_copy_only=False), np.float64)
        ok = np.isfinite(v)
        if lo is None:
            if ok.any():
                rlo, rhi = min(rlo, float(v[ok].min())), max(rhi, float(v[ok].max()))
            continue
        is_new = np.asarray([f in new_files for f in t.column(S.SRC_FILE).to_pylist()], bool)
        b = np.clip(((v - lo) / (hi - lo) * HIST_BINS).astype(np.int64), 0, HIST_BINS - 1) if hi > lo else \
            np.zeros(len(v), np.int64)
        np.add.at(ref, b[ok & ~is_new], 1)
        np.add.at(new, b[ok & is_new], 1)
    if lo is None:
        return (rlo, rhi) if rlo <= rhi else (0.0, 1.0)
    return ref, new


def drift(ref: np.ndarray, new: np.ndarray, edges: np.ndarray) -> dict[str, float]:
    """PSI over the reference's deciles and the KS statistic, from two histograms on the same `edges`."""
    if ref.sum() == 0 or new.sum() == 0:
        return {"psi": float("nan"), "ks": float("nan")}
    cr, cn = np.cumsum(ref) / ref.sum(), np.cumsum(new) / new.sum()
    ks = float(np.max(np.abs(cr - cn)))
    cuts = sorted(set(int(np.searchsorted(cr, q)) for q in np.linspace(0.1, 0.9, 9)))
    bounds = [0, *[c + 1 for c in cuts if c + 1 < len(ref)], len(ref)]
    psi = 0.0
    for a, b in zip(bounds, bounds[1:]):
        p = max(ref[a:b].sum() / ref.sum(), 1e-4)
        q = max(new[a:b].sum() / new.sum(), 1e-4)
        psi += (q - p) * np.log(q / p)
    return {"psi": float(psi), "ks": ks}


def _adapter_round(cfg: Any, arm: str, features: list[str], mon: MonitorConfig) -> dict[str, Any]:  # noqa: ANN401
    """The arm's metric on the monitor set, with the features' activation at the prompts and on its outputs."""
    import ray

    from igds_ray.config import to_dict
    from igds_ray.stages.evaluate import _evaluate_arm
    from igds_ray.stages.score import init_ray
    from igds_ray.tasks import get_task, load_task_set

    task = get_task(cfg.task.name, **cfg.task.options)
    e = cfg.evaluate
    exs = load_task_set(task, mon.source or e.source or cfg.task.source, split=None if mon.source else e.split,
                        columns=cfg.task.columns or None, limit=mon.limit, seed=e.seed + 101).examples
    from igds_ray.rounds import model_uri

    out = model_uri(cfg.run_dir, arm)  # a round that kept the previous model points to it
    fm = cfg.finetune.get("method", "lora")
    model = dataclasses.replace(cfg.model, adapter=out) if fm == "lora" else dataclasses.replace(cfg.model,
                                                                                               name_or_path=out)
    pooling = cfg.score.pooling if cfg.score.pooling in ("prompt_max", "prompt_mean") else e.pooling
    ecfg = to_dict(dataclasses.replace(e, pooling=pooling, backend="hf" if e.backend == "lm_eval" else e.backend,
                                       lm_eval_tasks=()))
    init_ray()
    table, info = ray.get(ray.remote(_evaluate_arm).options(num_cpus=e.num_cpus, num_gpus=e.num_gpus or None).remote(
        arm, to_dict(model), to_dict(cfg.sae), features, task, [x.to_dict() for x in exs], ecfg))
    outputs = ray.get(ray.remote(_output_acts).options(num_cpus=e.num_cpus, num_gpus=e.num_gpus or None).remote(
        to_dict(model), to_dict(cfg.sae), features, table.column("prompt").to_pylist(),
        table.column("prediction").to_pylist(), max(1, int(e.num_cpus))))
    return {"metric": info["metrics"].get("metric"), "n": info["n"], "activation_prompts": info["feature_score_median"],
            "activation_outputs": outputs}


def _output_acts(model: dict, sae: dict, features: list[str], prompts: list[str], outputs: list[str],
                 threads: int) -> float | None:
    """Median over examples of the features' summed activation, max over the model's own generated tokens."""
    import torch

    from igds_ray.config import ModelConfig, SAEConfig, from_dict
    from igds_ray.stages.cards_tokens import TokenActs

    torch.set_num_threads(threads)
    ta = TokenActs(from_dict(ModelConfig, model), from_dict(SAEConfig, sae), features)
    rows = ta.rows(prompts, outputs, "max", 4096)
    vals = [float(r["pooled"].sum()) for r in rows if isinstance(r, dict)]
    return float(np.median(vals)) if vals else None


def _recall(cfg: Any, features: list[str], round_dir: str) -> dict[str, Any]:  # noqa: ANN401
    import pyarrow.parquet as pq

    from igds_ray.config import IdentifyConfig
    from igds_ray.stages import recall
    from igds_ray.storage import StageDir, join

    icfg = IdentifyConfig(model=cfg.model, sae=cfg.sae, task=cfg.task, run_dir=round_dir, recall=cfg.recall,
                          causal=cfg.causal, seed=cfg.seed)
    recall.run(icfg)
    rows = {r["feature"]: r for r in pq.read_table(StageDir(join(round_dir, "features", "recall.parquet")).files()[0]
                                                   ).to_pylist()}
    out = {}
    for f in features:
        r = rows.get(f)
        freq = r["frequency"] if r else 0.0
        out[f] = {"frequency": freq, "mean_act": r["mean_act"] if r else None,
                  "passes": bool(r is not None and freq > cfg.recall.min_frequency and r["mean_act"] > cfg.recall.min_act)}
    return out


def run(run_dir: str, pool: str | None = None, progress: bool = True) -> tuple[dict[str, Any], bool]:
    """One monitoring round; returns (round-N.json's content, drift)."""
    from igds_ray.config import ScoreConfig, from_dict, to_dict
    from igds_ray.pipeline import RunConfig
    from igds_ray.stages import score
    from igds_ray.storage import StageDir, exists, join, read_json, write_json_atomic

    t0 = time.time()
    cfg = from_dict(RunConfig, read_json(join(run_dir, "config.json")))
    cfg = dataclasses.replace(cfg, run_dir=run_dir)
    mon = cfg.monitor
    sel = StageDir(join(run_dir, "selection", f"{mon.arm}.parquet"))
    if not sel.done():
        raise StageOutputError(f"igds monitor: {run_dir} has no finished selection for arm {mon.arm!r}: run igds run "
                               "first")
    sm = sel.manifest()
    from igds_ray.rounds import scores_of

    scores_uri = scores_of(run_dir, sm)  # the run's own (found if it moved), or round 1's in a line of rounds
    before = StageDir(scores_uri).manifest()
    scfg = from_dict(ScoreConfig, {**before["config"], "out": scores_uri, "incremental": True, "overwrite": False,
                                   "pool": {**before["config"]["pool"], **({"path": pool} if pool else {})}})
    features = list(scfg.features)
    after = score.run(scfg)
    version = int(after.get("version", 1))
    grew = version > int(before.get("version", 1))
    new_files = set(after.get("added_files", []) + after.get("changed_files", [])) if grew else set()
    lo, hi = _scan(scores_uri, after["files"], new_files)
    edges = np.linspace(lo, hi, HIST_BINS + 1)
    ref, new = _scan(scores_uri, after["files"], new_files, lo, hi)
    d = drift(ref, new, edges)
    cut = (sm.get("cutoff") or {}).get("score")
    share = None
    if cut is not None and new.sum():
        share = float(new[np.searchsorted(edges, cut, side="right") - 1:].sum() / new.sum())
    adapter = _adapter_round(cfg, mon.arm, features, mon)
    n = len([p for p in _list_rounds(run_dir)]) + 1
    rec = _recall(cfg, features, join(run_dir, "monitor", f"recall-round-{n}")) if mon.recall else {}
    reasons = []
    if new.sum():
        if d["psi"] > mon.psi_max:
            reasons.append(f"PSI {d['psi']:.3f} > monitor.psi_max {mon.psi_max}")
        if d["ks"] > mon.ks_max:
            reasons.append(f"KS {d['ks']:.3f} > monitor.ks_max {mon.ks_max}")
        if share is not None and share < mon.min_selected_share:
            reasons.append(f"{share:.1%} of new rows reach the cutoff < monitor.min_selected_share")
    reasons += [f"{f} no longer passes recall (frequency {r['frequency']:.1%})" for f, r in rec.items() if not r["passes"]]
    prev = read_json(join(run_dir, "monitor", f"round-{n - 1}.json")) if n > 1 and exists(
        join(run_dir, "monitor", f"round-{n - 1}.json")) else None
    out = {"round": n, "scores_version": version, "new_rows": int(new.sum()), "reference_rows": int(ref.sum()),
           "new_files": after.get("added_files", []) if grew else [],
           "changed_files": after.get("changed_files", []) if grew else [],
           "removed_files": after.get("removed_files", []) if grew else [],
           "scored_rows_this_round": int(after.get("scored_rows", 0)) if grew else 0,
           "psi": d["psi"], "ks": d["ks"], "cutoff": cut, "new_share_at_or_above_cutoff": share,
           "expected_share": sm.get("rows", 0) / max(1, sm.get("rows_scored", 1)),
           "adapter": adapter, "metric_previous_round": (prev or {}).get("adapter", {}).get("metric"),
           "recall": rec, "thresholds": to_dict(mon), "drift": bool(reasons), "reasons": reasons,
           "features": features, "wall_s": round(time.time() - t0, 2)}
    write_json_atomic(join(run_dir, "monitor", f"round-{n}.json"), out)
    _plot(run_dir)
    return out, bool(reasons)


def _list_rounds(run_dir: str) -> list[str]:
    import pyarrow.fs as pafs

    from igds_ray.storage import filesystem, join

    fs, path = filesystem(join(run_dir, "monitor"))
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    return sorted(i.path for i in fs.get_file_info(pafs.FileSelector(path))
                  if i.base_name.startswith("round-") and i.base_name.endswith(".json"))


def _plot(run_dir: str) -> None:
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from igds_ray.storage import read_json

    rounds = sorted((read_json(p) for p in _list_rounds(run_dir)), key=lambda r: r["round"])
    if not rounds or "://" in run_dir:
        return
    x = [r["round"] for r in rounds]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3))
    axes[0].plot(x, [r["psi"] for r in rounds], "o-", label="PSI")
    axes[0].plot(x, [r["ks"] for r in rounds], "s-", label="KS")
    axes[0].axhline(rounds[-1]["thresholds"]["psi_max"], color="tab:blue", ls=":")
    axes[0].axhline(rounds[-1]["thresholds"]["ks_max"], color="tab:orange", ls=":")
    axes[0].set_title("pool drift of the new rows")
    axes[0].legend(fontsize=7)
    axes[1].plot(x, [r["adapter"]["metric"] for r in rounds], "o-")
    axes[1].set_title("adapter's metric on the monitor set")
    axes[2].plot(x, [r["adapter"]["activation_prompts"] for r in rounds], "o-", label="at prompts")
    axes[2].plot(x, [r["adapter"]["activation_outputs"] for r in rounds], "s-", label="on its outputs")
    axes[2].set_title("features' activation under the adapter")
    axes[2].legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel("round")
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "monitor", "rounds.png"), dpi=90)
    plt.close(fig)


def status_line(r: dict[str, Any]) -> str:
    a = r["adapter"]
    share = r["new_share_at_or_above_cutoff"]
    return (f"igds monitor round {r['round']}: {r['new_rows']:,} new rows (scores v{r['scores_version']}), "
            f"PSI {r['psi']:.3f}, KS {r['ks']:.3f}, "
            f"{'–' if share is None else f'{share:.0%}'} of them at or above the cutoff; "
            f"metric {a['metric']:.4f}; activation {a['activation_prompts']:.3g} at prompts, "
            f"{a['activation_outputs'] if a['activation_outputs'] is None else round(a['activation_outputs'], 4)} "
            f"on outputs; {'DRIFT: ' + '; '.join(r['reasons']) if r['drift'] else 'no drift'}")
