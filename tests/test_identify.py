"""Feature identification: recall statistics, HF interventions, the causal filter on Ray Tune."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sae_lens import SAE
from transformers import AutoModelForCausalLM, AutoTokenizer

from igds_ray.config import IdentifyConfig, ModelConfig, SAEConfig, from_dict, to_dict
from igds_ray.demo.tiny import PLANTED_TARGET, build_planted_world, says_target_task
from igds_ray.generation import Intervention, SamplingConfig
from igds_ray.generation.base import FeatureSteer
from igds_ray.generation.hf import HFBackend
from igds_ray.models.runner import capture_block_output
from igds_ray.stages import causal, identify, recall
from igds_ray.tasks import TaskDataError, register_task, unregister_task

PLANTED = 9  # the latent whose amplification makes the model say TARGET
TARGET = PLANTED_TARGET


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return build_planted_world(tmp_path_factory.mktemp("planted"), planted=PLANTED)


says_target = says_target_task


def identify_cfg(root, run_dir, **causal_kw) -> IdentifyConfig:
    return from_dict(IdentifyConfig, dict(
        model=str(root / "model"), sae=str(root / "sae"), run_dir=str(run_dir),
        task=dict(name="says_target", source=str(root / "task.parquet"), split=None, dev_split=None),
        recall=dict(limit=40, templates=[0], min_frequency=0.6, top_n=64, batch_size=20),
        causal={**dict(factors=[0.0, 30.0], dev_limit=24, min_dev=10, max_new_tokens=6, gen_batch_size=24),
                **causal_kw},
    ))


@pytest.fixture(scope="module")
def task_registered():
    register_task("says_target", says_target(), overwrite=True)
    yield
    unregister_task("says_target")


def test_recall_statistics_equal_direct_encode(planted, ray_local, tmp_path, task_registered):
    cfg = identify_cfg(planted, tmp_path)
    table = recall.run(cfg).to_pandas().set_index("index")
    tok = AutoTokenizer.from_pretrained(planted / "model")
    model = AutoModelForCausalLM.from_pretrained(planted / "model").eval()
    sae = SAE.load_from_disk(planted / "sae")
    from igds_ray.tasks import load_task_set

    task = says_target()
    ex = load_task_set(task, str(planted / "task.parquet"), split=None, limit=40, seed=0).examples
    acts = []
    for e in ex:
        ids = tok(task.build_prompt(e, 0), return_tensors="pt").input_ids
        # Block 1 is the last block: hidden_states[2] would have the final norm applied, so hook it.
        with torch.no_grad(), capture_block_output(model, 1) as store:
            model(ids)
            acts.append(sae.encode(store[0][0, -1]).numpy())
    acts = np.stack(acts)
    active = acts > 0
    for j in np.nonzero(active.any(0))[0]:
        row = table.loc[j]
        assert row["n_active"] == active[:, j].sum()
        np.testing.assert_allclose(row["frequency"], active[:, j].mean(), rtol=1e-9)
        np.testing.assert_allclose(row["mean_act"], acts[active[:, j], j].mean(), rtol=1e-4)
    assert set(table.index) == set(np.nonzero(active.any(0))[0])
    cands = table[table["candidate"]]
    assert (cands["frequency"] > 0.6).all() and PLANTED in cands.index
    assert list(cands.sort_values("rank")["mean_act"]) == sorted(cands["mean_act"], reverse=True)
    assert cands.loc[PLANTED, "rank"] > 0  # recall alone would not pick it


def test_hf_intervention_equals_reconstruction_plus_error(planted):
    sae = SAE.load_from_disk(planted / "sae")
    h = torch.randn(5, 7, 128) * 0.3
    for factor in (0.0, 2.0, 8.0):
        steer = FeatureSteer.from_sae(sae, 1, (PLANTED, 3), torch.device("cpu"), torch.float32)
        with torch.no_grad():
            z = sae.encode(h)
            z2 = z.clone()
            z2[..., [PLANTED, 3]] *= factor
            ref = sae.decode(z2) + (h - sae.decode(z))
        torch.testing.assert_close(steer.apply(h, factor), ref, rtol=1e-4, atol=1e-3)


def test_hf_backend_intervention_changes_output_and_counts(planted):
    b = HFBackend(ModelConfig(str(planted / "model")), SAEConfig(path=str(planted / "sae")))
    prompts = ["Tom has 3 apples.", "the cat sat"]
    s = SamplingConfig(max_new_tokens=5)
    base = b.generate(prompts, s)
    amp = b.generate(prompts, s, Intervention(1, (PLANTED,), 30.0))
    assert all(TARGET.strip() in t for t in amp) and base != amp
    assert b.hook_calls >= 5  # prefill + every decode step
    assert b.generate(prompts, s, Intervention(1, (PLANTED,), 1.0)) == base  # factor 1 is the identity
    with pytest.raises(ValueError, match="out of range"):
        b.generate(prompts, s, Intervention(1, (64,), 2.0))
    with pytest.raises(ValueError, match="SAE reads layer 1"):
        b.generate(prompts, s, Intervention(0, (3,), 2.0))
    ll0 = np.mean(b.loglik(prompts, [TARGET] * 2))
    ll1 = np.mean(b.loglik(prompts, [TARGET] * 2, Intervention(1, (PLANTED,), 30.0)))
    assert ll1 > ll0


STAT_COLUMNS = ["delta", "delta_ci_low", "delta_ci_high", "p_value", "p_holm", "test", "loglik_delta",
                "loglik_ci_low", "loglik_ci_high", "loglik_p", "loglik_p_holm", "n_search", "passed_holm",
                "confirm_delta", "confirm_ci_low", "confirm_p", "confirm_p_holm", "confirm_metric_delta", "kept"]


def test_causal_filter_ranks_the_planted_feature_first(planted, ray_local, tmp_path, task_registered):
    # Two actors share the 2-CPU test cluster with the trials (0.1 CPU each).
    cfg = identify_cfg(planted, tmp_path, gen_actors=2, gen_num_cpus=0.5)
    res = identify.run(cfg)
    assert res["features"] == [f"l1_p{PLANTED}"] and res["selected_by"] == "causal" and res["fallback_reason"] is None
    d = res["details"][0]
    assert d["factor"] == 30.0 and d["delta"] > 0.5 and d["test"] == "mcnemar_exact"
    assert d["delta_ci_low"] > 0 and d["p_holm"] < 0.05 and d["passed_holm"]
    assert d["confirm_p_holm"] < 0.05 and d["confirm_metric_delta"] >= 0 and d["confirm_delta"] > 0
    assert (res["n_search"], res["n_confirm"], res["alpha"], res["rank_by"], res["mode"]) == (17, 7, 0.05, "metric",
                                                                                              "scale")
    trials = pd.read_parquet(tmp_path / "features" / "causal.parquet")
    assert set(STAT_COLUMNS) <= set(trials.columns)
    n_cand = int(pd.read_parquet(tmp_path / "features" / "recall.parquet")["candidate"].sum())
    assert len(trials) == 2 * n_cand and (trials["status"] == "ok").all() and (trials["n_search"] == 17).all()
    others = trials[trials["index"] != PLANTED]
    assert (others["delta"] < d["delta"]).all() and not others["passed_holm"].any() and not others["kept"].any()
    # Holm over every trial: the planted trial's adjusted p is its raw p times the family size at most.
    top = trials[(trials["index"] == PLANTED) & (trials["factor"] == 30.0)].iloc[0]
    assert top["p_value"] < top["p_holm"] <= len(trials) * top["p_value"] and top["kept"]
    assert res["loglik_vs_metric_spearman"] is not None and res["model_load_share"] < 1
    # The noise floor: the base ran twice on each of the 2 actors, on both parts.
    floor = res["noise_floor"]
    assert sorted((r["actor"], r["repeat"], r["part"]) for r in floor["runs"]) == sorted(
        (a, r, p) for a in (0, 1) for r in (0, 1) for p in ("search", "confirm"))
    for part in ("search", "confirm"):
        f = floor[part]
        assert f["runs"] == 4 and len(f["disagreements_vs_first_run"]) == 4
        assert f["base_is_worst_case"] == (f["examples_disagreeing"] > 0 or f["metric_max_abs_diff"] > 0)
    ex = pd.read_parquet(tmp_path / "features" / "causal_examples.parquet")
    assert (ex["kind"] == "base").sum() == 8 and (ex["kind"] == "trial").sum() == len(trials)
    assert (ex["kind"] == "confirm").sum() == res["rechecked"] >= 1
    assert {len(s) for s in ex[ex["part"] == "search"]["scores"]} == {17}
    on_disk = json.loads((tmp_path / "features" / "features.json").read_text())
    assert on_disk["features"] == res["features"] and on_disk["details"][0]["p_holm"] == d["p_holm"]
    assert [t["feature"] for t in causal.choose(trials.to_dict("records"), 5)] == res["features"]
    # A finished search is not rerun.
    assert identify.run(cfg)["search_wall_s"] == res["search_wall_s"]


def test_no_effect_keeps_nothing_and_the_fallback_says_why(planted, ray_local, tmp_path, task_registered):
    cfg = identify_cfg(planted, tmp_path, factors=[1.0])  # factor 1 changes nothing: every delta is 0
    with pytest.raises(causal.NoHelpfulFeature, match="no trial cleared Holm-corrected alpha=0.05"):
        identify.run(cfg)
    trials = pd.read_parquet(tmp_path / "features" / "causal.parquet")
    assert (trials["p_value"] == 1.0).all() and not trials["passed_holm"].any()
    # Same run directory: the finished Tune search is restored, only the decision changes.
    res = identify.run(identify_cfg(planted, tmp_path, factors=[1.0], fallback="top_recall"))
    assert res["selected_by"] == "fallback" and res["trial_evaluations_this_run"] == 0
    assert res["fallback_reason"].startswith("no trial cleared Holm-corrected alpha=0.05 on the metric")
    assert res["details"][0]["feature"] == res["features"][0] and res["details"][0]["p_holm"] is None


def test_clamp_mode_finds_the_planted_feature(planted, ray_local, tmp_path, task_registered):
    res = identify.run(identify_cfg(planted, tmp_path, mode="clamp"))
    assert res["features"] == [f"l1_p{PLANTED}"] and (res["mode"], res["rank_by"]) == ("clamp", "metric")
    d = res["details"][0]
    # The planted latent reads 0.002 everywhere (its encoder is zeroed): p99 = 0.002, clamped to 30x that.
    assert d["act_p99"] == pytest.approx(0.002, rel=1e-3) and d["clamp_value"] == pytest.approx(30 * d["act_p99"])
    assert d["p_holm"] < 0.05 and d["confirm_p_holm"] < 0.05 and d["confirm_metric_delta"] > 0
    trials = pd.read_parquet(tmp_path / "features" / "causal.parquet")
    np.testing.assert_allclose(trials["clamp_value"], trials["factor"] * trials["act_p99"])
    assert (trials[trials["factor"] == 0.0]["clamp_value"] == 0.0).all()  # factor 0 ablates
    assert (trials["act_p99"] > 0).all() and trials["loglik_p_holm"].notna().all()
    assert set(trials["loglik_test"]) <= {"sign_flip_exact", "sign_flip_permutation"}


def test_dev_set_too_small(planted, ray_local, tmp_path, task_registered):
    cfg = identify_cfg(planted, tmp_path, min_dev=500)
    with pytest.raises(TaskDataError, match="min_dev=500"):
        identify.run(cfg)


def test_causal_config_refuses_bad_statistics_keys():
    from igds_ray.errors import ConfigError

    for bad, key in ((dict(alpha=1.5), "causal.alpha"), (dict(confirm_fraction=1.0), "causal.confirm_fraction"),
                     (dict(n_boot=10), "causal.n_boot"), (dict(rank_by="loglik", loglik=False), "causal.rank_by"),
                     (dict(k=5, confirm_top=3), "causal.confirm_top"), (dict(mode="steer"), "causal.mode")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            identify_cfg(Path("/x"), Path("/y"), **bad)
    assert identify_cfg(Path("/x"), Path("/y"), k=5, confirm_top=3, confirm_fraction=0.0).causal.k == 5


def slow_says_target():
    """The planted task with a deliberately slow metric (~1 s per trial), so the test can kill the
    search part-way however fast the tiny model generates."""
    import time

    from igds_ray.tasks import FunctionTask

    def score(ans, ex):
        time.sleep(0.04)
        return 1.0 if TARGET.strip() in ans else 0.0

    return FunctionTask("says_target", None, score)


RESUME_DRIVER = r"""
import sys, ray
from igds_ray.config import IdentifyConfig, from_dict
from igds_ray.stages import identify
from igds_ray.tasks import register_task
sys.path.insert(0, sys.argv[3])
from test_identify import slow_says_target, identify_cfg
from pathlib import Path
register_task("says_target", slow_says_target(), overwrite=True)
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
identify.run(identify_cfg(Path(sys.argv[2]), Path(sys.argv[4])))
"""


@pytest.mark.slow  # 60 s: a causal search interrupted, then resumed (Tune trials not rerun); in `make test-all`
def test_interrupted_search_resumes_without_rerunning_trials(planted, ray_local, tmp_path, task_registered):
    import subprocess
    import sys
    import time
    from pathlib import Path

    gcs = ray_local.get_runtime_context().gcs_address
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", RESUME_DRIVER, gcs, str(planted), str(Path(__file__).parent),
                             str(run_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tune_dir = run_dir / "features" / "tune" / "causal"
    deadline = time.time() + 240
    finished = 0
    try:
        while time.time() < deadline and proc.poll() is None:
            finished = sum(1 for p in tune_dir.glob("*/result.json") if p.stat().st_size > 0)
            if finished >= 3:
                time.sleep(1.5)  # let Tune save its experiment state (every second, see causal.run)
                break
            time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait()
    assert finished >= 3, "the search did not get going before the deadline"
    done_before = sum(1 for p in tune_dir.glob("*/result.json") if p.stat().st_size > 0)
    total = len(list(tune_dir.glob("*/params.json"))) or None
    assert not (run_dir / "features" / "features.json").exists()
    res = identify.run(identify_cfg(planted, run_dir))
    n_trials = res["trials"]
    assert res["features"] == [f"l1_p{PLANTED}"] and res["failed_trials"] == 0
    # This run generated only the trials the killed run had not finished (besides the base and recheck).
    assert res["trial_evaluations_this_run"] <= n_trials - 3
    assert res["trial_evaluations_this_run"] >= n_trials - done_before
    assert total is None or total <= n_trials


def _explodes_when_amplified(preds, examples):
    hits = sum(TARGET.strip() in (p or "") for p in preds)
    if hits > len(preds) / 2:
        raise RuntimeError("metric crashed on purpose")
    return {"metric": hits / max(len(preds), 1)}


def test_a_crashing_trial_is_reported_and_the_search_goes_on(planted, ray_local, tmp_path):
    from igds_ray.tasks import FunctionTask

    task = FunctionTask("fragile", None, lambda ans, ex: 0.0, corpus_fn=_explodes_when_amplified)
    register_task("fragile", task, overwrite=True)
    try:
        cfg = identify_cfg(planted, tmp_path, fallback="top_recall")
        cfg = from_dict(IdentifyConfig, {**to_dict(cfg),
                                         "task": {**cfg.task.__dict__, "name": "fragile"}})
        res = identify.run(cfg)
    finally:
        unregister_task("fragile")
    trials = pd.read_parquet(tmp_path / "features" / "causal.parquet")
    bad = trials[trials["status"] == "error"]
    assert len(bad) >= 1 and (bad["index"] == PLANTED).all() and (bad["factor"] == 30.0).all()
    assert bad["error"].str.contains("metric crashed on purpose").all()
    assert (trials["status"] == "ok").sum() == len(trials) - len(bad)
    # Every per-example score is 0 under this task, so nothing can pass and the fallback says why.
    assert res["failed_trials"] == len(bad) and res["selected_by"] == "fallback" and res["fallback_reason"]
    assert bad["p_value"].isna().all() and not bad["passed_holm"].any()
