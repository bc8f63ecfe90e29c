"""`igds run` end to end on the tiny world: every arm, every stage, the report; then a rerun skips."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from igds_ray import pipeline
from igds_ray.config import from_dict
from igds_ray.demo.tiny import make_rows
from igds_ray.ledger import read_all

# In CI; the ablations igds_k5 and igds_no_recall join the same run directory in a slow test below.
ALL_ARMS = ["igds", "igds_no_causal", "full", "random", "loss", "ifd", "zip"]
ABLATIONS = ["igds_k5", "igds_no_recall"]


def run_cfg(world, root):
    rows = [{"question": r["prompt"], "answer": r["response"]} for r in make_rows(200, seed=11) if "How many" in r["prompt"]]
    pd.DataFrame(rows).to_parquet(root / "task.parquet")
    return from_dict(pipeline.RunConfig, dict(
        model=str(world.model_dir), sae=str(world.saes["jumprelu"]), run_dir=str(root / "run"),
        task=dict(source=str(root / "task.parquet"), split=None, dev_split=None),
        pool=dict(path=str(world.pool_dir)), arms=ALL_ARMS, fraction=0.5,
        recall=dict(limit=24, templates=[0], min_frequency=0.3, top_n=4, batch_size=24),
        causal=dict(factors=[0.0, 4.0], dev_limit=8, min_dev=4, max_new_tokens=6, fallback="top_recall"),
        score=dict(batch_size=100, max_tokens=128),
        baselines={"zip": {"k1": 20, "k2": 5, "shard_rows": 100}, "lm": {"max_tokens": 128}},
        finetune=dict(epochs=1, batch_size=16, max_tokens=96, lr=1e-3, lora_r=4),
        evaluate=dict(split=None, limit=12, max_new_tokens=6),
        no_recall_candidates=3,
        finetune_concurrency=2,  # two arms at a time, each in its own Ray task (ray_local has 2 CPUs)
    ))


@pytest.fixture(scope="module")
def ran(world, ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    cfg = run_cfg(world, root)
    return cfg, pipeline.run(cfg)


def test_every_stage_wrote_its_outputs(ran):
    cfg, report_path = ran
    from pathlib import Path

    run = Path(cfg.run_dir)
    assert (run / "config.yaml").is_file() and (run / "features" / "features.json").is_file()
    arms = json.loads((run / "features" / "arms.json").read_text())
    assert set(arms) == {"igds", "igds_no_causal"}
    for arm in ALL_ARMS:
        sel = pd.read_parquet(run / "selection" / f"{arm}.parquet")
        manifest = json.loads((run / "selection" / f"{arm}.parquet" / "_SUCCESS").read_text())
        expected = manifest["rows_scored"] if arm == "full" else int(0.5 * manifest["rows_scored"])
        assert len(sel) == manifest["rows"] == expected, arm
        assert (run / "models" / arm / "adapter_config.json").is_file(), arm
        assert (run / "eval" / f"{arm}.parquet").is_file(), arm
    ifd = pd.read_parquet(run / "scores" / "lm").set_index("id")["ifd"]
    assert (ifd.loc[pd.read_parquet(run / "selection" / "ifd.parquet")["id"]] <= 1.0).all()
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert set(metrics["arms"]) == {"base", *ALL_ARMS}
    assert all(a["status"] == "ok" for a in metrics["arms"].values())
    assert len(metrics["mechanism"]["per_arm"]) == len(ALL_ARMS)


def test_report_table_lists_every_arm_with_costs(ran):
    cfg, report_path = ran
    text = open(report_path).read()
    for arm in ["base", *ALL_ARMS]:
        assert any(line.startswith(f"| {arm} |") for line in text.splitlines()), arm
    igds = next(line for line in text.splitlines() if line.startswith("| igds |"))
    assert "recall" in igds and "causal" in igds and "finetune" in igds and "evaluate" in igds
    stages = {(r.stage, r.arm) for r in read_all(cfg.run_dir)}
    assert ("finetune", "zip") in stages and ("evaluate", "base") in stages


def test_rerun_skips_finished_stages(ran):
    cfg, _ = ran
    before = {(r.stage, r.arm): r.written_at for r in read_all(cfg.run_dir)}
    pipeline.run(cfg)
    after = {(r.stage, r.arm): r.written_at for r in read_all(cfg.run_dir)}
    assert before == after  # nothing recomputed, nothing re-recorded


def test_concurrent_arms_overlap_and_train_as_they_would_alone(ran, tmp_path):
    """Arms fine-tuned two at a time really overlap, and an arm trained alone, in this process, gets
    bit-identical weights."""
    import dataclasses
    from datetime import datetime

    from safetensors.torch import load_file

    from igds_ray.stages import finetune

    cfg, _ = ran
    recs = [r for r in read_all(cfg.run_dir) if r.stage == "finetune"]
    end = {r.arm: datetime.strptime(r.written_at, "%Y-%m-%dT%H:%M:%SZ").timestamp() for r in recs}
    spans = sorted((end[r.arm] - r.wall_s, end[r.arm]) for r in recs)
    assert len(spans) == len(ALL_ARMS)
    assert any(b0 < a1 - 1.5 for (a0, a1), (b0, b1) in zip(spans, spans[1:])), spans  # some pair overlapped
    pipe = pipeline.Pipeline(cfg)
    assert pipe.finetune_slots([object()] * 7) == 2
    run = cfg.run_dir
    fc = pipe.finetune_config("random", f"{run}/selection/random.parquet")
    alone = dataclasses.replace(fc, out=str(tmp_path / "alone"), storage_path=str(tmp_path / "train"))
    finetune.run(alone)
    a = load_file(str(tmp_path / "alone" / "adapter_model.safetensors"))
    b = load_file(f"{run}/models/random/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch_equal(a[k], b[k]) for k in a)


def test_arms_start_longest_first(ran, tmp_path):
    """With several arms at a time, the one with the most rows starts first (full: the whole pool), and a
    selection whose manifest cannot be read is not left to the end (it counts as the largest)."""
    cfg, _ = ran
    pipe = pipeline.Pipeline(cfg)
    fcs = {arm: pipe.finetune_config(arm, f"{cfg.run_dir}/selection/{arm}.parquet") for arm in ALL_ARMS}
    order = [arm for arm, _ in pipeline.longest_first(fcs)]
    rows = {arm: json.loads(open(f"{cfg.run_dir}/selection/{arm}.parquet/_SUCCESS").read())["rows"] for arm in ALL_ARMS}
    assert order[0] == "full" and rows["full"] > max(v for a, v in rows.items() if a != "full")
    assert [rows[a] for a in order] == sorted(rows.values(), reverse=True)
    halves = [a for a in ALL_ARMS if rows[a] == rows["random"]]
    assert [a for a in order if a in halves] == halves  # equal rows keep the config's order
    fcs["broken"] = pipe.finetune_config("broken", str(tmp_path / "no_such_selection.parquet"))
    assert pipeline.longest_first(fcs)[0][0] == "broken"


def torch_equal(x, y) -> bool:
    import torch

    return bool(torch.equal(x, y))


def test_a_failing_arm_beside_another_is_reported_by_name_and_the_other_finishes(ran, tmp_path):
    """On the concurrent path a broken arm fails with its own error (naming its selection, not Ray's
    wrapper), its ledger record says so, and the arm beside it still trains and commits."""
    import dataclasses

    cfg, _ = ran
    cfg = dataclasses.replace(cfg, run_dir=str(tmp_path / "run"))
    pipe = pipeline.Pipeline(cfg)
    missing = str(tmp_path / "no_such_selection.parquet")
    models, failed = pipe.finetune({"broken": missing, "random": f"{ran[0].run_dir}/selection/random.parquet"})
    assert set(models) == {"random"} and set(failed) == {"broken"}
    assert failed["broken"].startswith("StageOutputError") and missing in failed["broken"], failed
    assert (tmp_path / "run" / "models" / "random" / "adapter_config.json").is_file()
    recs = {r.arm: r for r in read_all(cfg.run_dir) if r.stage == "finetune"}
    assert recs["broken"].status == "failed" and missing in recs["broken"].error
    assert recs["random"].status == "ok" and recs["random"].rows


def test_an_arm_whose_features_cannot_be_found_fails_alone(world, ray_local, tmp_path):
    """igds_response on a base whose dev answers cannot be contrasted (here: min_each above the dev
    set's size) is reported as failed with the contrast stage's reason; the arm beside it is
    selected, fine-tuned and evaluated as usual."""
    import dataclasses

    cfg = run_cfg(world, tmp_path)
    cfg = dataclasses.replace(cfg, arms=["igds_no_causal", "igds_response"], finetune_concurrency=1,
                              contrast=dataclasses.replace(cfg.contrast, min_each=10_000, dev_limit=8,
                                                           max_new_tokens=4))
    report_path = pipeline.run(cfg)
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert metrics["arms"]["igds_response"]["status"] == "failed"
    assert "contrast.min_each=10000" in metrics["arms"]["igds_response"]["error"]
    assert all(metrics["arms"][a]["status"] == "ok" for a in ("base", "igds_no_causal"))
    assert not (tmp_path / "run" / "selection" / "igds_response.parquet").exists()
    contrast_rec = [r for r in read_all(cfg.run_dir) if r.stage == "contrast"]
    assert [r.status for r in contrast_rec] == ["failed"]
    text = open(report_path).read()
    assert any(line.startswith("| igds_response (failed) |") for line in text.splitlines())
    assert ("- igds_response: TaskDataError: contrast (positives: references) needs at least "
            "contrast.min_each=10000") in text


def test_finetune_concurrency_is_checked(ran):
    import dataclasses

    with pytest.raises(Exception, match="finetune_concurrency"):
        dataclasses.replace(ran[0], finetune_concurrency=-1)


@pytest.mark.slow  # ~2 min: a second causal search (random latents) and two more fine-tunes
def test_ablation_arms_join_a_finished_run(ran):
    """Adding arms to a finished run runs only what they need; the earlier stages keep their records."""
    import dataclasses
    from pathlib import Path

    cfg, _ = ran
    before = {(r.stage, r.arm): r.written_at for r in read_all(cfg.run_dir)}
    more = dataclasses.replace(cfg, arms=tuple(ALL_ARMS + ABLATIONS))
    pipeline.run(more)
    after = {(r.stage, r.arm): r.written_at for r in read_all(cfg.run_dir)}
    assert all(after[k] == v for k, v in before.items())
    new = set(after) - set(before)
    assert {("finetune", a) for a in ABLATIONS} <= new and ("causal_no_recall", "-") in new
    assert not any(stage == "finetune" and arm in ALL_ARMS for stage, arm in new)
    run = Path(cfg.run_dir)
    assert set(json.loads((run / "features" / "arms.json").read_text())) == {"igds", "igds_no_causal", *ABLATIONS}
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert set(metrics["arms"]) == {"base", *ALL_ARMS, *ABLATIONS}
    assert all(a["status"] == "ok" for a in metrics["arms"].values())


def _cards(cfg) -> dict:
    from pathlib import Path

    return json.loads((Path(cfg.run_dir) / "report" / "cards.json").read_text())


def test_every_candidate_and_chosen_feature_has_a_card_read_where_scoring_reads(ran):
    """The cards cover recall's candidates and every arm's features. A chosen feature's pool rows are the top
    of the whole scored pool, and the second pass reads each at the same positions as scoring: the value
    it pools equals the row's `acts` in the scores. Its histogram counts every scored row once; the
    logit lens is W_dec[f] @ W_U."""
    import numpy as np
    import torch
    from pathlib import Path

    from igds_ray.models.loading import load_sae
    from igds_ray.config import SAEConfig
    from transformers import AutoModelForCausalLM

    cfg, _ = ran
    run = Path(cfg.run_dir)
    cards = {c["feature"]: c for c in _cards(cfg)["cards"]}
    recall = pd.read_parquet(run / "features" / "recall.parquet")
    arms = json.loads((run / "features" / "arms.json").read_text())
    assert set(cards) == set(recall.loc[recall["candidate"], "feature"]) | {f for fs in arms.values() for f in fs}
    chosen = arms["igds"][0]
    card = cards[chosen]
    assert "igds" in card["chosen_by"] and card["pool_source"]["kind"] == "scored"
    scores = pd.read_parquet(card["pool_source"]["scores"])
    feats = json.loads((Path(card["pool_source"]["scores"]) / "_SUCCESS").read_text())["config"]["features"]
    col = feats.index(chosen)
    ok = scores[scores["error"].isna()]
    acts = np.stack(ok["acts"].to_numpy())[:, col]
    h = card["histogram"]
    assert h["rows"] == len(ok) == sum(h["zero"].values()) + sum(sum(v) for v in h["counts"].values())
    shown = card["pool_examples"]
    assert len(shown) == min(cfg.cards.examples, int((acts > 0).sum())) and shown
    assert [r["value"] for r in shown] == sorted((r["value"] for r in shown), reverse=True)
    assert shown[0]["value"] == pytest.approx(float(acts.max()), abs=1e-4)
    by_key = {(f, r): a for f, r, a in zip(ok["src_file"], ok["src_row"], acts)}
    for r in shown:
        assert r["value"] == pytest.approx(float(by_key[(r["src_file"], r["src_row"])]), abs=1e-4)
        read = np.asarray(r["acts"])[r["read"]]
        assert float(read.max()) == pytest.approx(r["value"], abs=1e-4)  # prompt_max over the read tokens
        assert len(r["tokens"]) == len(r["acts"]) and r["boundary"] <= len(r["tokens"])
    assert card["task_examples"] and all(len(e["tokens"]) == len(e["acts"]) for e in card["task_examples"])
    # the logit lens, recomputed from the checkpoint's weights
    model = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path)
    sae = load_sae(SAEConfig(path=cfg.sae.path), torch.device("cpu"))
    logits = sae.W_dec[int(chosen.rsplit("_p", 1)[1])].detach() @ model.get_output_embeddings().weight.detach().T
    top = [v for _, v in card["logit_lens"]["promoted"]]
    assert top[0] == pytest.approx(float(logits.max()), rel=1e-4) and top == sorted(top, reverse=True)
    assert card["logit_lens"]["suppressed"][0][1] == pytest.approx(float(logits.min()), rel=1e-4)
    assert card["neuronpedia"] is None  # a local SAE without a neuronpedia_id
    others = [c for c in cards.values() if not c["chosen_by"]]
    assert all(c["pool_source"]["kind"] == "sample" and c["histogram"]["rows"] > 0 for c in others)
    rec = [r for r in read_all(cfg.run_dir) if r.stage == "cards"]
    assert [r.status for r in rec] == ["ok"]


def test_report_html_opens_in_chromium_with_a_card_per_chosen_feature(ran, tmp_path):
    """report.html, opened in headless Chromium: no console error, every image decodes, every chosen feature
    and every candidate has its card, and nothing is fetched from outside the file."""
    import re
    from pathlib import Path

    from tests import browser

    cfg, _ = ran
    page_path = Path(cfg.run_dir) / "report" / "report.html"
    text = page_path.read_text()
    # self-contained: no script, no stylesheet, no image or frame from anywhere else (links are fine)
    assert "<script" not in text and "<link" not in text and "<iframe" not in text
    assert not re.search(r"src=['\"](?!data:)", text)
    if browser.chromium() is None:
        if browser.need_browser():
            pytest.fail("IGDS_REQUIRE_BROWSER=1 but no chromium on PATH")
        pytest.skip("no chromium on PATH (make test installs Debian's chromium)")
    page = browser.Page()
    try:
        page.open(page_path.as_uri())
        assert page.errors() == []
        images = page.evaluate(browser.IMAGES_JS)
        assert len(images) >= 3 + 1 and all(w > 0 and h > 0 for _, w, h in images), images
        ids = set(page.evaluate("[...document.querySelectorAll('section.card')].map(s => s.id)"))
        arms = json.loads((Path(cfg.run_dir) / "features" / "arms.json").read_text())
        assert {f"card-{f}" for fs in arms.values() for f in fs} <= ids
        assert {f"card-{c['feature']}" for c in _cards(cfg)["cards"]} == ids
        assert page.evaluate("document.querySelectorAll('.ex .tok').length") > 0
        shot = tmp_path / "report.png"
        page.screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    finally:
        page.close()


def test_card_histograms_split_by_a_pool_label(ran, tmp_path):
    """With a label column, a chosen feature's histogram is split by label: per label, zeros + bins = the
    label's scored rows, and the labels add up to the scored pool."""
    import numpy as np
    import pyarrow.parquet as pq
    from pathlib import Path

    from igds_ray.labels import PoolColumn
    from igds_ray.stages.cards import scan_scores

    cfg, _ = ran
    pool = tmp_path / "pool"
    pool.mkdir()
    src = Path(cfg.pool.path)
    for f in sorted(src.glob("*.parquet")):
        t = pq.read_table(f)
        pq.write_table(t.append_column("kind", [["even" if i % 2 == 0 else "odd" for i in range(t.num_rows)]]),
                       pool / f.name)
    card = next(c for c in _cards(cfg)["cards"] if "igds" in c["chosen_by"])
    uri = card["pool_source"]["scores"]
    feats = json.loads((Path(uri) / "_SUCCESS").read_text())["config"]["features"]
    res = scan_scores(uri, feats, [card["feature"]], PoolColumn(str(pool), "kind", "report.label_column"), 3, 7)
    h = res[card["feature"]]["hist"]
    scores = pd.read_parquet(uri)
    ok = scores[scores["error"].isna()]
    for name, parity in (("even", 0), ("odd", 1)):
        n = int((ok["src_row"] % 2 == parity).sum())
        assert h["zero"][name] + sum(h["counts"][name]) == n and len(h["counts"][name]) == 7
    assert h["rows"] == len(ok)
    top = res[card["feature"]]["top"]
    assert [t["label"] for t in top] == ["even" if t["src_row"] % 2 == 0 else "odd" for t in top]
    assert np.isclose(top[0]["value"], card["pool_examples"][0]["value"], atol=1e-4)


def test_igds_inspect_shows_both_ends_and_the_cutoff(ran, capsys):
    """`igds inspect`: the top rows are the scores' highest (in order), the bottom rows their lowest, the
    igds selection's cutoff sits between them, and each shown row's tokens, read again, pool to its score."""
    import io
    from pathlib import Path

    from igds_ray.cli import main
    from igds_ray.errors import ConfigError
    from igds_ray.inspect import inspect

    cfg, _ = ran
    run = Path(cfg.run_dir)
    uri = json.loads((run / "selection" / "igds.parquet" / "_SUCCESS").read_text())["scores"]
    buf = io.StringIO()
    got = inspect(uri, top=4, color=False, out=buf)
    scores = pd.read_parquet(uri)
    ok = scores[scores["error"].isna()].sort_values("score")
    assert [r["value"] for r in got["top"]] == pytest.approx(ok["score"].to_numpy()[::-1][:4])
    assert [r["value"] for r in got["bottom"]] == pytest.approx(ok["score"].to_numpy()[:4])
    assert got["scored"] == len(ok)
    sel = json.loads((run / "selection" / "igds.parquet" / "_SUCCESS").read_text())
    cut = next(c for c in got["cutoffs"] if c["arm"] == "igds")
    assert cut["rows"] == sel["rows"] and cut["score"] == sel["cutoff"]["score"]
    text = buf.getvalue().splitlines()
    at = next(i for i, line in enumerate(text) if line.startswith("-- cutoff of selection igds"))
    assert text.index("-- top 4 --") < at < text.index("-- bottom 4 --")
    for r in got["top"] + got["bottom"]:
        s = got["tokens"][f"{r['src_file']}:{r['src_row']}"]
        assert s["value"] == pytest.approx(r["value"], abs=1e-4)
    assert "[" in text[2 + 1]  # without colour, active tokens carry their value in brackets
    with pytest.raises(ConfigError, match="these scores hold"):
        inspect(uri, feature="l0_p99999", out=io.StringIO())
    assert main(["inspect", "--scores", str(run / "scores" / "random"), "--no-tokens"]) == 2
    assert "not IGDS feature scores" in capsys.readouterr().err
    assert main(["inspect", "--scores", uri, "--top", "2", "--no-tokens", "--color", "never"]) == 0
    assert "-- cutoff of selection igds" in capsys.readouterr().out


def test_run_prints_a_line_per_stage_and_a_stage_table(ran):
    """Progress: a line per stage with its wall time (rows/s where the stage counts rows, an ETA while arms of
    a kind are left), then the table of every stage, which the report holds too."""
    import io

    from igds_ray.progress import Progress

    cfg, report_path = ran
    buf = io.StringIO()
    p = Progress(out=buf)
    p.expect("finetune", 3, 2)
    p.note("finetune", "random", 10.0, 500)
    p.note("finetune", "igds", 20.0, 500)
    p.note("evaluate", "base", 2.0, 12, recorded=False)
    lines = buf.getvalue().splitlines()
    assert "finetune [random]" in lines[0] and "50 rows/s" in lines[0] and "2 finetune left, ETA ~10s" in lines[0]
    assert "1 finetune left, ETA ~8s" in lines[1] and "skipped" in lines[2]
    table = p.close().splitlines()
    assert table[2].startswith("| finetune | random | ok | 10.0 | 500 | 50 |") and table[-1].startswith("| **all** |")
    # the real run: its table is in the report, one row per stage the run noted
    import json
    from pathlib import Path

    st = json.loads((Path(cfg.run_dir) / "report" / "stages.json").read_text())
    text = open(report_path).read()
    assert "## Stages of the last `igds run`" in text and st["table"].splitlines()[0] in text
    stages = {line.split("|")[1].strip() for line in st["table"].splitlines()[2:-1]}
    assert {"recall", "causal", "select", "finetune", "evaluate", "cards"} <= stages


@pytest.mark.slow  # ~2-4 min: two rounds, each scoring, evaluating the adapter and re-running recall
def test_igds_monitor_rounds_score_only_new_rows_and_flag_drift(ran, tmp_path, capsys):
    """`igds monitor` on a copy of the run: a round whose new file looks like the pool forwards only its rows and
    reports no drift (exit 0); a round of off-task rows only drifts (exit 3). Each round writes round-N.json
    and the plot across rounds."""
    import shutil

    from igds_ray.cli import main
    from igds_ray.demo.tiny import write_pool

    cfg, _ = ran
    run = tmp_path / "run"
    shutil.copytree(cfg.run_dir, run)
    conf = json.loads((run / "config.json").read_text())
    conf["monitor"] = {**conf.get("monitor", {}), "limit": 12}
    (run / "config.json").write_text(json.dumps(conf))
    pool = tmp_path / "pool"
    shutil.copytree(cfg.pool.path, pool)

    def add(name: str, rows: list[dict]) -> None:
        write_pool(tmp_path / f"new-{name}", rows, n_files=1)
        shutil.move(str(tmp_path / f"new-{name}" / "part-000.parquet"), str(pool / name))

    add("part-100.parquet", make_rows(100, seed=21))
    assert main(["monitor", "--run-dir", str(run), "--pool", str(pool)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    r1 = json.loads((run / "monitor" / "round-1.json").read_text())
    assert r1["new_rows"] == 100 and r1["scored_rows_this_round"] == 100 and r1["new_files"] == ["part-100.parquet"]
    assert r1["reference_rows"] == 200 and not r1["drift"] and line.startswith("igds monitor round 1: 100 new rows")
    assert r1["psi"] < r1["thresholds"]["psi_max"] and r1["ks"] < r1["thresholds"]["ks_max"]
    assert 0 <= r1["adapter"]["metric"] <= 1 and r1["adapter"]["n"] == 12
    feats = json.loads((run / "features" / "arms.json").read_text())["igds"]
    assert set(r1["recall"]) == set(feats)

    off = [r for r in make_rows(400, seed=22) if r["prompt"].startswith("Tell me about")][:100]
    add("part-101.parquet", off)
    assert main(["monitor", "--run-dir", str(run), "--pool", str(pool)]) == 3
    r2 = json.loads((run / "monitor" / "round-2.json").read_text())
    assert r2["new_rows"] == len(off) and r2["reference_rows"] == 300 and r2["drift"], r2
    assert any(x.startswith(("PSI", "KS")) for x in r2["reasons"]) and "DRIFT" in capsys.readouterr().out
    assert (run / "monitor" / "rounds.png").stat().st_size > 1000
    versions = [json.loads(p.read_text())["version"] for p in (run / "scores").glob("frs_*/_SUCCESS")]
    assert 3 in versions  # the run's scores: version 1, then one increment per round


def _round_copy(cfg, tmp_path, name="round-1"):
    """A copy of the shared run (its scores are found in the copy, so the fixture's stay as they are) and of its
    pool (shutil.copytree keeps the files' mtimes, so they are the same pool files)."""
    import shutil

    run1 = tmp_path / name
    shutil.copytree(cfg.run_dir, run1)
    pool = tmp_path / "pool"
    shutil.copytree(cfg.pool.path, pool)
    return run1, pool


def _add_file(tmp_path, pool, name: str, rows: list[dict]) -> None:
    import shutil

    from igds_ray.demo.tiny import write_pool

    write_pool(tmp_path / f"new-{name}", rows, n_files=1)
    shutil.move(str(tmp_path / f"new-{name}" / "part-000.parquet"), str(pool / name))


def test_continued_rounds_forward_only_new_rows_and_continue_each_arms_model(ran, tmp_path):
    """`rounds.continue_from`: round 2 grows round 1's scores by the new file only (100 rows forwarded, 200
    reused), trains each arm from round 1's adapter on its new selected rows plus a replay sample of round 1's
    selection, and appends its line to rounds.json, which the report shows. Round 3 on an unchanged pool
    forwards nothing and keeps round 2's models."""
    import dataclasses
    from pathlib import Path

    from igds_ray.rounds import RoundsConfig
    from igds_ray.storage import StageDir

    cfg, _ = ran
    run1, pool = _round_copy(cfg, tmp_path)
    _add_file(tmp_path, pool, "part-100.parquet", make_rows(100, seed=21))
    key = "frs_" + "_".join(json.loads((run1 / "features" / "arms.json").read_text())["igds"])

    def nxt(k: int, prev: Path):
        return dataclasses.replace(cfg, run_dir=str(tmp_path / f"round-{k}"), arms=("igds", "random"),
                                   pool=dataclasses.replace(cfg.pool, path=str(pool)),
                                   rounds=RoundsConfig(continue_from=str(prev), replay=0.5))

    run2 = Path(pipeline.run(nxt(2, run1))).parents[1]
    scores = StageDir(str(run1 / "scores" / key)).manifest()
    assert (scores["version"], scores["rows"], scores["scored_rows"], scores["reused_rows"]) == (2, 300, 100, 200)
    assert scores["added_files"] == ["part-100.parquet"]
    assert StageDir(str(Path(cfg.run_dir) / "scores" / key)).manifest()["version"] == 1  # the fixture's untouched
    assert not (run2 / "scores" / key).exists()
    assert json.loads((run2 / "features" / "inherited.json").read_text())["reidentified"] is False
    assert {r.stage for r in read_all(str(run2))} & {"recall", "causal"} == set()  # round 1's features, no search
    sel = pd.read_parquet(run2 / "selection" / "igds.parquet")
    sm = json.loads((run2 / "selection" / "igds.parquet" / "_SUCCESS").read_text())
    assert sm["scores_version"] == 2 and sm["rows_scored"] == 300 and len(sel) == 150
    train = pd.read_parquet(run2 / "train" / "igds.parquet")
    fresh, replay = train[train.round_source == "fresh"], train[train.round_source == "replay"]
    assert set(fresh.id) == set(sel[sel.src_file == "part-100.parquet"].id) and len(fresh) > 0
    assert set(replay.id) <= set(pd.read_parquet(run1 / "selection" / "igds.parquet").id) and len(replay) > 0
    ft = json.loads((run2 / "models" / "igds" / "_SUCCESS").read_text())
    assert ft["config"]["init_adapter"] == str(run1 / "models" / "igds") and ft["metrics"]["rows"] == len(train)
    ledger = json.loads((run2 / "rounds.json").read_text())
    assert [r["round"] for r in ledger] == [1, 2] and ledger[1]["continue_from"] == str(run1)
    two = ledger[1]
    assert (two["forwarded_rows"], two["pool_rows"], two["new_files"]) == (100, 300, 1)
    m1 = json.loads((run1 / "eval" / "metrics.json").read_text())["arms"]
    a = two["arms"]["igds"]
    assert (a["fresh_rows"], a["replay_rows"]) == (len(fresh), len(replay))
    assert a["previous_metric"] == m1["igds"]["metrics"]["metric"]
    assert a["d_previous"] == pytest.approx(a["metric"] - a["previous_metric"])
    text = (run2 / "report" / "report.md").read_text()
    assert "## Rounds (continuous selection)" in text
    assert any(line.startswith("| 2 | 300 | 100 | 1 | igds |") for line in text.splitlines()), text

    run3 = Path(pipeline.run(nxt(3, run2))).parents[1]  # nothing new in the pool
    three = json.loads((run3 / "rounds.json").read_text())[-1]
    assert three["round"] == 3 and three["forwarded_rows"] == 0
    assert three["arms"]["igds"]["fresh_rows"] == 0 and three["arms"]["igds"]["kept_previous"] is True
    kept = json.loads((run3 / "models" / "igds" / "_SUCCESS").read_text())
    assert kept["kept_from"] == str(run2 / "models" / "igds")
    assert three["arms"]["igds"]["metric"] == two["arms"]["igds"]["metric"]  # the same model, the same test set


def test_round_errors_name_the_run_and_key(ran, tmp_path, capsys):
    import dataclasses

    from igds_ray.cli import main
    from igds_ray.config import ConfigError
    from igds_ray.errors import StageOutputError
    from igds_ray.rounds import RoundsConfig

    cfg, _ = ran
    with pytest.raises(ConfigError, match=r"rounds.replay must be in \[0, 1\)"):
        RoundsConfig(replay=1.0)
    unfinished = tmp_path / "half"
    unfinished.mkdir()
    (unfinished / "config.json").write_text(json.dumps({}))
    with pytest.raises(StageOutputError, match="has not finished"):
        pipeline.Pipeline(dataclasses.replace(cfg, run_dir=str(tmp_path / "r2"),
                                              rounds=RoundsConfig(continue_from=str(unfinished))))
    with pytest.raises(ConfigError, match="changes model"):
        pipeline.Pipeline(dataclasses.replace(cfg, run_dir=str(tmp_path / "r2"),
                                              model=dataclasses.replace(cfg.model, dtype="bfloat16"),
                                              rounds=RoundsConfig(continue_from=cfg.run_dir)))
    assert main(["run", "--continue-from", cfg.run_dir]) == 2
    assert "needs --run-dir" in capsys.readouterr().err
    assert main(["identify", "--if-drift", "--run-dir", cfg.run_dir]) == 2
    assert "no monitor round yet" in capsys.readouterr().err


@pytest.mark.slow  # ~3 min: a monitor round, a continued round, feature identification again
def test_igds_round_loop_flags_drift_and_identify_if_drift_feeds_the_next_round(ran, tmp_path, capsys):
    """`igds round` on a root whose round-1 is the shared run, after an off-task file landed: the monitor flags
    drift (exit 3), `identify --if-drift` keeps the features (they still pass recall), and round 2 runs, scoring
    and selecting, but keeps round 1's model (`rounds.on_drift: keep`). Then, as if the monitor round had found a feature failing recall, `identify --if-drift`
    re-identifies into round-1/monitor/identify-round-1/ and a next round's features come from there."""
    import dataclasses
    import shutil

    import yaml

    from igds_ray import rounds
    from igds_ray.cli import main

    cfg, _ = ran
    root = tmp_path / "rounds"
    root.mkdir()
    run1, pool = _round_copy(cfg, root)  # round-1 as `igds round` leaves it: report and rounds.json written
    shutil.move(str(pool), str(tmp_path / "pool"))
    pool = tmp_path / "pool"
    assert rounds.finished(str(run1))
    conf = json.loads((run1 / "config.json").read_text())
    conf["monitor"] = {**conf.get("monitor", {}), "limit": 12}
    (run1 / "config.json").write_text(json.dumps(conf))
    off = [r for r in make_rows(600, seed=22) if r["prompt"].startswith("Tell me about")]
    _add_file(tmp_path, pool, "part-101.parquet", off[:100])
    before = json.loads((run1 / "features" / "arms.json").read_text())["igds"]
    yml = tmp_path / "run.yaml"
    yml.write_text(yaml.safe_dump({**{k: v for k, v in conf.items() if k not in ("run_dir", "rounds")},
                                   "arms": ["igds"], "run_dir": str(root / "round-1")}))
    assert main(["round", "--config", str(yml), "--root", str(root), "--pool", str(pool)]) == 3
    out = capsys.readouterr().out
    mon = json.loads((run1 / "monitor" / "round-1.json").read_text())
    assert mon["drift"] and mon["new_rows"] == 100 and all(r["passes"] for r in mon["recall"].values())
    assert "features kept" in out and out.strip().splitlines()[-1].startswith("round 2: pool 300 rows, forwarded 100")
    run2 = root / "round-2"
    assert json.loads((run2 / "features" / "arms.json").read_text())["igds"] == before
    line = json.loads((run2 / "rounds.json").read_text())[-1]
    assert (line["round"], line["forwarded_rows"], line["pool_rows"]) == (2, 100, 300)
    ft = json.loads((run2 / "models" / "igds" / "_SUCCESS").read_text())  # rounds.on_drift: keep (the default)
    assert ft["kept_from"] == str(run1 / "models" / "igds") and ft["reason"] == "rounds.keep_models"
    assert "drift and rounds.on_drift=keep" in out and line["arms"]["igds"]["kept_previous"] is True

    # The monitor round as it reads when a chosen feature stops passing recall (e.g. the task set was refreshed).
    mon["recall"][before[0]]["passes"] = False
    (run1 / "monitor" / "round-1.json").write_text(json.dumps(mon))
    assert main(["identify", "--if-drift", "--run-dir", str(run1)]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["reidentified"] and res["failing"] == [before[0]] and res["dir"].endswith("identify-round-1")
    new = json.loads((run1 / "monitor" / "identify-round-1" / "features" / "features.json").read_text())["features"]
    assert res["features"] == new
    nxt = dataclasses.replace(cfg, run_dir=str(root / "round-x"), arms=("igds",),
                              rounds=rounds.RoundsConfig(continue_from=str(run1)))
    assert rounds.inherit_features(nxt, rounds.previous_config(str(run1)))["igds"] == new
    assert json.loads((root / "round-x" / "features" / "inherited.json").read_text())["reidentified"] is True
