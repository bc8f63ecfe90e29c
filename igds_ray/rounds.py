"""Rounds of continuous selection (issue 14, part 3): `igds run --continue-from RUN`, `igds identify --if-drift`,
`igds round`.

A round is one `igds run` directory. Round N+1 (`rounds.continue_from: <round N's run dir>`):
- **features**: round N's, copied into the new run's `features/` (no recall or causal pass), unless
  `igds identify --if-drift` re-identified them after round N's last monitor round
  (`<N>/monitor/identify-round-K/`): then `igds` takes the new ones;
- **scores**: an IGDS arm with the same features and pooling scores into the *same* scores directory as
  round N (where round 1 wrote it), incrementally: only pool files new or changed since are run through the
  model (by this run, or already by `igds monitor`), and the directory gains a version. Each selection records
  the version it read (`scores_version`). Baseline scores are recomputed in the new run (only per-row
  scorers can grow, and the baselines are cheap or comparisons);
- **selection**: every arm's top fraction of the grown pool, as in round 1;
- **training set** (`<run>/train/<arm>.parquet`): the selected rows of pool files new or changed since round
  N's selection (*fresh*), plus a replay sample of round N's selection: `rounds.replay` is the replay share
  of the round's rows (replay / (1 - replay) x fresh rows, drawn by a seeded hash of the id, streamed part by
  part: nothing held per row). Old rows that newly cross a moved cutoff are not fresh: round N could have
  chosen them and did not;
- **fine-tuning** starts from round N's model of the same arm (the full model, or its LoRA adapter trained on);
  an arm with fewer than `rounds.min_new_rows` fresh rows keeps round N's model;
- **drift** (`igds round`): when the monitor flagged the new files, the round still scores, selects and evaluates
  but every arm keeps round N's model (`rounds.on_drift: keep`, the default; `train` re-tunes anyway);
- **evaluation** as in round 1; round N's metric for the arm is read from its `eval/metrics.json` (same test
  set and evaluation config, checked) for the Δ;
- **the ledger across rounds** (`<run>/rounds.json`): round N's list plus this round: pool rows, rows the
  model forwarded for it, fresh and replayed rows, per arm the metric, Δ vs the previous round, the
  features' activation, wall time and cost. The report shows it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import posixpath
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from igds_ray import schema as S
from igds_ray.config import _help
from igds_ray.errors import ConfigError, StageOutputError

log = logging.getLogger(__name__)

ROUNDS_FILE = "rounds.json"
FRESH, REPLAY = "fresh", "replay"


@dataclass(frozen=True)
class RoundsConfig:
    continue_from: str | None = _help(
        "a finished run directory (round N): this run is round N+1: its features, its scores (grown "
        "incrementally), fine-tuning from its models on the new rows plus a replay share", default=None)
    replay: float = _help("share of a continued round's training rows drawn from the previous round's selection "
                          "(0: only the new rows; set before any round ran, not tuned)", default=0.5)
    min_new_rows: int = _help("an arm with fewer new selected rows than this keeps its previous model", default=1)
    on_drift: Literal["train", "keep"] = _help(
        "igds round, when the monitor saw drift: keep every arm's model (the round still scores, selects and "
        "evaluates; a drifted pool is an alert, not data to train on unattended), or train the next round as usual",
        default="keep")
    keep_models: bool = _help("every arm keeps round N's model: select and evaluate only (igds round sets it on drift "
                              "with on_drift=keep)", default=False)
    finetune: dict[str, Any] = _help("FinetuneConfig keys for continued rounds only, over `finetune` (e.g. fewer "
                                     "epochs or a lower lr when training on from a converged model)",
                                     default_factory=dict)

    def __post_init__(self) -> None:
        bad = sorted(set(self.finetune) & {"model", "data", "out", "arm", "init_adapter", "method"})
        if bad:
            raise ConfigError(f"rounds.finetune: {bad[0]!r} is set per round by igds, not here")
        if not 0.0 <= self.replay < 1.0:
            raise ConfigError(f"rounds.replay must be in [0, 1), got {self.replay}")
        if self.min_new_rows < 1:
            raise ConfigError(f"rounds.min_new_rows must be >= 1, got {self.min_new_rows}")


# -- the previous round -------------------------------------------------------------------------------


def previous_config(prev: str) -> Any:  # noqa: ANN401
    """Round N's RunConfig (its saved config.json); refused unless round N finished (eval/metrics.json)."""
    from igds_ray.config import from_dict
    from igds_ray.pipeline import RunConfig
    from igds_ray.storage import exists, join, read_json

    if not exists(join(prev, "config.json")):
        raise ConfigError(f"rounds.continue_from {prev!r}: no config.json there: not an igds run directory")
    if not exists(join(prev, "eval", "metrics.json")):
        raise StageOutputError(f"rounds.continue_from {prev!r}: that round has not finished (no eval/metrics.json); "
                               "finish it first (rerun igds run on it)")
    cfg = from_dict(RunConfig, read_json(join(prev, "config.json")))
    return dataclasses.replace(cfg, run_dir=prev)


def check_continuation(cfg: Any, prev: Any) -> None:  # noqa: ANN401
    """What must not change between rounds for them to be one line of models."""
    diffs = [k for k in ("model", "sae", "task", "fraction") if getattr(cfg, k) != getattr(prev, k)]
    if diffs:
        raise ConfigError(f"rounds.continue_from {prev.run_dir!r}: the new round changes {', '.join(diffs)}; a round "
                          "continues the previous one's models with the same base model, SAE, task and fraction "
                          "(start a new line of rounds instead)")
    if cfg.finetune.get("method", "lora") != prev.finetune.get("method", "lora"):
        raise ConfigError(f"rounds.continue_from {prev.run_dir!r}: finetune.method changed; a round continues the "
                          "previous round's models")
    if cfg.run_dir.rstrip("/") == prev.run_dir.rstrip("/"):
        raise ConfigError("rounds.continue_from is this run's own directory: give the new round its own run_dir")


def latest_monitor_round(run_dir: str) -> dict[str, Any] | None:
    from igds_ray.monitor import _list_rounds
    from igds_ray.storage import read_json

    rounds = [read_json(p) for p in _list_rounds(run_dir)]
    return max(rounds, key=lambda r: r["round"]) if rounds else None


def reidentified_dir(run_dir: str) -> str | None:
    """The features `igds identify --if-drift` found after the run's latest monitor round, if it re-identified."""
    from igds_ray.storage import exists, join

    rnd = latest_monitor_round(run_dir)
    if rnd is None:
        return None
    d = join(run_dir, "monitor", f"identify-round-{rnd['round']}")
    return d if exists(join(d, "features", "features.json")) else None


def inherit_features(cfg: Any, prev: Any) -> dict[str, list[str]]:  # noqa: ANN401
    """Copy round N's feature files into this run's `features/` (cards, monitor and the report read them there);
    `igds` takes re-identified features when `igds identify --if-drift` found new ones. Returns arm -> features."""
    import pyarrow.fs as pafs

    from igds_ray.storage import exists, filesystem, join, read_json, write_json_atomic

    arms = read_json(join(prev.run_dir, "features", "arms.json"))
    src = join(prev.run_dir, "features")
    new = reidentified_dir(prev.run_dir)
    if new is not None:
        feats = list(read_json(join(new, "features", "features.json"))["features"])
        log.warning("round continues with re-identified features %s (igds identify --if-drift, %s)", feats, new)
        arms = {**arms, "igds": feats}
        src = join(new, "features")
    dst = join(cfg.run_dir, "features")
    if not exists(join(dst, "features.json")) or cfg.overwrite:
        sfs, spath = filesystem(src)
        dfs, dpath = filesystem(dst)
        dfs.create_dir(dpath, recursive=True)
        pafs.copy_files(spath, dpath, source_filesystem=sfs, destination_filesystem=dfs)
        write_json_atomic(join(dst, "inherited.json"), {"from": src, "reidentified": new is not None})
    write_json_atomic(join(dst, "arms.json"), arms)
    missing = [a for a in cfg.arms if a.startswith("igds") and a not in arms]
    if missing:
        raise ConfigError(f"rounds.continue_from {prev.run_dir!r} has no features for arm {missing[0]!r} "
                          f"(its arms: {', '.join(sorted(arms))})")
    return arms


def scores_of(run_dir: str, selection: dict[str, Any]) -> str:
    """The scores directory a selection (its manifest) read. Scores inside the run directory that wrote the
    selection are found in `run_dir` even when the run directory was moved or copied; scores of an earlier round
    (shared by a line of rounds) are where the manifest says."""
    from igds_ray.storage import join

    uri = selection["scores"].rstrip("/")
    wrote = posixpath.dirname(str(selection.get("config", {}).get("out", "")).rstrip("/"))  # <run>/selection
    if wrote and uri.startswith(wrote + "/"):
        return join(run_dir, uri[len(wrote) + 1:])
    return uri


def shared_scores(prev: Any, key: str) -> str | None:  # noqa: ANN401
    """The scores directory round N's selections read for this feature key (possibly in an earlier round's run)."""
    from igds_ray.storage import StageDir, join

    for arm in prev.arms:
        sd = StageDir(join(prev.run_dir, "selection", f"{arm}.parquet"))
        if not sd.done():
            continue
        uri = scores_of(prev.run_dir, sd.manifest())
        if posixpath.basename(uri) == f"frs_{key}" and StageDir(uri).done():
            return uri
    return None


def fresh_files(scores_uri: str, since_version: int) -> list[str]:
    """Pool files added or changed in the scores' versions after `since_version` (and not removed since)."""
    from igds_ray.storage import StageDir

    m = StageDir(scores_uri).manifest()
    fresh: set[str] = set()
    for v in m.get("versions", []):
        if int(v.get("version", 1)) > since_version:
            fresh |= set(v.get("added_files", [])) | set(v.get("changed_files", []))
            fresh -= set(v.get("removed_files", []))
    return sorted(fresh)


def forwarded_since(scores_uri: str, since_version: int) -> int:
    """Rows the model scored for the scores' versions after `since_version` (by `igds monitor` or a run)."""
    from igds_ray.storage import StageDir

    return sum(int(v.get("scored_rows", 0)) for v in StageDir(scores_uri).manifest().get("versions", [])
               if int(v.get("version", 1)) > since_version)


def model_uri(run_dir: str, arm: str) -> str:
    """An arm's model directory: `<run>/models/<arm>`, or, when that round kept the previous round's model (too
    few new rows), the directory its manifest points to (`kept_from`)."""
    from igds_ray.storage import StageDir, join

    sd = StageDir(join(run_dir, "models", arm))
    return sd.manifest().get("kept_from") or sd.uri if sd.done() else sd.uri


def keep_model(run_dir: str, arm: str, prev_uri: str, fresh_rows: int, reason: str) -> None:
    """Commit `<run>/models/<arm>` as a pointer to the previous round's model (no weights copied)."""
    from igds_ray.storage import StageDir, join

    sd = StageDir(join(run_dir, "models", arm))
    if sd.done():
        return
    with sd.lock("igds round: keep the previous model"):
        staging = sd.begin(overwrite=True)
        assert staging is not None
        sd.commit(staging, {"stage": "finetune", "kept_from": prev_uri, "fresh_rows": fresh_rows, "reason": reason},
                  suffix="")


# -- the training set ---------------------------------------------------------------------------------


def _keep_hash(ids: list[Any], seed: int, p: float) -> np.ndarray:
    """A seeded Bernoulli(p) draw per id, from a keyed hash: the same rows on every run, nothing held."""
    key = b"igds-replay:" + int(seed).to_bytes(16, "little", signed=True)
    out = np.empty(len(ids), dtype=bool)
    for i, v in enumerate(ids):
        d = hashlib.blake2b(str(v).encode(), digest_size=8, key=key).digest()
        out[i] = int.from_bytes(d, "little") / 2.0 ** 64 < p
    return out


def train_set(out_uri: str, selection: str, previous_selection: str | None, fresh: list[str], replay: float,
              seed: int, overwrite: bool = False) -> dict[str, Any]:
    """Write `out_uri` (a committed directory the fine-tuning stage reads like a selection): the selection's rows
    from the `fresh` pool files, then a replay sample of the previous selection. One part in memory at a time."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from igds_ray.storage import StageDir, filesystem, part_name, write_part

    out = StageDir(out_uri)
    if out.done() and not overwrite:
        return out.manifest()
    t0 = time.time()
    with out.lock("igds train set"):
        staging = out.begin(overwrite=True)
        assert staging is not None
        _, spath = filesystem(staging)
        counts = {FRESH: 0, REPLAY: 0}
        value_set = pa.array(fresh, pa.string())

        def write(t: pa.Table, source: str) -> None:
            if t.num_rows == 0:
                return
            t = t.replace_schema_metadata(None).append_column("round_source", pa.array([source] * t.num_rows))
            write_part(out.fs, spath, f"{source}-" + part_name(t, (S.SRC_FILE, S.SRC_ROW)), t)
            counts[source] += t.num_rows

        sel = StageDir(selection)
        for f in sel.files():
            fs, path = filesystem(f)
            with fs.open_input_file(path) as fh:
                t = pq.read_table(fh)
            write(t.filter(pc.is_in(t.column(S.SRC_FILE).cast(pa.string()), value_set=value_set)), FRESH)
        target = int(round(replay / (1.0 - replay) * counts[FRESH])) if replay > 0 else 0
        prev_rows = 0
        if target and previous_selection:
            psel = StageDir(previous_selection)
            prev_rows = int(psel.manifest().get("rows") or 0)
            p = min(1.0, target / prev_rows) if prev_rows else 0.0
            for f in psel.files():
                fs, path = filesystem(f)
                with fs.open_input_file(path) as fh:
                    t = pq.read_table(fh)
                write(t.filter(pa.array(_keep_hash(t.column(S.ID).to_pylist(), seed, p))), REPLAY)
        manifest = {"stage": "train_set", "selection": selection, "previous_selection": previous_selection,
                    "fresh_files": len(fresh), "fresh_rows": counts[FRESH], "replay": replay,
                    "replay_target": target, "replay_rows": counts[REPLAY], "previous_rows": prev_rows,
                    "rows": counts[FRESH] + counts[REPLAY], "seed": seed, "wall_s": round(time.time() - t0, 3)}
        return out.commit(staging, manifest)


# -- a continued round in the pipeline ----------------------------------------------------------------


def continue_arms(pipe: Any, selections: dict[str, str]  # noqa: ANN401
                  ) -> tuple[dict[str, str], dict[str, dict[str, Any]], dict[str, Any]]:
    """A continued round: each arm's training set (its new selected rows + replay of round N's selection),
    the model it starts from (round N's), and the arms that keep round N's model (too few new rows)."""
    import dataclasses

    from igds_ray.config import to_dict
    from igds_ray.storage import StageDir, join

    c, prev = pipe.cfg, pipe.prev
    method = c.finetune.get("method", "lora")
    data, starts, kept = {}, {}, {}
    for arm, sel in selections.items():
        prev_sel = StageDir(join(prev.run_dir, "selection", f"{arm}.parquet"))
        prev_model = StageDir(model_uri(prev.run_dir, arm))
        if not (prev_sel.done() and prev_model.done()):
            raise ConfigError(f"rounds.continue_from {prev.run_dir!r}: arm {arm!r} has no finished selection and "
                              "model there; a continued round trains the arms round N trained")
        pm, sm = prev_sel.manifest(), StageDir(sel).manifest()
        prev_scores = scores_of(prev.run_dir, pm)
        if sm["scores"].rstrip("/") == prev_scores:
            since = int(pm.get("scores_version", 1))
            fresh = fresh_files(sm["scores"], since)
            forwarded = forwarded_since(sm["scores"], since)
        else:  # scores recomputed in this run (baselines): files whose keys differ from round N's scores'
            now, before = (StageDir(sm["scores"]).manifest().get("file_keys") or {},
                           StageDir(prev_scores).manifest().get("file_keys") or {})
            fresh = sorted(f for f, k in now.items() if list(k) != list(before.get(f) or []))
            forwarded = StageDir(sm["scores"]).manifest().get("scored_rows")  # all of them, in this run
        t0, had = time.time(), ("train_set", arm) in pipe._done_records()
        m = train_set(join(c.run_dir, "train", f"{arm}.parquet"), sel, prev_sel.uri, fresh, c.rounds.replay,
                      c.seed, overwrite=c.overwrite)
        pipe.record_stage("train_set", arm, t0, had, out=m, rows=lambda m: m.get("rows"))
        facts = {"fresh_files": len(fresh), "fresh_rows": m["fresh_rows"], "replay_rows": m["replay_rows"],
                 "selected_rows": sm.get("rows"), "forwarded_rows": forwarded}
        if c.rounds.keep_models or m["fresh_rows"] < c.rounds.min_new_rows:
            log.warning("arm %s: %s: it keeps round N's model", arm, "rounds.keep_models" if c.rounds.keep_models else
                        f"{m['fresh_rows']} new rows selected (< rounds.min_new_rows {c.rounds.min_new_rows})")
            keep_model(c.run_dir, arm, prev_model.uri, m["fresh_rows"],
                       "rounds.keep_models" if c.rounds.keep_models else "fewer new rows than rounds.min_new_rows")
            kept[arm] = prev_model_config(c.model, prev_model.uri, method)
            facts["kept_previous"] = True
        else:
            data[arm] = join(c.run_dir, "train", f"{arm}.parquet")
            starts[arm] = {**c.rounds.finetune, **({"init_adapter": prev_model.uri} if method == "lora" else
                           {"model": to_dict(dataclasses.replace(c.model, name_or_path=prev_model.uri))})}
        pipe.round_facts["arms"][arm] = facts
    return data, starts, kept


def prev_model_config(model: Any, uri: str, method: str) -> Any:  # noqa: ANN401
    import dataclasses

    return dataclasses.replace(model, adapter=uri) if method == "lora" else dataclasses.replace(model, name_or_path=uri)


# -- the ledger across rounds --------------------------------------------------------------------------


def write_round(pipe: Any) -> None:  # noqa: ANN401
    """`<run>/rounds.json`, the ledger across rounds (round 1: this run alone)."""
    from igds_ray.config import to_dict
    from igds_ray.ledger import read_all
    from igds_ray.pipeline import IGDS_ARMS
    from igds_ray.storage import StageDir, exists, join

    c = pipe.cfg
    if exists(join(c.run_dir, ROUNDS_FILE)) and len(read_all(c.run_dir)) == pipe.n_records0:
        return  # a rerun that recomputed nothing keeps the round's line
    igds_scores = [StageDir(join(c.run_dir, "selection", f"{a}.parquet")) for a in c.arms if a in IGDS_ARMS]
    done = [sd.manifest() for sd in igds_scores if sd.done()]
    facts = dict(pipe.round_facts, run_wall_s=round(time.time() - pipe.t0, 1))
    if done:
        sm = StageDir(done[0]["scores"]).manifest()
        facts["pool_rows"] = sm.get("rows")
        facts["scores_version"] = done[0].get("scores_version", 1)
        if pipe.prev is None:
            facts["forwarded_rows"], facts["new_files"] = sm.get("rows"), len(sm.get("file_keys") or {})
        else:
            igds = next((facts["arms"].get(a, {}) for a in c.arms if a in IGDS_ARMS), {})
            facts["forwarded_rows"], facts["new_files"] = igds.get("forwarded_rows"), igds.get("fresh_files")
    if pipe.prev is not None:
        facts["comparable"] = to_dict(pipe.prev.evaluate) == to_dict(c.evaluate)
        mon = latest_monitor_round(pipe.prev.run_dir)
        if mon is not None and done and int(mon.get("scores_version", 0)) >= int(done[0].get("scores_version", 1)) > 1:
            facts["monitor_wall_s"] = mon.get("wall_s")  # the monitor round that scored this round's new files
        if not facts["comparable"]:
            log.warning("round N's evaluation config differs from this round's: no Δ vs the previous round")
    write_ledger(c, pipe.prev, facts, c.report.price_per_gpu_hour, c.report.price_per_cpu_hour)


def write_ledger(cfg: Any, prev: Any | None, facts: dict[str, Any], price_gpu_h: float, price_cpu_h: float  # noqa: ANN401
                 ) -> list[dict[str, Any]]:
    """`<run>/rounds.json`: round N's list plus this round's line."""
    from igds_ray.storage import exists, join, read_json, write_json_atomic

    earlier: list[dict[str, Any]] = []
    if prev is not None:
        uri = join(prev.run_dir, ROUNDS_FILE)
        earlier = read_json(uri) if exists(uri) else [round_facts(prev, None, {}, price_gpu_h, price_cpu_h)]
    line = round_facts(cfg, prev, facts, price_gpu_h, price_cpu_h, number=len(earlier) + 1)
    if prev is not None and earlier and facts.get("comparable", True):
        for arm, a in line["arms"].items():
            before = earlier[-1]["arms"].get(arm, {}).get("metric")
            a["previous_metric"] = before
            a["d_previous"] = a["metric"] - before if a.get("metric") is not None and before is not None else None
    out = [*earlier, line]
    write_json_atomic(join(cfg.run_dir, ROUNDS_FILE), out)
    return out


def round_facts(cfg: Any, prev: Any | None, facts: dict[str, Any], price_gpu_h: float, price_cpu_h: float,  # noqa: ANN401
                number: int = 1) -> dict[str, Any]:
    from igds_ray.ledger import read_all
    from igds_ray.report import arm_rows

    rows, metrics = arm_rows(cfg.run_dir, price_gpu_h, price_cpu_h)
    recs = read_all(cfg.run_dir)
    # wall: the run's own (arms train side by side; a rerun that skipped stages counts only itself), else the
    # stages' sum; plus the monitor round that scored the new files
    wall = facts.get("run_wall_s") or sum(r.wall_s for r in recs if r.status == "ok")
    wall += facts.get("monitor_wall_s") or 0.0
    cost = sum(r.gpu_hours * price_gpu_h + r.cpu_hours * price_cpu_h for r in recs if r.status == "ok")
    arms = {}
    for r in rows:
        arms[r["arm"]] = {"metric": r["metric"], "activation": r["feature_score_median"],
                          **facts.get("arms", {}).get(r["arm"], {})}
    return {"round": number, "run_dir": cfg.run_dir, "continue_from": prev.run_dir if prev is not None else None,
            "features": metrics.get("features"), "wall_s": round(wall, 1), "cost": cost,
            **{k: v for k, v in facts.items() if k != "arms"}, "arms": arms}


def report_lines(run_dir: str) -> list[str]:
    """The report's section across rounds (none before a second round)."""
    from igds_ray.storage import exists, join, read_json

    uri = join(run_dir, ROUNDS_FILE)
    if not exists(uri):
        return []
    rounds = read_json(uri)
    if len(rounds) < 2:
        return []
    arms = sorted({a for r in rounds for a in r["arms"] if a != "base"})

    def f(v: Any, d: int = 4) -> str:  # noqa: ANN401
        return "–" if v is None else f"{v:,}" if isinstance(v, int) else f"{v:.{d}f}"

    lines = ["## Rounds (continuous selection)", "",
             "| round | pool rows | rows forwarded | new files | arm | fresh rows | replayed | metric | Δ vs previous "
             "round | feature activation | wall (s) | cost ($) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rounds:
        for arm in arms:
            a = r["arms"].get(arm)
            if a is None:
                continue
            d = a.get("d_previous")
            lines.append(
                f"| {r['round']} | {f(r.get('pool_rows'))} | {f(r.get('forwarded_rows'))} | {f(r.get('new_files'))} "
                f"| {arm}{' (kept previous model)' if a.get('kept_previous') else ''} | {f(a.get('fresh_rows'))} "
                f"| {f(a.get('replay_rows'))} | {f(a.get('metric'))} | {'–' if d is None else f'{d:+.4f}'} "
                f"| {f(a.get('activation'), 3)} | {f(r.get('wall_s'), 1)} | {f(r.get('cost'))} |")
    lines += ["", "Round 1 trained from the base model on its whole selection; each later round fine-tuned the "
                  "previous round's model on its new selected rows plus the replay share, and its pool rows were "
                  "forwarded through the model only when new or changed (`rows forwarded`).", ""]
    return lines


# -- the loop ------------------------------------------------------------------------------------------


def carried_config(prev: str) -> dict[str, Any]:
    """Round N's saved config as the next round's starting point (without its run_dir and overwrite)."""
    from igds_ray.storage import exists, join, read_json

    if not exists(join(prev, "config.json")):
        raise ConfigError(f"--continue-from {prev!r}: no config.json there: not an igds run directory")
    data = read_json(join(prev, "config.json"))
    data.pop("overwrite", None)
    data.pop("run_dir", None)
    return data


def identify_if_drift(run_dir: str) -> dict[str, Any]:
    """`igds identify --if-drift`: re-run feature identification (recall + causal) into
    `<run>/monitor/identify-round-N/` only when the run's last monitor round (N) found a chosen feature that no
    longer passes recall on the task set; otherwise nothing is computed."""
    from igds_ray.config import IdentifyConfig, from_dict
    from igds_ray.pipeline import RunConfig
    from igds_ray.stages import identify
    from igds_ray.storage import join, read_json

    rnd = latest_monitor_round(run_dir)
    if rnd is None:
        raise StageOutputError(f"{run_dir}: no monitor round yet (monitor/round-N.json): run igds monitor --run-dir "
                               f"{run_dir} first")
    recall = rnd.get("recall") or {}
    failing = sorted(f for f, r in recall.items() if not r["passes"])
    out: dict[str, Any] = {"run_dir": run_dir, "monitor_round": rnd["round"], "failing": failing,
                           "reidentified": False, "features": rnd.get("features")}
    if not recall:
        out["reason"] = "that monitor round did not re-run recall (monitor.recall=false): features kept"
        return out
    if not failing:
        out["reason"] = "every chosen feature still passes recall on the task set: features kept"
        return out
    cfg = from_dict(RunConfig, read_json(join(run_dir, "config.json")))
    sub = join(run_dir, "monitor", f"identify-round-{rnd['round']}")
    res = identify.run(IdentifyConfig(model=cfg.model, sae=cfg.sae, task=cfg.task, run_dir=sub, recall=cfg.recall,
                                      causal=cfg.causal, seed=cfg.seed))
    out.update(reidentified=True, features=list(res["features"]), selected_by=res.get("selected_by"), dir=sub,
               reason=f"{', '.join(failing)} no longer pass{'es' if len(failing) == 1 else ''} recall")
    return out


def finished(run_dir: str) -> bool:
    """A round is finished when its report is written (the last thing `igds run` does)."""
    from igds_ray.storage import exists, join

    return exists(join(run_dir, ROUNDS_FILE)) and exists(join(run_dir, "report", "report.md"))


def round_dirs(root: str) -> list[tuple[int, str]]:
    """`<root>/round-K` directories, by K."""
    import pyarrow.fs as pafs

    from igds_ray.storage import filesystem, join

    fs, path = filesystem(root)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    out = []
    for e in fs.get_file_info(pafs.FileSelector(path)):
        name = posixpath.basename(e.path)
        if e.type == pafs.FileType.Directory and name.startswith("round-") and name[6:].isdigit():
            out.append((int(name[6:]), join(root, name)))
    return sorted(out)


def next_round(data: dict[str, Any], root: str, pool: str | None = None, say: Any = print  # noqa: ANN401
               ) -> dict[str, Any]:
    """`igds round`: one turn of the loop under `root`. No round yet: round 1, a plain run of `data` (a RunConfig
    dict). An unfinished last round: resumed. Else `igds monitor` on the last round (its scores grow by the new
    files), `igds identify --if-drift`, then round K+1 continuing it. Returns the round's facts (drift included)."""
    import copy

    from igds_ray import monitor, pipeline
    from igds_ray.config import from_dict
    from igds_ray.storage import exists, join, read_json

    def config(run_dir: str, continue_from: str | None, hold: bool = False) -> Any:  # noqa: ANN401
        d = copy.deepcopy(data)
        d["run_dir"] = run_dir
        if pool:
            d.setdefault("pool", {})["path"] = pool
        d.setdefault("rounds", {})["continue_from"] = continue_from
        if hold:
            d["rounds"]["keep_models"] = True
        return from_dict(pipeline.RunConfig, d)

    done = round_dirs(root)
    facts: dict[str, Any] = {"root": root, "monitor": None, "identify": None, "drift": False}
    if done and not finished(done[-1][1]):
        k, run_dir = done[-1]
        saved = read_json(join(run_dir, "config.json")).get("rounds", {}) if exists(join(run_dir, "config.json")) \
            else {"continue_from": done[-2][1] if len(done) > 1 else None}
        prev, facts["held"] = saved.get("continue_from"), bool(saved.get("keep_models"))
        say(f"[round {k}] resuming the unfinished {run_dir}")
    elif not done:
        k, run_dir, prev = 1, join(root, "round-1"), None
    else:
        k, prev = done[-1][0] + 1, done[-1][1]
        run_dir = join(root, f"round-{k}")
        rnd, drifted = monitor.run(prev, pool)
        say(f"[round {k}] {monitor.status_line(rnd)}")
        ident = identify_if_drift(prev) if rnd.get("recall") else None
        if ident is not None:
            say(f"[round {k}] identify --if-drift: {ident['reason']}"
                + (f"; new features {ident['features']}" if ident["reidentified"] else ""))
        facts.update(monitor=rnd, identify=ident, drift=drifted)
    policy = (data.get("rounds") or {}).get("on_drift", RoundsConfig.on_drift)
    hold = facts.pop("held", False) or (bool(facts["drift"]) and policy == "keep")
    if hold and facts["drift"]:
        say(f"[round {k}] drift and rounds.on_drift=keep: every arm keeps round {k - 1}'s model")
    cfg = config(run_dir, prev, hold)
    pipeline.run(cfg)
    ledger = read_json(join(run_dir, ROUNDS_FILE))
    facts.update(round=k, run_dir=run_dir, ledger=ledger)
    return facts


def round_line(line: dict[str, Any]) -> str:
    """One line per round for the console."""
    arms = "; ".join(
        f"{arm} {a['metric']:.4f}" + (f" ({a['d_previous']:+.4f})" if a.get("d_previous") is not None else "")
        + (f", {a['fresh_rows']:,} new + {a['replay_rows']:,} replayed rows" if a.get("fresh_rows") is not None else "")
        + (" (kept the previous model)" if a.get("kept_previous") else "")
        for arm, a in line["arms"].items() if arm != "base" and a.get("metric") is not None)
    fwd = line.get("forwarded_rows")
    return (f"round {line['round']}: pool {line.get('pool_rows') or 0:,} rows, forwarded "
            f"{'–' if fwd is None else f'{fwd:,}'}; {arms}; wall {line['wall_s']:.0f}s, ${line['cost']:.4f}")
