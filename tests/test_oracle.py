"""The oracle arm (a ceiling that reads the pool's labels) and the demo world's own P1/P2 check."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from igds_ray import schema as S
from igds_ray.baselines import LABEL_ARMS, oracle, select_config
from igds_ray.config import from_dict
from igds_ray.demo import world as W
from igds_ray.demo.calibrate import oracle_half
from igds_ray.errors import PoolError
from igds_ray.stages import select


def _pool(root, n=120, files=3, row_group_size=7):
    rows = [{"id": f"p{i:04d}", "prompt": f"Question {i}?\n", "response": f"answer {i}",
             "utility": [2, 1, 0][i % 3] if i % 11 else None} for i in range(n)]
    root.mkdir(parents=True)
    per = n // files
    for f in range(files):
        pq.write_table(pa.Table.from_pylist(rows[f * per:(f + 1) * per]), root / f"part-{f}.parquet",
                       row_group_size=row_group_size)
    return rows


def test_oracle_scores_are_the_labels_and_select_keeps_useful_rows_first(ray_local, tmp_path):
    rows = _pool(tmp_path / "pool")
    cfg = from_dict(oracle.OracleConfig, dict(pool=str(tmp_path / "pool"), out=str(tmp_path / "scores"), seed=3,
                                              batch_size=16))
    man = oracle.run(cfg)
    assert man["rows"] == len(rows)
    df = pd.concat(pd.read_parquet(f) for f in sorted((tmp_path / "scores").glob("*.parquet")))
    truth = {r["id"]: r["utility"] for r in rows}
    for _, r in df.iterrows():
        lab = truth[r[S.ID]]
        if lab is None:  # a null label cannot be ranked: kept as a row with an error, never dropped
            assert r[S.ERROR] == "label column 'utility' is null" and pd.isna(r[S.SCORE])
        else:
            assert r[oracle.LABEL] == lab and lab <= r[S.SCORE] < lab + 0.5
    sel = select.run(select_config("oracle", str(tmp_path / "scores"), str(tmp_path / "sel"), fraction=0.5))
    kept = pd.read_parquet(tmp_path / "sel" / "oracle.parquet")
    labels = [truth[i] for i in kept[S.ID]]
    n_useful = sum(v == 2 for v in truth.values())
    assert sel["rows"] == len(kept) and labels.count(2) == n_useful and 0 not in labels


def test_oracle_refuses_a_pool_without_the_label_column_before_compute(tmp_path):
    _pool(tmp_path / "pool")
    cfg = from_dict(oracle.OracleConfig, dict(pool=str(tmp_path / "pool"), out=str(tmp_path / "s"), column="quality"))
    with pytest.raises(PoolError, match="no label column 'quality'.*part-0.parquet|part-0.parquet.*'quality'"):
        oracle.run(cfg)
    assert not (tmp_path / "s").exists()


def test_world_labels_utility_and_the_oracle_half_takes_useful_then_neutral():
    mp, tp, sp = W.prompt_formats()
    held = W.math_sets(5, 50, 100, 100)[3]
    rows = W.pool_rows(5, 1000, mp, tp, sp, held)
    for r in rows:
        expect = (W.USEFUL if r["kind"] == "math_correct" else
                  W.HARMFUL if r["kind"] in ("math_wrong", "math_truncated") or r["correct"] is False else W.NEUTRAL)
        assert r["utility"] == expect, r
    assert set(W.VISIBILITY) == set(W.POOL_MIX) - {"math_correct"}  # every defect says whether it can be seen
    half = oracle_half(rows, 0.5, seed=1)
    assert len(half) == 500
    useful = sum(r["utility"] == W.USEFUL for r in rows)
    assert sum(r["utility"] == W.USEFUL for r in half) == useful
    assert not any(r["utility"] == W.HARMFUL for r in half)
    assert oracle_half(rows, 0.5, seed=1) == half and oracle_half(rows, 0.5, seed=2) != half
    assert "oracle" in LABEL_ARMS


def test_world_check_fine_tunes_and_reports_p1_p2_from_its_own_figures(world):
    """The in-process fine-tune moves the weights and lowers the loss; P1/P2 are what the margins say."""
    import torch
    from transformers import AutoModelForCausalLM

    from igds_ray.demo.calibrate import P1_MIN, P2_MIN, finetune_in_process, measure

    mp, tp, sp = W.prompt_formats()
    m_rec, m_dev, _, held = W.math_sets(0, 10, 16, 10)
    pool = W.pool_rows(0, 96, mp, tp, sp, held)
    before = AutoModelForCausalLM.from_pretrained(world.model_dir).state_dict()
    model, _, st = finetune_in_process(world.model_dir, pool, epochs=2, lr=3e-3, batch_size=16, max_tokens=64, seed=0)
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert st["steps"] == 2 * (96 // 16) and len(moved) > 0.9 * len(before)
    kw = dict(base_dev=0.25, epochs=1, lr=1e-3, batch_size=16, max_tokens=64, seeds=[0, 1], progress=False)
    out = measure(world.model_dir, pool, m_dev, workers=1, **kw)
    assert out["set"] == "dev" and out["n_dev"] == 16 and out["seeds"] == [0, 1]
    assert [t["rows"] for t in out["oracle_train"]] == [48, 48] and [t["seed"] for t in out["full_train"]] == [0, 1]
    for arm in ("full", "oracle"):  # decided on the mean over the fine-tuning seeds
        assert len(out[f"{arm}_seeds"]) == 2 and out[arm] == round(sum(out[f"{arm}_seeds"]) / 2, 4)
    assert out["p2_se2"] is not None and out["p2_se2"] >= 0
    margin = out["p2_oracle_minus_full"]
    assert margin == round(out["oracle"] - out["full"], 4) and out["p1"] == (out["full"] - 0.25 >= P1_MIN)
    assert out["p2"] == (margin >= P2_MIN and margin - out["p2_se2"] > 0)
    # Two worker processes of one torch thread each give the same figures as one process in turn.
    par = measure(world.model_dir, pool, m_dev, workers=2, **kw)
    assert {k: par[k] for k in ("full_seeds", "oracle_seeds")} == {k: out[k] for k in ("full_seeds", "oracle_seeds")}


def test_wrong_share_moves_rows_between_wrong_math_and_off_task_only():
    mp, tp, sp = W.prompt_formats()
    held = W.math_sets(5, 50, 100, 100)[3]
    n = 1000
    kinds = [{k: sum(r["kind"] == k for r in W.pool_rows(5, n, mp, tp, sp, held, wrong_share=ws)) for k in W.POOL_MIX}
             for ws in (None, 0.25)]
    assert kinds[1]["math_wrong"] == 250 and kinds[0]["math_wrong"] == round(W.POOL_MIX["math_wrong"] * n)
    off = [sum(k[o] for o in W.OFF_TASK) for k in kinds]
    assert abs((off[0] - off[1]) - (250 - kinds[0]["math_wrong"])) <= 2
    for k in set(W.POOL_MIX) - set(W.OFF_TASK) - {"math_wrong"}:
        assert abs(kinds[0][k] - kinds[1][k]) <= 2, k  # correct math and look-alikes stay (rounding aside)
    with pytest.raises(ValueError, match="wrong_share"):
        W.pool_rows(5, n, mp, tp, sp, held, wrong_share=0.45)


def test_report_verdict_treats_the_oracle_as_a_ceiling_not_a_baseline():
    from igds_ray.report import verdicts

    def rows(**m):
        return [{"arm": a, "metric": v, "status": "ok"} for a, v in m.items()]

    out = "\n".join(verdicts(rows(base=0.1, full=0.3, igds=0.35, random=0.2, oracle=0.4)))
    assert "**igds** (0.3500) beats full, random." in out  # the oracle is never a baseline to beat
    assert "Ceiling **oracle**" in out and "igds closes 50% of the gap from full to it" in out
    out = "\n".join(verdicts(rows(base=0.1, full=0.3, igds=0.2, oracle=0.25)))
    assert "closes" not in out and "it does not beat full (0.3000)" in out


def test_operation_errors_are_the_other_operation_worked_right():
    import re

    mp, tp, sp = W.prompt_formats()
    held = W.math_sets(5, 50, 100, 100)[3]
    rows = W.pool_rows(5, 600, mp, tp, sp, held, wrong_answers="operation")
    default = W.pool_rows(5, 600, mp, tp, sp, held)
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in default]  # same problems, other answers
    wrong = [r for r in rows if r["kind"] == "math_wrong"]
    assert len(wrong) == 90
    for r in wrong:
        a, op, b, c = re.fullmatch(r"(\d+) ([+-]) (\d+) = (\d+)\n#### \4", r["response"]).groups()
        assert int(c) == (int(a) + int(b) if op == "+" else int(a) - int(b)) >= 0
        asked_plus = "more" in r["prompt"] or "in all" in r["prompt"]  # W.ADD_TEMPLATES; the others subtract
        assert (op == "+") != asked_plus and r["correct"] is False and r["utility"] == W.HARMFUL
    dups = [r for r in rows if r["kind"] == "math_near_duplicate" and r["correct"] is False]
    assert dups and all(any(d["response"] == w["response"] for w in wrong) for d in dups)
