"""Contrastive latents (the igds_response arm): AUROC math by hand, then the stage on real Ray with a
tiny Llama + SAE in which one latent is planted to fire on the token the 'correct' answers contain."""

from __future__ import annotations

import json
import random

import numpy as np
import pandas as pd
import pytest
import torch
from sae_lens import SAE
from scipy.stats import mannwhitneyu
from transformers import AutoModelForCausalLM, AutoTokenizer

from igds_ray.config import ConfigError, IdentifyConfig, from_dict
from igds_ray.demo.tiny import _WORDS, build_planted_world
from igds_ray.models.runner import capture_block_output
from igds_ray.stages import contrast
from igds_ray.stages.contrast_stats import auroc, average_ranks, bootstrap_auroc_ci, label_answers, split_halves
from igds_ray.tasks import FunctionTask, TaskDataError, register_task, unregister_task

WORD = "after"  # the planted world's random model answers "... after after" to about a quarter of its prompts
DETECTOR = 20  # the latent planted to fire on the token " after" and nowhere else


# ---------------------------------------------------------------------------------------------
# the math, by hand


def test_auroc_equals_a_hand_computation_with_ties():
    scores = [0.1, 0.4, 0.4, 0.8, 0.4, 0.1]
    positive = [False, True, False, True, True, False]
    # positives 0.4, 0.8, 0.4 against negatives 0.1, 0.4, 0.1: pairs won 2 + 3 + 2, tied 1 + 0 + 1, of 9.
    assert auroc(scores, positive) == pytest.approx(8 / 9)
    np.testing.assert_allclose(average_ranks(scores), [1.5, 4, 4, 6, 4, 1.5])
    cols = np.array([scores, [-s for s in scores], [0.0] * 6]).T
    np.testing.assert_allclose(auroc(cols, positive), [8 / 9, 1 / 9, 0.5])
    with pytest.raises(ValueError, match="both classes; got 0 positive and 6 negative"):
        auroc(scores, [False] * 6)


def test_auroc_matches_mann_whitney_on_random_ties():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, size=(40, 30)).astype(float)
    y = rng.random(40) < 0.4
    ref = [mannwhitneyu(x[y, j], x[~y, j]).statistic / (y.sum() * (~y).sum()) for j in range(30)]
    np.testing.assert_allclose(auroc(x, y), ref, rtol=1e-12)


def test_label_auroc_skips_null_labels_and_counts_unscored_rows():
    res = contrast.label_auroc([0.9, 0.2, None, 0.5, 0.7, 0.1, float("nan")],
                               [True, False, True, None, True, False, False])
    # Scored, labelled: correct 0.9, 0.7; wrong 0.2, 0.1 -> every pair won.
    assert res == {"auroc": 1.0, "n_correct": 2, "n_wrong": 2, "n_unscored": 2}
    assert contrast.label_auroc([0.3, 0.4], [True, None])["auroc"] is None


def _scores_dir(tmp_path, score, src_row, name="scores"):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from igds_ray.storage import StageDir

    d = StageDir(str(tmp_path / name))
    staging = d.begin()
    for k in range(0, len(score), 700):  # several parts, rows of two pool files in each
        rows = np.asarray(src_row[k:k + 700])
        pq.write_table(pa.table({"score": pa.array(score[k:k + 700], pa.float64()),
                                 "src_file": [f"part-{r % 2}.parquet" for r in rows], "src_row": rows // 2}),
                       f"{staging}/part-{k}.parquet")
    d.commit(staging, {"rows": len(score)})
    return d.uri


def test_histogram_auroc_is_the_exact_auroc_within_its_stated_bound(tmp_path):
    """The report's label AUROC (bounded memory: per-class histograms, rows joined by src_file/src_row)
    against `label_auroc` on the same rows held in memory."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from igds_ray.labels import PoolColumn, histogram_auroc

    rng = np.random.default_rng(3)
    n = 3000
    correct = [None if rng.random() < 0.1 else bool(rng.random() < 0.4) for _ in range(n)]
    pool = tmp_path / "pool"
    pool.mkdir()
    for f in range(2):  # pool row i is row i // 2 of file i % 2
        pq.write_table(pa.table({"correct": pa.array(correct[f::2], pa.bool_())}), pool / f"part-{f}.parquet")
    y = np.array([c is True for c in correct])
    continuous = rng.normal(size=n) + 0.8 * y
    tied = np.round(continuous)  # a handful of values: every bin holds one, so the figure is exact
    for values, exact_bound in ((continuous, False), (tied, True)):
        score = [None if i % 97 == 0 else float(v) for i, v in enumerate(values)]
        order = rng.permutation(n)  # the stage's rows in any order
        d = _scores_dir(tmp_path, [score[i] for i in order], order, name=f"s{int(exact_bound)}")
        want = contrast.label_auroc(score, correct)
        for bins in (1 << 20, 64):
            got = histogram_auroc(d, PoolColumn(str(pool), "correct", "report.correct_column"), bins=bins)
            assert {k: got[k] for k in ("n_correct", "n_wrong", "n_unscored")} == \
                {k: want[k] for k in ("n_correct", "n_wrong", "n_unscored")}
            assert abs(got["auroc"] - want["auroc"]) <= got["auroc_max_error"] + 1e-12
            if exact_bound:
                assert got["auroc_max_error"] == 0.0 and got["auroc"] == pytest.approx(want["auroc"], abs=1e-12)
        assert got["auroc_max_error"] > 0 or exact_bound  # 64 bins over continuous scores do mix values


def test_histogram_auroc_reads_a_pool_file_whose_label_column_holds_no_value(tmp_path):
    """A grown pool's new file of off-task rows only has an all-null `correct` column, which pyarrow types `null`:
    its rows count as neither correct nor wrong (it raised ArrowInvalid before)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from igds_ray.labels import PoolColumn, histogram_auroc

    pool = tmp_path / "pool"
    pool.mkdir()
    correct = [True, False, True, False, None, None, None, None]
    pq.write_table(pa.table({"correct": pa.array(correct[0::2], pa.bool_())}), pool / "part-0.parquet")
    pq.write_table(pa.table({"correct": pa.array([None] * 4)}), pool / "part-1.parquet")  # type null
    assert pq.read_schema(pool / "part-1.parquet").field("correct").type == pa.null()
    # pool row i is row i // 2 of file i % 2: rows 0, 2, 4, 6 in part-0 (True, True, None, None), odd ones null
    score = [0.9, 0.1, 0.8, 0.2, 0.5, 0.5, 0.5, 0.5]
    d = _scores_dir(tmp_path, score, np.arange(8), name="nulls")
    got = histogram_auroc(d, PoolColumn(str(pool), "correct", "report.correct_column"))
    want = contrast.label_auroc(score, [True, None, True, None, None, None, None, None])
    assert (got["n_correct"], got["n_wrong"]) == (want["n_correct"], want["n_wrong"]) == (2, 0)


def test_labels_split_and_bootstrap():
    correct, rule = label_answers(np.array([1.0, 0.0, 1.0, 0.0]))
    assert correct.tolist() == [True, False, True, False] and rule.startswith("0/1 metric")
    correct, rule = label_answers(np.array([0.2, 0.5, 0.9, 0.5, 0.1]))
    assert correct.tolist() == [False, False, True, False, False] and "median 0.5" in rule
    y = np.array([True] * 7 + [False] * 10)
    a, b = split_halves(y, seed=3)
    assert sorted(np.r_[a, b].tolist()) == list(range(17))
    assert (y[a].sum(), (~y[a]).sum(), y[b].sum(), (~y[b]).sum()) == (4, 5, 3, 5)
    assert np.array_equal(split_halves(y, seed=3)[0], a) and not np.array_equal(split_halves(y, seed=4)[0], a)
    s = np.c_[y.astype(float), np.random.default_rng(1).random(17)]
    low, high = bootstrap_auroc_ci(s, y, 300, 0.95, np.random.default_rng(0))
    assert low[0] == high[0] == 1.0  # perfectly separated in every resample
    assert low[1] <= auroc(s[:, 1], y) <= high[1] and high[1] - low[1] > 0.1


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="contrast.k must be >= 1"):
        contrast.ContrastConfig(k=0)
    with pytest.raises(ConfigError, match=r"contrast.candidates \(2\) < contrast.k \(3\)"):
        contrast.ContrastConfig(k=3, candidates=2)
    with pytest.raises(ConfigError, match="contrast.pooling"):
        from_dict(contrast.ContrastConfig, {"pooling": "last"}, prefix="contrast.")


# ---------------------------------------------------------------------------------------------
# the stage, on a planted world


def plant_detector(root, latent: int) -> None:
    """Make `latent` of the SAE fire on the token ' after' only: its encoder becomes a least-squares
    probe (hidden state at block 1 -> +1 on ' after', -1 elsewhere) fitted on random word strings."""
    tok = AutoTokenizer.from_pretrained(root / "model")
    model = AutoModelForCausalLM.from_pretrained(root / "model").eval()
    (word_id,) = tok(f" {WORD}", add_special_tokens=False).input_ids
    rng = random.Random(0)
    texts = [" ".join(rng.choice([*_WORDS, WORD, WORD, WORD]) for _ in range(12)) for _ in range(300)]
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad(), capture_block_output(model, 1) as store:
        model(**enc)
    mask = enc.attention_mask.bool()
    h = store[0][mask]
    y = torch.where(enc.input_ids[mask] == word_id, 1.0, -1.0)
    w = torch.linalg.lstsq(torch.cat([h, torch.ones(len(h), 1)], 1), y[:, None]).solution[:, 0]
    sae = SAE.load_from_disk(root / "sae")
    with torch.no_grad():
        sae.W_enc[:, latent] = w[:-1]
        sae.b_enc[latent] = w[-1]
    sae.save_model(root / "sae")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = build_planted_world(tmp_path_factory.mktemp("contrast"))
    plant_detector(root, DETECTOR)
    register_task("says_after", FunctionTask("says_after", None, lambda ans, ex: 1.0 if WORD in ans else 0.0),
                  overwrite=True)
    yield root
    unregister_task("says_after")


def cfg_for(root, run_dir, task="says_after", **kw) -> tuple[IdentifyConfig, contrast.ContrastConfig]:
    icfg = from_dict(IdentifyConfig, dict(
        model=str(root / "model"), sae=str(root / "sae"), run_dir=str(run_dir),
        task=dict(name=task, source=str(root / "task.parquet"), split=None, dev_split=None)))
    return icfg, contrast.ContrastConfig(**{**dict(dev_limit=120, max_new_tokens=6, bootstrap=300), **kw})


@pytest.fixture(scope="module")
def ran(world, ray_local, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    return run_dir, contrast.run(*cfg_for(world, run_dir))


def test_stage_finds_the_planted_latent_and_writes_its_files(world, ran):
    run_dir, res = ran
    assert res["features"] == [f"l1_p{DETECTOR}"] and res["selected_by"] == "heldout"
    d = res["details"][0]
    assert d["auroc_a"] == 1.0 and d["ci_low_b"] > 0.5 and d["rank_a"] == 0
    assert res["n_correct"] >= 10 and res["n_incorrect"] >= 10
    assert res["n_correct"] + res["n_incorrect"] == res["readable_answers"] == 120 - res["unreadable_answers"]
    assert res["label_rule"].startswith("0/1 metric") and res["positives"] == "answers"
    assert json.loads((run_dir / "features" / "contrast.json").read_text()) == res
    table = pd.read_parquet(run_dir / "features" / "contrast.parquet")
    assert list(table.columns) == list(contrast.CONTRAST_COLUMNS) and len(table) == 64
    assert table["candidate"].sum() == 20 and table.loc[table["candidate"], "auroc_b"].notna().all()
    assert table.loc[~table["candidate"], "auroc_b"].isna().all()
    assert table.loc[table["chosen"], "index"].tolist() == [DETECTOR]
    assert sorted(table["rank_a"]) == list(range(64))
    answers = pd.read_parquet(run_dir / "features" / "contrast_answers.parquet")
    assert len(answers) == 120 and answers["correct"].sum() == res["n_correct"]
    assert (answers["correct"] == answers["answer"].str.contains(WORD)).all()
    assert answers["half"].value_counts().to_dict() == {
        "A": sum(res["n_a"].values()), "B": sum(res["n_b"].values())}


def test_auroc_on_half_a_equals_a_direct_encode(world, ran):
    """Pool every latent over the answer tokens outside Ray, from the saved answers, and recompute."""
    run_dir, _ = ran
    answers = pd.read_parquet(run_dir / "features" / "contrast_answers.parquet")
    a = answers[answers["half"] == "A"]
    tok = AutoTokenizer.from_pretrained(world / "model")
    model = AutoModelForCausalLM.from_pretrained(world / "model").eval()
    sae = SAE.load_from_disk(world / "sae")
    pooled = []
    for prompt, answer in zip(a["prompt"], a["answer"]):
        p = tok(prompt).input_ids
        r = tok(answer, add_special_tokens=False).input_ids
        with torch.no_grad(), capture_block_output(model, 1) as store:
            model(torch.tensor([p + r]))
            pooled.append(sae.encode(store[0][0, len(p):]).max(0).values.numpy())
    pooled = np.stack(pooled)
    y = a["correct"].to_numpy(bool)
    table = pd.read_parquet(run_dir / "features" / "contrast.parquet").set_index("index")
    ref = [mannwhitneyu(pooled[y, j], pooled[~y, j]).statistic / (y.sum() * (~y).sum()) for j in range(64)]
    np.testing.assert_allclose(table["auroc_a"].to_numpy(), ref, atol=1e-9)
    np.testing.assert_allclose(table["mean_correct_a"], pooled[y].mean(0), rtol=1e-4, atol=1e-6)


def test_same_seed_same_result_and_a_finished_stage_is_skipped(world, ran, tmp_path):
    run_dir, res = ran
    again = contrast.run(*cfg_for(world, run_dir))
    assert again["wall_s"] == res["wall_s"]  # read back, not recomputed
    other = contrast.run(*cfg_for(world, tmp_path))
    timing = ("model_load_s", "gen_s", "encode_s", "wall_s")
    assert {k: v for k, v in other.items() if k not in timing} == {k: v for k, v in res.items() if k not in timing}
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "features" / "contrast.parquet"),
                                  pd.read_parquet(run_dir / "features" / "contrast.parquet"))


def test_too_few_labels_is_a_clear_stop(world, ray_local, tmp_path):
    with pytest.raises(TaskDataError, match=r"contrast.min_each=100 .* are \d+ correct and \d+ incorrect.*"
                                            r"contrast.positives: references"):
        contrast.run(*cfg_for(world, tmp_path, min_each=100, positives="answers"))
    with pytest.raises(TaskDataError, match=r"positives: references\) needs at least contrast.min_each=100"):
        contrast.run(*cfg_for(world, tmp_path, min_each=100))  # auto: too few correct -> references -> too few wrong
    assert not (tmp_path / "features" / "contrast.json").exists()


def test_a_base_with_too_few_right_answers_is_contrasted_with_the_references(world, ran, tmp_path):
    """auto, with fewer correct answers than min_each: the dev references (which hold the word the
    planted latent reads) are the positives and the base's wrong answers the negatives, split by example."""
    _, first = ran
    n_c, n_i = first["n_correct"], first["n_incorrect"]
    assert n_c + 1 <= n_i
    register_task("says_after_ref", FunctionTask("says_after_ref", None, lambda a, ex: 1.0 if WORD in a else 0.0,
                                                 reference_fn=lambda ex: f"the {WORD} one"), overwrite=True)
    try:
        res = contrast.run(*cfg_for(world, tmp_path, task="says_after_ref", min_each=n_c + 1))
    finally:
        unregister_task("says_after_ref")
    assert res["positives"] == "references" and "auto" in res["positives_rule"]
    assert (res["n_correct"], res["n_incorrect"]) == (n_c, n_i)  # the same base, the same greedy answers
    assert res["features"] == [f"l1_p{DETECTOR}"] and res["selected_by"] == "heldout"
    assert res["details"][0]["auroc_a"] == 1.0
    answers = pd.read_parquet(tmp_path / "features" / "contrast_answers.parquet")
    assert res["n_positive"] == answers["reference_used"].sum() == 120
    assert res["n_negative"] == answers["answer_used"].sum() == n_i
    assert (answers["answer_used"] == (answers["correct"] == False)).all()  # noqa: E712
    assert (answers["reference"] == f"the {WORD} one").all()
    # one half per example: its reference and its wrong answer are read on the same side
    assert answers["half"].notna().all() and set(answers["half"]) == {"A", "B"}
    assert sum(res["n_a"].values()) + sum(res["n_b"].values()) == 120 + n_i
    for h, n in (("A", res["n_a"]), ("B", res["n_b"])):
        part = answers[answers["half"] == h]
        assert n == {"correct": len(part), "incorrect": int(part["answer_used"].sum())}


# ---------------------------------------------------------------------------------------------
# the arm in the pipeline, and the report's AUROC on the pool's own labels


def test_igds_response_arm_scores_responses_and_tells_correct_from_wrong(world, ran, tmp_path):
    from igds_ray import pipeline

    run_dir, res = ran
    prompts = pd.read_parquet(world / "task.parquet")["source"].tolist()[:90]
    kinds = [(f" {WORD} {WORD} it", True), (" the cat sat", False), (" tree river", None)]
    pool = pd.DataFrame([{"prompt": p, "response": kinds[i % 3][0], "correct": kinds[i % 3][1]}
                         for i, p in enumerate(prompts)])
    (tmp_path / "pool").mkdir()
    pool.to_parquet(tmp_path / "pool" / "part-0.parquet")
    cfg = from_dict(pipeline.RunConfig, dict(
        model=str(world / "model"), sae=str(world / "sae"), run_dir=str(run_dir), pool=str(tmp_path / "pool"),
        task=dict(name="says_after", source=str(world / "task.parquet"), split=None, dev_split=None),
        arms=["igds_response"], score=dict(pooling="last", batch_size=100, max_tokens=128),
        contrast=dict(dev_limit=120, max_new_tokens=6, bootstrap=300), report=dict(correct_column="correct")))
    p = pipeline.Pipeline(cfg)
    feats = p.feature_sets()
    assert feats == {"igds_response": res["features"]}  # the finished contrast stage, read back
    assert not (run_dir / "features" / "recall.parquet").exists()  # igds_response alone needs no recall
    sel = p.selections(feats)
    # score.pooling is `last`, but this arm reads its latent over the responses (max).
    scores_dir = run_dir / "scores" / f"frs_{res['features'][0]}_max"
    assert json.loads((scores_dir / "_SUCCESS").read_text())["config"]["pooling"] == "max"
    chosen = set(pd.read_parquet(sel["igds_response"])["id"])
    assert len(chosen) == 45 and {f"part-0.parquet:{i}" for i in range(0, 90, 3)} <= chosen
    aucs = contrast.arm_label_aurocs(str(run_dir), ["igds_response"], str(tmp_path / "pool"), "correct")
    assert aucs == [{"scores": scores_dir.name, "arms": ["igds_response"], "auroc": 1.0, "n_correct": 30,
                     "n_wrong": 30, "n_unscored": 0, "auroc_max_error": 0.0}]
    with pytest.raises(ConfigError, match=r"column 'prompt' of pool file part-0.parquet is (large_)?string, not bool"):
        contrast.scores_label_auroc(str(scores_dir), str(tmp_path / "pool"), "prompt")
    # The report puts that AUROC next to each IGDS scores directory.
    from igds_ray import report

    (run_dir / "eval").mkdir(exist_ok=True)
    (run_dir / "eval" / "metrics.json").write_text(json.dumps(
        {"arms": {"igds_response": {"status": "ok", "metrics": {"metric": 0.5}}}, "features": res["features"]}))
    text = open(report.build(str(run_dir), pool=cfg.pool, correct_column="correct")).read()
    assert f"| {scores_dir.name} | igds_response | 1.000 | 30 | 30 |" in text
    assert json.loads((run_dir / "report" / "correct_auroc.json").read_text()) == aucs
