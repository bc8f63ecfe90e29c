"""Feature cards: what each recalled candidate and each chosen feature is, before anyone trusts a selection
built on it (the convention of SAEDashboard and Neuronpedia).

A card holds, per feature:
- **recall**: its frequency on the task's units and its mean activation when active;
- **causal curve**: every causal trial's delta against its factor, with the bootstrap CIs and Holm p-values
  (`causal.parquet`), and for `igds_response` latents the contrast's AUROCs (`contrast.json`);
- **examples**: the top-activating task prompts and pool rows with each token's activation, from a second
  pass of the model over only those rows (`cards_tokens`), read at the positions scoring reads;
- **histogram**: its pooled activation over the whole scored pool for a chosen feature (a scan of the
  scores' `acts`, split by `report.label_column` when set), or over a bounded pool sample for a candidate
  that no arm scored (said on the card);
- **logit lens**: the tokens its decoder direction promotes and suppresses (`W_dec[f] @ W_U`);
- **Neuronpedia**: the feature's page when the SAE is a release sae-lens knows a `neuronpedia_id` for.

Output: `<run>/report/cards.json` (written atomically; the report renders it into report.html). The
driver reads the scores one part at a time (bounded memory; time grows with the pool, as the report's
composition does); the model runs in one Ray task with the scorer's resources.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from igds_ray import schema as S
from igds_ray.config import _help
from igds_ray.pool_rows import NO_LABEL, pool_rows_at, sample_pool

if TYPE_CHECKING:
    from igds_ray.labels import PoolColumn

log = logging.getLogger(__name__)

NEURONPEDIA = "https://www.neuronpedia.org"


@dataclass(frozen=True)
class CardsConfig:
    enabled: bool = _help("write feature cards (report/cards.json, rendered into report.html)", default=True)
    examples: int = _help("top-activating rows shown per feature, per source (task prompts, pool)", default=6)
    task_rows: int = _help("task prompts read for the cards' task examples (the recall set, seeded)", default=256)
    pool_sample: int = _help("pool rows scored for candidates no arm scored (seeded sample)", default=2000)
    bins: int = _help("histogram bins over (0, max]; exact zeros are counted apart", default=30)
    logit_tokens: int = _help("tokens listed per side of the logit lens", default=10)
    token_budget: int = _help("padded tokens per forward micro-batch", default=16384)
    num_cpus: float = _help("CPUs of the cards' model pass (one Ray task)", default=1.0)
    num_gpus: float = _help("GPUs of the cards' model pass", default=0.0)


def neuronpedia_base(sae: Any) -> str | None:
    """`https://www.neuronpedia.org/<model>/<sae>` for the SAE, or None: sae-lens's `neuronpedia_id` of a
    known release, or a local SAE's `neuronpedia_id` (top level or under `metadata` in its cfg.json)."""
    import json
    import os

    np_id = None
    if sae.release:
        try:
            from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

            entry = get_pretrained_saes_directory().get(sae.release)
            np_id = (entry.neuronpedia_id or {}).get(sae.sae_id) if entry is not None else None
        except Exception as e:  # noqa: BLE001 - a link is a nicety, never a reason to fail the report
            log.warning("cards: no Neuronpedia id for %s/%s: %s", sae.release, sae.sae_id, e)
    elif sae.path and os.path.isfile(os.path.join(sae.path, "cfg.json")):
        with open(os.path.join(sae.path, "cfg.json")) as f:
            cfg = json.load(f)
        np_id = cfg.get("neuronpedia_id") or (cfg.get("metadata") or {}).get("neuronpedia_id")
    return f"{NEURONPEDIA}/{np_id}" if np_id else None


def _records(uri: str) -> list[dict]:
    import pyarrow.parquet as pq

    from igds_ray.storage import StageDir, filesystem

    sd = StageDir(uri)
    if not sd.done():
        return []
    return [r for p in sd.files() for r in pq.read_table(filesystem(p)[1], filesystem=sd.fs).to_pylist()]


def card_features(run_dir: str) -> dict[str, dict]:
    """Feature id -> its card's facts from the run's feature files: recalled candidates (rank order), then
    every feature an arm chose (`arms.json`), with recall stats, causal trials and contrast details."""
    from igds_ray.storage import exists, join, read_json

    recall = {r["feature"]: r for r in _records(join(run_dir, "features", "recall.parquet"))}
    cards: dict[str, dict] = {}
    for r in sorted((r for r in recall.values() if r["candidate"]), key=lambda r: r["rank"]):
        cards[r["feature"]] = {"chosen_by": [], "candidate_rank": int(r["rank"])}
    arms_uri = join(run_dir, "features", "arms.json")
    for arm, feats in (read_json(arms_uri) if exists(arms_uri) else {}).items():
        for f in feats:
            cards.setdefault(f, {"chosen_by": [], "candidate_rank": None})["chosen_by"].append(arm)
    trials: dict[str, list[dict]] = {}
    for t in _records(join(run_dir, "features", "causal.parquet")):
        keep = ("factor", "status", "metric", "delta", "delta_ci_low", "delta_ci_high", "p_holm", "loglik_delta",
                "loglik_ci_low", "loglik_ci_high", "loglik_p_holm", "passed_holm", "kept", "confirm_delta",
                "confirm_ci_low", "confirm_ci_high")
        trials.setdefault(t["feature"], []).append({k: t.get(k) for k in keep})
    fj = join(run_dir, "features", "features.json")
    chosen = read_json(fj) if exists(fj) else {}
    cj = join(run_dir, "features", "contrast.json")
    contrast = {d["feature"]: d for d in (read_json(cj).get("details", []) if exists(cj) else [])}
    for f, card in cards.items():
        r = recall.get(f)
        card["feature"] = f
        card["recall"] = None if r is None else {k: r[k] for k in ("frequency", "mean_act", "mean_act_all",
                                                                    "n_active", "n_units")}
        card["causal"] = sorted(trials.get(f, []), key=lambda t: t["factor"])
        card["causal_selected_by"] = chosen.get("selected_by") if f in chosen.get("features", []) else None
        card["contrast"] = contrast.get(f)
    return cards


def scored_dirs(run_dir: str, arms: list[str]) -> dict[str, dict]:
    """Scores directory -> {features, pooling, arms, config} for every IGDS arm with a finished selection."""
    from igds_ray.storage import StageDir, join

    out: dict[str, dict] = {}
    for arm in arms:
        sel = StageDir(join(run_dir, "selection", f"{arm}.parquet"))
        if not arm.startswith("igds") or not sel.done():
            continue
        uri = sel.manifest()["scores"]
        sd = StageDir(uri)
        if not sd.done():
            continue
        cfg = sd.manifest().get("config") or {}
        d = out.setdefault(uri, {"features": list(cfg.get("features") or []), "pooling": cfg.get("pooling"),
                                 "arms": [], "config": cfg})
        d["arms"].append(arm)
    return out


def _acts(col: pa.Array | pa.ChunkedArray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(acts [valid rows, k] float32, valid mask) of a scores `acts` list column (null for unscored rows)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    valid = np.asarray(arr.is_valid().to_numpy(zero_copy_only=False), bool)
    flat = pc.list_flatten(arr.filter(pa.array(valid))).to_numpy(zero_copy_only=False)
    return np.asarray(flat, np.float32).reshape(-1, k), valid


def _score_parts(uri: str, label: "PoolColumn | None") -> Iterator[tuple[pa.Table, list[str]]]:
    """(a group of scores rows with id/acts/src_file/src_row, their labels) one part (or file group) at a time."""
    import pyarrow.parquet as pq

    from igds_ray.labels import joined
    from igds_ray.storage import StageDir, filesystem

    cols = [S.ID, S.ACTS, S.SRC_FILE, S.SRC_ROW]
    if label is None:
        sd = StageDir(uri)
        for p in sd.files():
            t = pq.read_table(filesystem(p)[1], columns=cols, filesystem=sd.fs)
            yield t, [NO_LABEL] * t.num_rows
        return
    for rel, vals, t in joined(uri, label, [S.ID, S.ACTS, S.SRC_ROW], strict=False):
        t = t.append_column(S.SRC_FILE, pa.array([rel] * t.num_rows, pa.string()))
        text = pc.cast(vals, pa.string()) if vals.type != pa.null() else pa.nulls(len(vals), pa.string())
        yield t, [NO_LABEL if v is None else v for v in text.to_pylist()]


def scan_scores(uri: str, features: list[str], want: list[str], label: "PoolColumn | None", n_top: int,
                bins: int) -> dict[str, dict]:
    """Per wanted feature of a scores directory: its top `n_top` rows by pooled activation and its histogram
    (exact zeros apart, `bins` equal bins over (0, max]) per label. Two passes, one part in memory."""
    k = len(features)
    col = {f: features.index(f) for f in want}
    top: dict[str, list[tuple]] = {f: [] for f in want}
    vmax = {f: 0.0 for f in want}
    for t, labels in _score_parts(uri, label):
        a, valid = _acts(t.column(S.ACTS), k)
        if not len(a):
            continue
        keep = np.nonzero(valid)[0]
        ids, files, rows = t.column(S.ID).to_pylist(), t.column(S.SRC_FILE).to_pylist(), t.column(S.SRC_ROW).to_pylist()
        for f in want:
            v = a[:, col[f]]
            vmax[f] = max(vmax[f], float(v.max()))
            best = np.argsort(-v, kind="stable")[:n_top]
            top[f] += [(float(v[i]), files[keep[i]], int(rows[keep[i]]), ids[keep[i]], labels[keep[i]])
                       for i in best if v[i] > 0]
            top[f] = sorted(top[f], key=lambda x: (-x[0], x[1], x[2]))[:n_top]
    hist = {f: {"edges": np.linspace(0.0, vmax[f] if vmax[f] > 0 else 1.0, bins + 1).tolist(), "zero": {},
                "counts": {}, "rows": 0} for f in want}
    for t, labels in _score_parts(uri, label):
        a, valid = _acts(t.column(S.ACTS), k)
        lab = np.asarray(labels, dtype=object)[valid]
        for f in want:
            h, v = hist[f], a[:, col[f]]
            h["rows"] += len(v)
            for name in sorted(set(lab.tolist())):
                sel = v[lab == name]
                h["zero"][name] = h["zero"].get(name, 0) + int((sel == 0).sum())
                c, _ = np.histogram(sel[sel > 0], bins=np.asarray(h["edges"]))
                h["counts"][name] = (np.asarray(h["counts"].get(name, np.zeros(bins, np.int64))) + c).tolist()
    keys = ("value", "src_file", "src_row", "id", "label")
    return {f: {"top": [dict(zip(keys, t)) for t in top[f]],
                "hist": {**hist[f], "source": f"scored pool ({hist[f]['rows']:,} rows)"}} for f in want}


def sample_histogram(values: np.ndarray, labels: list[str], bins: int, n_pool_rows: int | None) -> dict:
    """A histogram of a pool sample's pooled values, in `scan_scores`'s layout."""
    hi = float(values.max()) if len(values) and values.max() > 0 else 1.0
    edges = np.linspace(0.0, hi, bins + 1)
    lab = np.asarray(labels, dtype=object)
    h: dict[str, Any] = {"edges": edges.tolist(), "zero": {}, "counts": {}, "rows": int(len(values))}
    for name in sorted(set(lab.tolist())):
        v = values[lab == name]
        h["zero"][name] = int((v == 0).sum())
        h["counts"][name] = np.histogram(v[v > 0], bins=edges)[0].tolist()
    of = f" of {n_pool_rows:,}" if n_pool_rows else ""
    h["source"] = f"pool sample ({len(values):,} rows{of}; no arm scored this feature over the whole pool)"
    return h


def render_prompts(scfg: dict, prompts: list[str]) -> list[str]:
    """Prompts as the scorer configured by `scfg` (a scores manifest's config) read them."""
    from igds_ray.config import ScoreConfig, from_dict
    from igds_ray.tokenize import PromptRenderer, build_task, prompt_mode

    sc = from_dict(ScoreConfig, scfg)
    mode = prompt_mode(sc)
    if mode not in ("auto", "task"):
        return prompts
    return PromptRenderer(build_task(sc), sc.pool.template_index, mode).render(prompts)[0]


def _group(kind: str, prompts: list[str], responses: list[str], scfg: dict, meta: list[dict]) -> dict:
    from igds_ray.config import ScoreConfig, from_dict

    sc = from_dict(ScoreConfig, scfg)
    return {"kind": kind, "prompts": render_prompts(scfg, prompts), "responses": responses, "pooling": sc.pooling,
            "max_tokens": sc.max_tokens, "chat_template": sc.pool.chat_template, "meta": meta}


def run(cfg: Any, overwrite: bool = False) -> dict[str, Any]:
    """Write `<run>/report/cards.json` for the run configured by `cfg` (a RunConfig); returns its content.
    Skipped when a cards.json for the same features and scores directories exists."""
    import dataclasses

    import ray

    from igds_ray.config import ScoreConfig, to_dict
    from igds_ray.labels import PoolColumn
    from igds_ray.stages.score import init_ray
    from igds_ray.storage import StageDir, exists, join, read_json, write_json_atomic
    from igds_ray.tasks import get_task, load_task_set

    c, t0 = cfg.cards, time.time()
    out_uri = join(cfg.run_dir, "report", "cards.json")
    cards = card_features(cfg.run_dir)
    dirs = scored_dirs(cfg.run_dir, list(cfg.arms))
    inputs = {"features": list(cards), "scores": sorted(dirs), "config": to_dict(c),
              "label_column": cfg.report.label_column}
    if exists(out_uri) and not overwrite and read_json(out_uri).get("inputs") == inputs:
        return read_json(out_uri)
    if not cards:
        result = {"inputs": inputs, "cards": [], "note": "no recalled candidate and no chosen feature in this run"}
        write_json_atomic(out_uri, result)
        return result
    feats = list(cards)
    label = PoolColumn(cfg.pool.path, cfg.report.label_column, "report.label_column") if cfg.report.label_column \
        else None
    scanned: dict[str, dict] = {}
    for uri, d in dirs.items():
        want = [f for f in d["features"] if f in cards and f not in scanned]
        for f, res in scan_scores(uri, d["features"], want, label, c.examples, c.bins).items():
            scanned[f] = {**res, "scores": uri, "pooling": d["pooling"], "arms": d["arms"], "config": d["config"]}
    t_scan = time.time()
    texts = pool_rows_at(cfg.pool, {(t["src_file"], t["src_row"]) for s in scanned.values() for t in s["top"]})

    # The scoring config the sample is read with: an igds scores directory's, else the pipeline's igds scoring.
    s = cfg.score
    igds_cfg = next((d["config"] for d in dirs.values() if d["pooling"] == s.pooling), None) or to_dict(ScoreConfig(
        model=cfg.model, sae=cfg.sae, features=tuple(feats), out="-", pooling=s.pooling, max_tokens=s.max_tokens,
        pool=dataclasses.replace(cfg.pool, template_index=cfg.causal.template), task=cfg.task.name,
        task_options=dict(cfg.task.options)))
    groups: dict[str, dict] = {}
    for uri, d in dirs.items():
        tops = [(f, t) for f, sc in scanned.items() if sc["scores"] == uri for t in sc["top"]
                if (t["src_file"], t["src_row"]) in texts]
        if tops:
            groups[f"rows:{uri}"] = _group("rows", [texts[(t["src_file"], t["src_row"])][0] for _, t in tops],
                                           [texts[(t["src_file"], t["src_row"])][1] for _, t in tops], d["config"],
                                           [{"feature": f, **t} for f, t in tops])
    unscored = [f for f in feats if f not in scanned]
    sample = sample_pool(cfg.pool, c.pool_sample, cfg.seed, cfg.report.label_column) if unscored else []
    if sample:
        groups["sample"] = _group("sample", [r["prompt"] for r in sample], [r["response"] for r in sample], igds_cfg,
                                  [{k: r[k] for k in ("id", "src_file", "src_row", "label")} for r in sample])
    task = get_task(cfg.task.name, **cfg.task.options)
    tset = load_task_set(task, cfg.task.source, split=cfg.task.split, columns=cfg.task.columns or None,
                         limit=min(c.task_rows, cfg.recall.limit or c.task_rows), seed=cfg.seed)
    groups["task"] = {"kind": "top", "prompts": [task.build_prompt(x, cfg.causal.template) for x in tset.examples],
                      "responses": [""] * len(tset.examples),
                      "pooling": "prompt_max" if cfg.recall.positions == "all" else "last",
                      "max_tokens": cfg.recall.max_tokens, "meta": [{"id": x.id} for x in tset.examples]}
    init_ray()
    from igds_ray.stages.cards_tokens import token_pass

    t_model = time.time()
    res = ray.get(ray.remote(token_pass).options(num_cpus=c.num_cpus, num_gpus=c.num_gpus or None).remote(
        to_dict(cfg.model), to_dict(cfg.sae), feats, groups, c.examples, c.logit_tokens, c.token_budget,
        max(1, int(c.num_cpus))))
    model_s = time.time() - t_model
    base = neuronpedia_base(cfg.sae)
    # The pool's size, as the scores of any arm counted it (the sample's histogram says "n of N rows").
    n_pool = next((StageDir(u).manifest().get("rows") for u in dirs), None)
    shown: dict[str, list[dict]] = {}
    for name, g in res.items():
        if name.startswith("rows:"):
            for row in g["shown"]:
                shown.setdefault(row["feature"], []).append(row)
    pooled = np.asarray(res["sample"]["pooled"], np.float32) if sample else np.zeros((0, len(feats)), np.float32)
    out_cards = []
    for j, f in enumerate(feats):
        card = dict(cards[f])
        idx = int(f.rsplit("_p", 1)[1])
        card["neuronpedia"] = f"{base}/{idx}" if base else None
        card["logit_lens"] = res["logit_lens"][f]
        card["task_examples"] = res["task"]["top"][f]
        if f in scanned:
            sc = scanned[f]
            card["pool_examples"] = shown.get(f, [])
            card["histogram"] = sc["hist"]
            card["pool_source"] = {"kind": "scored", "scores": sc["scores"], "pooling": sc["pooling"],
                                   "arms": sc["arms"]}
        else:
            card["pool_examples"] = res["sample"]["top"][f] if sample else []
            card["histogram"] = sample_histogram(pooled[:, j], res["sample"]["labels"], c.bins, n_pool) if sample \
                else None
            card["pool_source"] = {"kind": "sample", "rows": len(sample), "pooling": s.pooling}
        out_cards.append(card)
    result = {"inputs": inputs, "cards": out_cards, "neuronpedia_base": base, "label_column": cfg.report.label_column,
              "task_rows": len(tset.examples), "pool_sample_rows": len(sample),
              "wall_s": round(time.time() - t0, 3), "scan_s": round(t_scan - t0, 3), "model_pass_s": round(model_s, 3)}
    write_json_atomic(out_uri, result)
    log.info("cards: %d features (%d scored over the pool) in %.1fs", len(out_cards), len(scanned), result["wall_s"])
    return result
