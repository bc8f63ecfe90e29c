"""The demo world's data (no training here, except the slow rounds test: the quick demo itself runs in
tests/test_job_submit.py)."""

from __future__ import annotations

import json
import re

import pytest

from igds_ray.demo import world as W


@pytest.fixture(scope="module")
def sets():
    mp, tp, sp = W.prompt_formats()
    m = W.math_sets(3, 100, 300, 200)
    t = W.translation_sets(3, 50, 100, 100)
    s = W.summarization_sets(3, 50, 100, 100)
    held = m[3] | t[3] | s[3]
    rows = W.pool_rows(3, 3000, mp, tp, sp, held)
    return m, t, s, held, rows


def _answer(text: str) -> int:
    return int(text.rsplit("####", 1)[1])


def test_pool_is_deterministic_and_composed_as_specified(sets):
    *_, held, rows = sets
    mp, tp, sp = W.prompt_formats()
    again = W.pool_rows(3, 3000, mp, tp, sp, held)
    assert rows == again
    assert rows != W.pool_rows(4, 3000, mp, tp, sp, held)
    kinds = {k: sum(r["kind"] == k for r in rows) for k in W.POOL_MIX}
    for k, f in W.POOL_MIX.items():
        assert abs(kinds[k] - f * 3000) <= 1, (k, kinds[k])
    assert len(rows) == 3000 and len({r["id"] for r in rows}) == 3000


def test_no_dev_or_test_source_leaks_into_the_pool(sets):
    (m_rec, m_dev, m_test, _), (t_rec, t_dev, t_test, _), (s_rec, s_dev, s_test, _), held, rows = sets
    mp, tp, sp = W.prompt_formats()
    prompts = {r["prompt"] for r in rows}
    assert not prompts & {mp(r["question"]) for r in m_dev + m_test + m_rec}
    assert not prompts & {tp(r["source"]) for r in t_dev + t_test + t_rec}
    assert not prompts & {sp(r["article"]) for r in s_dev + s_test + s_rec}
    # recall/dev/test are disjoint among themselves
    for a, b in ((m_rec, m_dev), (m_dev, m_test), (m_rec, m_test)):
        assert not {r["question"] for r in a} & {r["question"] for r in b}


def test_row_labels_tell_the_truth(sets):
    *_, rows = sets
    for r in rows:
        q = r["prompt"]
        if r["kind"] in ("math_correct", "math_wrong", "math_near_duplicate"):
            a, op, b, c = re.fullmatch(r"(\d+) ([+-]) (\d+) = (\d+)\n#### \d+", r["response"]).groups()
            true = int(a) + int(b) if op == "+" else int(a) - int(b)
            assert re.search(rf"\b{a}\b", q) and re.search(rf"\b{b}\b", q)
            assert (int(c) == true) == r["correct"], r
            assert _answer(r["response"]) == int(c) and int(c) >= 0
        elif r["kind"] == "math_truncated":
            assert "####" not in r["response"] and r["response"].endswith("=") and r["correct"] is None
        else:
            assert r["correct"] is None
    wrong = [r for r in rows if r["kind"] == "math_wrong"]
    assert wrong and not any(r["correct"] for r in wrong)


def test_task_references_are_scored_correct_by_the_tasks(sets):
    from igds_ray.tasks import get_task
    from igds_ray.tasks.base import TaskExample

    (_, m_dev, _, _), (_, t_dev, _, _), (_, s_dev, _, _), _, _ = sets
    math = get_task("math")
    for r in m_dev[:50]:
        ex = TaskExample(id=r["id"], source=r["question"], reference=r["answer"])
        assert math.score_answer(math.extract(r["answer"]), ex) == 1.0
    tr = W.translation_pair(__import__("random").Random(0))
    assert tr[1].startswith("le ") and len(tr[0].split()) == len(tr[1].split())
    assert all(r["summary"] == r["article"].split(". ")[0] + "." for r in s_dev)


def test_seeds_table_statistics():
    from igds_ray.demo.run import render_seeds, seeds_table

    runs = [{"metrics": {"base": 0.3, "full": 0.5, "igds": 0.6}, "features": ["l2_p1"]},
            {"metrics": {"base": 0.3, "full": 0.7, "igds": 0.62}, "features": ["l2_p1"]},
            {"metrics": {"base": 0.3, "full": 0.6, "igds": 0.64}, "features": ["l2_p1"]}]
    table = {r["arm"]: r for r in seeds_table(runs)}
    assert table["igds"]["mean"] == pytest.approx(0.62) and table["igds"]["std"] == pytest.approx(0.02)
    assert table["full"]["std"] == pytest.approx(0.1) and table["igds"]["d_full"] == pytest.approx(0.02)
    assert table["igds"]["d_base"] == pytest.approx(0.32)
    text = render_seeds({"table": seeds_table(runs), "runs": runs})
    # Paired over seeds: igds - full = 0.10, -0.08, 0.04 (mean 0.02, SE 0.0917/sqrt 3 = 0.0529): a tie;
    # igds - base = 0.30, 0.32, 0.34 (SE 0.0115): a win.
    assert "igds ties with full: +0.0200 (±2 SE 0.1058)" in text and "igds beats base: +0.3200" in text
    assert table["full"]["se2"] == pytest.approx(2 * 0.1 / 3 ** 0.5)
    runs[0]["metrics"]["oracle"] = 0.9
    assert "oracle (ceiling: reads the pool's labels)" in render_seeds({"table": seeds_table(runs), "runs": runs})
    assert text.startswith("# Demo over 3 seeds (math test accuracy;")
    dev = render_seeds({"table": seeds_table(runs), "runs": runs, "eval_set": "DEV"})  # benchmarks/dev_arms.py
    assert dev.startswith("# Demo over 3 seeds (math DEV accuracy;")


def test_demo_config_is_a_valid_run_config(tmp_path):
    from igds_ray.demo.run import ABLATION_ARMS, ALL_ARMS, DEFAULT_ARMS, PAPER_ARMS, QUICK_ARMS, demo_config

    world = W.world_at(tmp_path, W.WorldSpec(), {})
    full = demo_config(world, str(tmp_path / "run"))
    quick = demo_config(world, str(tmp_path / "run"), quick=True, seed=2)
    assert tuple(full.arms) == DEFAULT_ARMS and tuple(quick.arms) == QUICK_ARMS and quick.seed == 2
    assert "oracle" in DEFAULT_ARMS and "oracle" in QUICK_ARMS and not set(ABLATION_ARMS) & set(DEFAULT_ARMS)
    assert tuple(demo_config(world, str(tmp_path / "run"), arms=("all",)).arms) == ALL_ARMS
    paper = tuple(demo_config(world, str(tmp_path / "run"), arms=("paper",)).arms)
    assert paper == PAPER_ARMS and set(DEFAULT_ARMS) < set(paper) and {"loss", "ifd", "zip"} <= set(paper) - set(DEFAULT_ARMS)
    assert not set(ABLATION_ARMS) & set(paper) and set(paper) | set(ABLATION_ARMS) == set(ALL_ARMS)
    assert full.baselines["oracle"] == {"column": "utility"}
    # The pipeline fine-tunes with the settings the world's P1/P2 check used.
    spec = W.WorldSpec()
    assert (full.finetune["epochs"], full.finetune["lr"], full.finetune["batch_size"]) == (
        spec.ft_epochs, spec.ft_lr, spec.ft_batch)
    assert W.WorldSpec(seed=1).key() != W.WorldSpec().key()
    assert full.evaluate.template == full.causal.template == 1  # the template the pool's prompts use
    assert full.report.label_column == "kind" and full.pool.id_column == "id"
    assert W.WorldSpec().key() != W.WorldSpec.quick().key() and W.WorldSpec().key() == W.WorldSpec().key()


def test_report_composition_counts_each_arms_labels_by_pool_row(tmp_path):
    """The report's label table: shares by id, from a real Parquet pool and committed selections."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from igds_ray.config import PoolConfig
    from igds_ray.errors import ConfigError
    from igds_ray.report import composition
    from igds_ray.storage import StageDir

    pool_dir = tmp_path / "pool"
    pool_dir.mkdir()
    kinds = ["good"] * 6 + ["bad"] * 3 + ["other"]
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(10)], "kind": kinds}), pool_dir / "part-0.parquet")
    run = tmp_path / "run"
    # rows matched by (src_file, src_row); row 10 is not in the pool
    for arm, rows in (("a", [0, 1, 2, 6]), ("b", [7, 8, 9, 10])):
        d = StageDir(str(run / "selection" / f"{arm}.parquet"))
        staging = d.begin()
        pq.write_table(pa.table({"id": [f"r{i}" for i in rows], "src_file": ["part-0.parquet"] * 4, "src_row": rows}),
                       f"{staging}/part.parquet")
        d.commit(staging, {"rows": len(rows)})
    pool = PoolConfig(path=str(pool_dir))
    comp = composition(str(run), ["a", "b", "missing"], pool, "kind")
    assert comp["pool"] == pytest.approx({"good": 0.6, "bad": 0.3, "other": 0.1})
    assert comp["a"] == pytest.approx({"good": 0.75, "bad": 0.25})
    assert comp["b"] == pytest.approx({"bad": 0.5, "other": 0.25, "(not a pool row)": 0.25})
    assert "missing" not in comp
    with pytest.raises(ConfigError, match="report.label_column: pool file part-0.parquet has no column 'quality'"):
        composition(str(run), ["a"], pool, "quality")


@pytest.mark.slow  # ~4 min: the quick world, then three rounds
def test_demo_rounds_forward_only_each_rounds_new_rows_and_flag_the_off_task_file(tmp_path, capsys):
    """`igds demo --quick --rounds 3`: round 1 on the world's pool; a new file lands before rounds 2 and 3 (the
    last one off-task); each later round forwards exactly its new rows, the off-task round is flagged as drift,
    and a second call keeps the finished rounds."""
    from igds_ray.cli import main

    run = tmp_path / "demo"
    assert main(["demo", "--quick", "--rounds", "3", "--new-rows", "200", "--run-dir", str(run)]) == 0
    out = capsys.readouterr().out
    res = json.loads((run / "rounds-demo.json").read_text())["rounds"]
    assert [r["round"] for r in res] == [1, 2, 3]
    assert [r["forwarded_rows"] for r in res] == [800, 200, 200] and [r["pool_rows"] for r in res] == [800, 1000, 1200]
    assert [r["drift"] for r in res] == [False, False, True]
    assert res[2]["monitor"]["new_rows"] == 200 and res[2]["monitor"]["psi"] > res[1]["monitor"]["psi"]
    assert "new off-task pool rows in new-003.parquet" in out and "## Rounds (continuous selection)" in out
    for r in res[1:]:
        for arm in ("igds", "random"):
            assert r["arms"][arm]["previous_metric"] is not None
    assert main(["demo", "--quick", "--rounds", "3", "--new-rows", "200", "--run-dir", str(run)]) == 0
    assert capsys.readouterr().out.count("(done before)") == 3
