"""The causal filter's statistics (pure numpy): exact values computed by hand, seeded resampling."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from igds_ray.stages import causal_stats as st


def test_bootstrap_ci_covers_the_true_mean_and_is_deterministic():
    rng = np.random.default_rng(0)
    covered = 0
    for i in range(200):
        d = rng.normal(0.3, 1.0, size=40)
        lo, hi = st.bootstrap_ci(d, 1000, st.rng_for(7, f"s{i}"))
        assert lo < d.mean() < hi
        covered += lo <= 0.3 <= hi
    # A 95% percentile interval on n=40 covers a little less than 95% of the time; 200 draws.
    assert 0.88 <= covered / 200 <= 0.99
    d = rng.normal(0.3, 1.0, size=40)
    assert st.bootstrap_ci(d, 500, st.rng_for(1, "k")) == st.bootstrap_ci(d, 500, st.rng_for(1, "k"))
    assert st.bootstrap_ci(d, 500, st.rng_for(1, "k")) != st.bootstrap_ci(d, 500, st.rng_for(2, "k"))


def test_mcnemar_exact_equals_the_binomial_tail_by_hand():
    # 7 examples went 0 -> 1, 1 went 1 -> 0, 4 unchanged: P(X >= 7 | X ~ Bin(8, 1/2)) = (8 + 1) / 256.
    base = [0] * 7 + [1] + [0, 0, 1, 1]
    treated = [1] * 7 + [0] + [0, 0, 1, 1]
    assert st.mcnemar_one_sided(base, treated) == 9 / 256
    # 3 up, 3 down: P(X >= 3 | Bin(6, 1/2)) = (20 + 15 + 6 + 1) / 64.
    assert st.mcnemar_one_sided([0, 0, 0, 1, 1, 1], [1, 1, 1, 0, 0, 0]) == 42 / 64
    assert st.mcnemar_one_sided([0, 1, 1], [0, 1, 1]) == 1.0  # no discordant pair: no evidence
    r = st.paired(base, treated, 200, 0, "x")
    assert r.test == st.MCNEMAR and r.p == 9 / 256 and r.delta == pytest.approx(6 / 12) and r.n == 12


def test_sign_flip_exact_by_hand_and_permutation_floor():
    # |d| = 1, 2, 0.5, 3 with observed sum 5.5: a flipped set S gives 6.5 - 2*sum(S) >= 5.5 only for
    # S = {} and S = {0.5}: p = 2/16. Zeros cannot flip and change nothing.
    p, test = st.sign_flip_one_sided([1, 2, -0.5, 3, 0, 0], 100, st.rng_for(0, "a"))
    assert (p, test) == (2 / 16, st.SIGN_FLIP_EXACT)
    # 30 positive differences: only the observed pattern reaches the observed sum (chance 2**-30 per draw).
    p, test = st.sign_flip_one_sided(np.linspace(0.1, 1, 30), 999, st.rng_for(0, "b"))
    assert (p, test) == (1 / 1000, st.SIGN_FLIP_PERM)
    assert st.sign_flip_one_sided([0, 0], 100, st.rng_for(0, "c"))[0] == 1.0
    r = st.paired([0.2, 0.5, 0.1, 0.0], [0.3, 0.7, 0.05, 0.0], 300, 0, "cont")
    assert r.test == st.SIGN_FLIP_EXACT and r.p == 2 / 8  # S = {} or {0.05} of |d| = .1, .2, .05


def test_holm_on_a_known_vector():
    # Sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> max so far 0.06.
    assert st.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    out = st.holm([0.01, float("nan"), 0.04])  # a failed trial is not in the family (m = 2)
    assert out[0] == pytest.approx(0.02) and math.isnan(out[1]) and out[2] == pytest.approx(0.04)
    assert st.holm([0.5, 0.9]) == [1.0, 1.0]


def test_paired_leaves_out_nan_pairs_and_refuses_unpaired_runs():
    r = st.paired([-1.0, float("nan"), -2.0], [-0.5, -1.0, -1.0], 200, 0, "ll")
    assert r.n == 2 and r.delta == pytest.approx(0.75)
    with pytest.raises(ValueError, match="must share examples"):
        st.paired([0, 1], [0, 1, 1], 200, 0, "l1_p3")


def test_spearman():
    assert st.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert st.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # Average ranks of ties: x -> 0, 1.5, 1.5, 3 and y -> 0, 2.5, 2.5, 1; centred, cov 1.5 and both var 4.5.
    assert st.spearman([1, 2, 2, 3], [1, 3, 3, 2]) == pytest.approx(1 / 3)
    assert np.isnan(st.spearman([1, 1, 1], [1, 2, 3]))


def test_noise_floor_takes_the_worst_case_when_runs_disagree():
    a = {"metric": 0.5, "loglik": -1.0, "scores": [1, 0, 1, 0], "logliks": [-1.0, -1.0, -1.0, -1.0]}
    base, floor = st.noise_floor([a, dict(a)])
    assert base["scores"] == a["scores"] and not floor["base_is_worst_case"] and floor["examples_disagreeing"] == 0
    b = {"metric": 0.75, "loglik": -0.9, "scores": [1, 1, 1, 0], "logliks": [-1.0, -0.6, -1.0, float("nan")]}
    base, floor = st.noise_floor([a, b, dict(a)])
    assert base["scores"] == [1, 1, 1, 0] and base["metric"] == 0.75 and base["logliks"][1] == -0.6
    assert base["logliks"][3] == -1.0  # a NaN in one run does not hide the others
    assert floor["base_is_worst_case"] and floor["examples_disagreeing"] == 1
    assert floor["disagreements_vs_first_run"] == [0, 1, 0]
    assert floor["metric_max_abs_diff"] == 0.25 and floor["loglik_max_abs_diff"] == pytest.approx(0.4)


def _trial(i: int, scores: np.ndarray, base_ll: np.ndarray, rng: np.random.Generator) -> dict:
    return {"feature": f"l1_p{i}", "index": i, "factor": 4.0, "status": "ok", "recall_rank": i,
            "scores": scores.tolist(), "logliks": (base_ll + rng.normal(0, 0.05, len(base_ll))).tolist()}


def test_pure_noise_keeps_nothing_while_a_real_effect_clears_holm_and_the_recheck():
    rng = np.random.default_rng(3)
    n = 120
    base_s = (rng.random(n) < 0.5).astype(float)
    base_ll = rng.normal(-2, 0.3, n)
    base = {"scores": base_s.tolist(), "logliks": base_ll.tolist()}
    noise = []
    for i in range(30):  # each trial flips ~10% of the examples either way: no effect
        flip = rng.random(n) < 0.1
        noise.append(_trial(i, np.where(flip, 1 - base_s, base_s), base_ll, rng))
    assert max(np.mean(t["scores"]) - base_s.mean() for t in noise) > 0  # the old "best delta > 0" keeps one
    st.assess(noise, base, alpha=0.05, rank_by="metric", n_boot=500, seed=0)
    assert not any(t["passed_holm"] for t in noise) and st.rank_latents(noise, "metric") == []
    assert all(t["test"] == st.MCNEMAR and t["loglik_test"] == st.SIGN_FLIP_PERM for t in noise)
    reason = st.fallback_reason(noise, [], [], alpha=0.05, rank_by="metric")
    assert reason.startswith("no trial cleared Holm-corrected alpha=0.05 on the metric (best lower bound")

    real = base_s.copy()
    real[np.nonzero(base_s == 0)[0][:25]] = 1  # 25 examples fixed, none broken
    trials = noise + [_trial(99, real, base_ll, rng)]
    st.assess(trials, base, alpha=0.05, rank_by="metric", n_boot=500, seed=0)
    ranked = st.rank_latents(trials, "metric")
    assert [t["index"] for t in ranked] == [99]
    t = ranked[0]
    # 25 discordant pairs all improving: p = 2**-25; Holm over 31 trials multiplies by 31.
    assert t["p_value"] == 2.0 ** -25 and t["p_holm"] == pytest.approx(31 * 2.0 ** -25)
    assert t["delta_ci_low"] > 0 and t["delta"] == pytest.approx(25 / n)

    m = 40
    cb = (rng.random(m) < 0.5).astype(float)
    t["confirm_scores"] = np.ones(m).tolist()
    t["confirm_logliks"] = rng.normal(-2, 0.3, m).tolist()
    st.confirm([t], {"scores": cb.tolist(), "logliks": rng.normal(-2, 0.3, m).tolist()}, alpha=0.05,
               rank_by="metric", n_boot=500, seed=0)
    assert t["kept"] and t["confirm_p_holm"] == t["confirm_p"] == 2.0 ** -int((cb == 0).sum())
    assert t["confirm_metric_delta"] == pytest.approx(1 - cb.mean())


def test_rank_by_loglik_tests_loglik_and_the_metric_must_not_drop_on_recheck():
    rng = np.random.default_rng(5)
    n = 60
    base = {"scores": (rng.random(n) < 0.5).astype(float).tolist(), "logliks": rng.normal(-2, 0.3, n).tolist()}
    t = {"feature": "l1_p4", "index": 4, "factor": 2.0, "status": "ok", "recall_rank": 0, "scores": base["scores"],
         "logliks": (np.asarray(base["logliks"]) + 0.5).tolist()}
    st.assess([t], base, alpha=0.05, rank_by="loglik", n_boot=500, seed=0)
    assert t["passed_holm"] and t["loglik_delta"] == pytest.approx(0.5) and t["p_value"] == 1.0
    cbase = {"scores": [1.0] * 20, "logliks": [-2.0] * 20}
    t.update(confirm_scores=[1.0] * 19 + [0.0], confirm_logliks=[-1.0] * 20)
    st.confirm([t], cbase, alpha=0.05, rank_by="loglik", n_boot=500, seed=0)
    assert t["confirm_delta"] == pytest.approx(1.0) and t["confirm_p"] < 0.05
    assert t["confirm_metric_delta"] == pytest.approx(-0.05) and not t["kept"]
    reason = st.fallback_reason([t], [t], [t], alpha=0.05, rank_by="loglik")
    assert "none was confirmed on the held-out part (l1_p4 x2: confirm delta +1" in reason


def test_choose_reads_causal_parquet_records(tmp_path):
    rows = [{"feature": "l1_p1", "kept": False, "selection_rank": 1}, {"feature": "l1_p2", "kept": True,
            "selection_rank": 2}, {"feature": "l1_p3", "kept": True, "selection_rank": 0},
            {"feature": "l1_p4", "kept": None, "selection_rank": -1}]
    pd.DataFrame(rows).to_parquet(tmp_path / "c.parquet")
    recs = pd.read_parquet(tmp_path / "c.parquet").to_dict("records")
    assert [t["feature"] for t in st.choose(recs, 5)] == ["l1_p3", "l1_p2"]
    assert [t["feature"] for t in st.choose(recs, 1)] == ["l1_p3"]


def test_split_dev_is_seeded_disjoint_and_refuses_an_empty_part():
    s, c = st.split_dev(24, 0.3, 0)
    assert len(c) == 7 and len(s) == 17 and sorted(s + c) == list(range(24))
    assert (s, c) == st.split_dev(24, 0.3, 0) and (s, c) != st.split_dev(24, 0.3, 1)
    assert st.split_dev(5, 0.0, 0) == ([0, 1, 2, 3, 4], [])
    with pytest.raises(ValueError, match="causal.confirm_fraction=0.1 of 3 dev examples"):
        st.split_dev(3, 0.1, 0)
