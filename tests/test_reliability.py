"""Reliability and safety: hostile input, hostile configs, crashes and resumes, determinism, secrets.

Every hostile pool ends either in a complete output in which every input (file, row) appears
exactly once (with `error` set where it could not be scored), or in an error raised before compute
that names the file, column or key, with no output directory created.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings

from igds_ray import schema as S
from igds_ray.config import ModelConfig, ScoreConfig, SelectConfig, from_dict, to_dict
from igds_ray.errors import ConfigError, ModelSAEMismatch, PoolError, StageOutputError
from igds_ray.stages import score, select
from igds_ray.stages.score import FeatureScorer
from tests import hostile as H

FEATS = ["l0_p3", "l0_p17", "l0_p40"]
K = len(FEATS)


def make_cfg(world, out, pool=None, **kw) -> ScoreConfig:
    pool = {"path": str(world.pool_dir), **(pool or {})} if not isinstance(pool, str) else {"path": pool}
    return from_dict(ScoreConfig, dict(model=str(world.model_dir), sae=str(world.saes["jumprelu"]),
                                       features=FEATS, pool=pool, out=str(out), **kw))


def read_parts(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out)


def assert_complete(case: H.PoolCase, pool_dir: Path, out: Path, manifest: dict) -> pd.DataFrame:
    """Every counted (file, row) exactly once, with the expected error (or a finite score), nothing else."""
    df = read_parts(out)
    names = os.listdir(out)
    assert S.SUCCESS in names and not any(n.startswith("_attempt") for n in names)
    keys = list(zip(df[S.SRC_FILE], df[S.SRC_ROW]))
    assert len(keys) == len(set(keys)), "a pool row was written twice"
    expected = {(rel, r) for rel, errs in case.row_errors.items() for r in range(len(errs))}
    # Independently of the reader: the row counts Parquet itself reports.
    for rel, errs in case.row_errors.items():
        assert pq.ParquetFile(pool_dir / rel).metadata.num_rows == len(errs), rel
    assert set(keys) == expected, f"missing {sorted(expected - set(keys))[:5]}, extra {sorted(set(keys) - expected)[:5]}"
    assert manifest["rows"] == len(df) and manifest["errors"] == int(df[S.ERROR].notna().sum())
    scored = df[S.ERROR].isna()
    assert (df[S.SCORE].notna() == scored).all(), "score must be set exactly when error is not"
    assert np.isfinite(df.loc[scored, S.SCORE]).all()
    assert all(len(a) == K and np.isfinite(a).all() for a in df.loc[scored, S.ACTS])
    assert df.loc[~scored, S.ACTS].isna().all() and (df.loc[~scored, S.N_TOKENS] == 0).all()
    by_key = df.set_index([S.SRC_FILE, S.SRC_ROW])
    for rel, errs in case.row_errors.items():
        for r, want in enumerate(errs):
            got = by_key.loc[(rel, r), S.ERROR]
            got = None if pd.isna(got) else got
            if want is None:
                assert got is None, f"{rel}:{r} should be scored, got error {got!r}"
            elif want is not H.ANY:
                assert got is not None and re.match(want, got), f"{rel}:{r}: want {want!r}, got {got!r}"
    return df


# ---------------------------------------------------------------------------------------------
# Row level: hypothesis straight into the scorer (no Ray per example)


@pytest.fixture(scope="module")
def scorers(world):
    built = {}
    for pooling in ("last", "max", "mean"):
        for text in (None, "text"):
            cfg = make_cfg(world, "unused", pooling=pooling, max_tokens=64, token_budget=512,
                           pool={"text_column": text})
            built[pooling, text] = FeatureScorer(cfg)
    return built


@pytest.mark.parametrize("text_column", [None, "text"])
@pytest.mark.parametrize("pooling", ["last", "max", "mean"])
def test_hostile_rows_keep_their_ids(scorers, pooling, text_column):
    scorer = scorers[pooling, text_column]
    columns = ("text",) if text_column else ("prompt", "response")
    seen = {"examples": 0, "scored": 0, "errors": 0}

    @settings(max_examples=50, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(H.reader_tables(columns))
    def check(drawn):
        table, input_errors = drawn
        out = scorer.score_table(table)
        n = table.num_rows
        seen["examples"] += 1
        seen["errors"] += n - out.column(S.ERROR).null_count
        seen["scored"] += out.column(S.ERROR).null_count
        assert out.num_rows == n
        assert out.column(S.ID).to_pylist() == table.column(S.ID).to_pylist()
        assert out.column(S.SRC_ROW).to_pylist() == list(range(n))
        assert out.schema.equals(S.scores_schema(pa.string()).append(pa.field(S.RENDERED, pa.bool_())))
        for r in out.to_pylist():
            assert (r[S.SCORE] is None) == (r[S.ERROR] is not None), r
            if r[S.SCORE] is None:
                assert r[S.ERROR] and r[S.ACTS] is None and r[S.N_TOKENS] == 0
            else:
                assert math.isfinite(r[S.SCORE]) and len(r[S.ACTS]) == K
                assert all(math.isfinite(a) for a in r[S.ACTS])
                assert 0 < r[S.N_TOKENS] <= 64
                assert r[S.SCORE] == pytest.approx(sum(r[S.ACTS]), rel=1e-6, abs=1e-9)
        # A row the reader flagged (null, not a string, invalid UTF-8) is never scored.
        for err, r in zip(input_errors, out.column(S.ERROR).to_pylist()):
            if err is not None:
                assert r == err

    check()
    # The strategy reaches both outcomes, many times over.
    assert seen["examples"] >= 50 and seen["scored"] >= 20 and seen["errors"] >= 20, seen


# ---------------------------------------------------------------------------------------------
# File level: the real Ray job


@pytest.fixture(scope="module")
def mixed(world, ray_local, tmp_path_factory):
    case = H.mixed_pool()
    root = tmp_path_factory.mktemp("mixed")
    pool_dir = case.write(root / "pool")
    out = root / "scores"
    # Small read tasks and batches: many blocks, row groups split across tasks' boundaries.
    cfg = make_cfg(world, out, pool={"path": str(pool_dir), "rows_per_read_task": 7}, batch_size=8, max_tokens=256,
                   token_budget=2048)
    return case, pool_dir, cfg, score.run(cfg)


def test_hostile_pool_complete_output(mixed):
    case, pool_dir, cfg, manifest = mixed
    df = assert_complete(case, pool_dir, Path(cfg.out), manifest)
    # Generated ids are `<file>:<row>`; the pool's own `error`/`score`/`src_row` columns are never read.
    assert (df[S.ID] == df[S.SRC_FILE] + ":" + df[S.SRC_ROW].astype(str)).all()
    assert not df[S.SRC_FILE].str.contains("hidden|dot|_attempt|notes|crc").any()
    assert manifest["pool"]["files"] == sorted(case.row_errors)
    huge = df.set_index(S.ID).loc["texts.parquet:4"]
    assert huge[S.TRUNCATED] and huge[S.N_TOKENS] == 256 and pd.isna(huge[S.ERROR])


def test_rerun_after_finish_is_a_no_op_and_select_ranks_only_scored_rows(mixed, tmp_path):
    case, pool_dir, cfg, manifest = mixed
    assert score.run(cfg)["committed_at"] == manifest["committed_at"]
    m = select.run(from_dict(SelectConfig, dict(scores=cfg.out, out=str(tmp_path / "sel"), fraction=1.0,
                                                write_rows=False)))
    chosen = pd.read_parquet(tmp_path / "sel" / "igds.parquet")
    n_scored = manifest["rows"] - manifest["errors"]
    assert m["rows"] == len(chosen) == n_scored and chosen[S.SCORE].notna().all()
    assert sorted(chosen[S.RANK]) == list(range(n_scored))
    assert not chosen.duplicated([S.SRC_FILE, S.SRC_ROW]).any()


def test_select_fetches_text_back_from_a_pool_of_mixed_text_types(mixed, tmp_path):
    case, pool_dir, cfg, manifest = mixed
    select.run(from_dict(SelectConfig, dict(scores=cfg.out, out=str(tmp_path / "sel"), fraction=1.0)))
    chosen = pd.read_parquet(tmp_path / "sel" / "igds.parquet")
    assert len(chosen) == manifest["rows"] - manifest["errors"]
    # The text fetched back for each chosen row is that pool row's own, as text (binary decoded).
    for rel, rows in chosen.groupby(S.SRC_FILE):
        src = pq.read_table(pool_dir / rel, columns=["prompt"]).column("prompt").to_pylist()
        for r, p in zip(rows[S.SRC_ROW], rows["prompt"]):
            assert p == (src[r].decode() if isinstance(src[r], bytes) else src[r])


def test_duplicate_ids_are_scored_once_per_input_row(world, ray_local, tmp_path):
    """Duplicate ids are not refused or flagged: each input row is scored once, keyed by (file, row)."""
    case = H.duplicate_ids_pool()
    pool_dir = case.write(tmp_path / "pool")
    cfg = make_cfg(world, tmp_path / "scores", pool={"path": str(pool_dir)}, batch_size=2)
    manifest = score.run(cfg)
    df = assert_complete(case, pool_dir, tmp_path / "scores", manifest)
    got = df.sort_values([S.SRC_FILE, S.SRC_ROW])[S.ID].tolist()
    assert got == [7, 7, 8, 9, 7, 9]
    assert manifest["duplicate_ids"] == 3  # 6 rows, 3 distinct ids: counted, and warned about
    same = df[df[S.ID] == 7][S.SCORE].to_numpy()  # three copies of one text
    np.testing.assert_allclose(same, same[0], rtol=1e-6)
    sel = select.run(from_dict(SelectConfig, dict(scores=cfg.out, out=str(tmp_path / "sel"), fraction=0.5)))
    chosen = pd.read_parquet(tmp_path / "sel" / "igds.parquet")
    assert sel["rows"] == len(chosen) == 3
    assert not chosen.duplicated([S.SRC_FILE, S.SRC_ROW]).any()
    assert sorted(chosen[S.RANK]) == [0, 1, 2]


def test_single_file_pool_path(world, ray_local, tmp_path):
    f = tmp_path / "one.parquet"
    pq.write_table(pa.table({"prompt": ["Tom has 3 apples.", None], "response": ["4", "5"]}), f)
    case = H.PoolCase("single", {}, row_errors={"one.parquet": [None, "prompt is null"]})
    assert_complete(case, tmp_path, tmp_path / "scores", score.run(make_cfg(world, tmp_path / "scores", pool=str(f))))


@pytest.mark.parametrize("case", H.error_pools(), ids=lambda c: c.name)
def test_bad_pools_fail_before_compute(world, tmp_path, case):
    pool_dir = case.write(tmp_path / "pool")
    out = tmp_path / "scores"
    with pytest.raises(case.expect, match=case.match):
        score.run(make_cfg(world, out, pool={"path": str(pool_dir)}))
    assert not out.exists()


def test_missing_pool_path(world, tmp_path):
    with pytest.raises(PoolError, match=r"nowhere: no such file"):
        score.run(make_cfg(world, tmp_path / "o", pool={"path": str(tmp_path / "nowhere")}))
    assert not (tmp_path / "o").exists()


def test_corrupt_data_page_fails_naming_the_file_then_a_rerun_recovers(world, ray_local, tmp_path):
    """A footer that reads but a page that does not: found only at compute; nothing is committed,
    and once the file is replaced a rerun writes every row once (the failed attempt is cleared)."""
    pool_dir = tmp_path / "pool"
    pool_dir.mkdir()
    pq.write_table(H._good(20), pool_dir / "a.parquet")
    (pool_dir / "b.parquet").write_bytes(H.corrupt_data_page())
    out = tmp_path / "scores"
    cfg = make_cfg(world, out, pool={"path": str(pool_dir)}, batch_size=4)
    with pytest.raises(PoolError, match=r"pool file b\.parquet: cannot read row groups"):
        score.run(cfg)
    assert not (out / S.SUCCESS).exists()
    pq.write_table(H._good(7), pool_dir / "b.parquet")
    case = H.PoolCase("fixed", {}, row_errors={"a.parquet": [None] * 20, "b.parquet": [None] * 7})
    assert_complete(case, pool_dir, out, score.run(cfg))


# ---------------------------------------------------------------------------------------------
# 100k one-token rows


def test_hundred_thousand_one_token_rows(world, ray_local, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world.model_dir)
    word = next(w for w in ("apple", "cat", "the", "a") if len(tok(w, add_special_tokens=False).input_ids) == 1)
    pool_dir = H.one_token_pool(tmp_path / "pool", word)
    out = tmp_path / "scores"
    m = score.run(make_cfg(world, out, pool={"path": str(pool_dir)}, batch_size=4096, max_actors=2))
    assert m["rows"] == 100_000 and m["errors"] == 0
    t = pq.read_table(out, columns=[S.SRC_FILE, S.SRC_ROW, S.N_TOKENS, S.SCORE])
    assert t.num_rows == 100_000
    keys = pd.DataFrame({"f": t.column(S.SRC_FILE).to_numpy(zero_copy_only=False),
                         "r": t.column(S.SRC_ROW).to_numpy()})
    assert not keys.duplicated().any() and keys.groupby("f").size().tolist() == [25_000] * 4
    assert set(t.column(S.N_TOKENS).to_pylist()) == {2}  # BOS + the word
    assert len(set(t.column(S.SCORE).to_pylist())) == 1  # one text, one score


# ---------------------------------------------------------------------------------------------
# Hostile configs


BASE = dict(model="m", sae={"path": "/s"}, features=["l0_p3"], pool="p", out="o")


@pytest.mark.parametrize("patch, needle", [
    ({"modle": "m"}, "unknown config key modle"),
    ({"model": {"name_or_path": "m", "trust_remote_kode": True}}, "model.trust_remote_kode"),
    ({"sae": {"pth": "/s"}}, "sae.pth"),
    ({"pool": {"path": "p", "rows_per_read_task": 0}}, "pool.rows_per_read_task"),
    ({"pool": 7}, "pool: expected a mapping"),
    ({"pool": {"path": None}}, "pool.path: expected a string"),
    ({"batch_size": 1.5}, "batch_size: expected an integer"),
    ({"batch_size": True}, "batch_size: expected an integer"),
    ({"batch_size": -3}, "batch_size must be >= 1"),
    ({"max_tokens": None}, "max_tokens: expected an integer"),
    ({"token_budget": 8, "max_tokens": 64}, r"token_budget \(8\) must be >= max_tokens"),
    ({"overwrite": "maybe"}, "overwrite: expected true/false"),
    ({"features": 5}, "features: expected a list"),
    ({"features": []}, "at least one feature"),
    ({"features": ["l0_p-1"]}, "not of the form"),
    ({"features": ["l0_p3.5"]}, "not of the form"),
    ({"model": {"name_or_path": "m", "dtype": "int8"}}, "model.dtype: expected one of"),
    ({"out": ["a"]}, "out: expected a string"),
    ({"num_cpus": "nan"}, "num_cpus: expected a finite number"),
    ({"num_gpus": float("inf")}, "num_gpus: expected a finite number"),
])
def test_bad_score_configs_name_the_key(patch, needle):
    with pytest.raises(ConfigError, match=needle):
        from_dict(ScoreConfig, {**BASE, **patch})


@pytest.mark.parametrize("patch, needle", [
    ({"fraction": -0.5}, "fraction must be in"),
    ({"fraction": 1.0001}, "fraction must be in"),
    ({"fraction": "nan"}, "fraction"),
    ({"fraction": "inf"}, "fraction"),
    ({"fraction": "half"}, "fraction: expected"),
    ({"fraction": None}, "give fraction or n"),
    ({"n": -1}, "n must be >= 0"),
    ({"n": "ten"}, "n: expected"),
    ({"arm": "../etc"}, "arm must be a plain name"),
    ({"arm": ""}, "arm must be a plain name"),
    ({"sample": 3}, "unknown config key sample"),
    ({"max_score": "nan"}, "max_score"),  # NaN would silently select nothing
])
def test_bad_select_configs_name_the_key(patch, needle):
    with pytest.raises(ConfigError, match=needle):
        from_dict(SelectConfig, {"scores": "s", "out": "o", **patch})


@pytest.fixture(scope="module")
def bad_saes(world, tmp_path_factory):
    from igds_ray.demo.tiny import build_sae

    root = tmp_path_factory.mktemp("bad_saes")
    saes = {}
    for name, d_in, hook in [("layer5", 128, "blocks.5.hook_resid_post"), ("narrow", 64, "blocks.0.hook_resid_post"),
                             ("embed", 128, "blocks.0.hook_resid_pre"), ("attn", 128, "blocks.0.attn.hook_z")]:
        build_sae(d_in, 64, hook).save_model(root / name)
        saes[name] = root / name
    (root / "badjson").mkdir()
    (root / "badjson" / "cfg.json").write_text("{not json")
    (root / "nodims").mkdir()
    (root / "nodims" / "cfg.json").write_text('{"architecture": "standard"}')
    shutil.copy(world.saes["standard"] / "sae_weights.safetensors", root / "nodims")
    saes["badjson"], saes["nodims"] = root / "badjson", root / "nodims"
    return saes


@pytest.mark.parametrize("sae, features, exc, needle", [
    ("layer5", ["l5_p3"], ModelSAEMismatch, r"reads layer 5, but the model has 2 layers"),
    ("narrow", ["l0_p3"], ModelSAEMismatch, r"d_in=64 differs from the model's hidden size 128"),
    ("embed", ["l0_p3"], ModelSAEMismatch, r"reads the embeddings"),
    ("attn", ["l0_p3"], ModelSAEMismatch, r"hook point 'blocks\.0\.attn\.hook_z' is not supported"),
    ("badjson", ["l0_p3"], ConfigError, r"badjson.*cfg\.json is not valid JSON"),
    ("nodims", ["l0_p3"], ConfigError, r"nodims: config lacks d_in/d_sae"),
    ("jumprelu", ["l0_p64"], ModelSAEMismatch, r"l0_p64: index 64 is out of range for an SAE of d_sae=64"),
    ("jumprelu", ["l0_p3", "l0_p100000"], ModelSAEMismatch, r"l0_p100000: index 100000 is out of range"),
    ("jumprelu", ["l1_p3"], ModelSAEMismatch, r"feature l1_p3 is on layer 1, but the SAE reads layer 0"),
    ("missing", ["l0_p3"], ConfigError, r"sae\.path '.*missing': no cfg\.json there"),
])
def test_model_sae_feature_mismatch_fails_before_compute(world, bad_saes, tmp_path, sae, features, exc, needle):
    path = bad_saes.get(sae) or world.saes.get(sae) or tmp_path / sae
    cfg = from_dict(ScoreConfig, {**to_dict(make_cfg(world, tmp_path / "out")), "sae": {"path": str(path)},
                                  "features": features})
    with pytest.raises(exc, match=needle):
        score.run(cfg)
    assert not (tmp_path / "out").exists()


def test_missing_model_fails_before_compute(world, tmp_path):
    cfg = from_dict(ScoreConfig, {**to_dict(make_cfg(world, tmp_path / "out")),
                                  "model": {"name_or_path": str(tmp_path / "no_model")}})
    with pytest.raises(ConfigError, match=r"model '.*no_model': cannot read its config"):
        score.run(cfg)
    assert not (tmp_path / "out").exists()


def test_select_from_missing_or_unfinished_scores(tmp_path):
    with pytest.raises(StageOutputError, match=r"nothing is not a finished stage directory"):
        select.run(from_dict(SelectConfig, dict(scores=str(tmp_path / "nothing"), out=str(tmp_path / "sel"))))
    assert not (tmp_path / "sel").exists()


@pytest.fixture()
def weightless(world, tmp_path):
    sae = tmp_path / "sae"
    shutil.copytree(world.saes["jumprelu"], sae)
    (sae / "sae_weights.safetensors").unlink()
    model = tmp_path / "model"
    shutil.copytree(world.model_dir, model)
    for p in model.glob("*.safetensors"):
        p.unlink()
    return model, sae


def test_sae_without_weights_fails_before_compute(world, weightless):
    _, sae = weightless
    cfg = from_dict(ScoreConfig, {**to_dict(make_cfg(world, "o")), "sae": {"path": str(sae)}})
    with pytest.raises(ConfigError, match=r"sae\.path '.*sae': no sae_weights\.safetensors there"):
        score.validate(cfg)


def test_model_without_weights_fails_before_compute(world, weightless):
    model, _ = weightless
    cfg = from_dict(ScoreConfig, {**to_dict(make_cfg(world, "o")), "model": {"name_or_path": str(model)}})
    with pytest.raises(ConfigError, match=r"model '.*model': no safetensors weights"):
        score.validate(cfg)


# ---------------------------------------------------------------------------------------------
# Crashes: a scorer actor that dies mid-job


def _scorer_restarts() -> int | None:
    """Restarts of scorer actors so far (GCS actor table; None where this Ray does not expose it)."""
    try:
        import ray._private.state as state

        return sum(int(a.get("NumRestarts", 0)) for a in state.actors().values()
                   if "FeatureScorer" in str(a.get("ActorClassName", "")))
    except Exception:  # a private API: the exactly-once checks below do not depend on it
        return None


def test_actor_crash_mid_job_still_writes_every_row_once(world, ray_local, tmp_path):
    out = tmp_path / "scores"
    cfg = make_cfg(world, out, batch_size=25, pool={"rows_per_read_task": 50})
    before = _scorer_restarts()
    m = score.run(cfg, fail_after_batches=3)  # each actor process exits on its 4th batch; 8 batches in all
    after = _scorer_restarts()
    if before is not None and after is not None:
        assert after > before, "the scorer actor should have crashed and been restarted"
    df = read_parts(out)
    assert m["rows"] == len(df) == 200 and not df.duplicated([S.SRC_FILE, S.SRC_ROW]).any()
    assert df[S.ERROR].isna().all()
    # Same scores as an uncrashed in-process run of the same rows.
    ref = pd.concat([FeatureScorer(cfg).score_table(t).to_pandas() for t in _reader_tables(cfg)])
    np.testing.assert_allclose(df.set_index(S.ID).loc[ref[S.ID], S.SCORE], ref[S.SCORE], rtol=1e-5, atol=1e-6)


def _reader_tables(cfg: ScoreConfig) -> list[pa.Table]:
    from igds_ray import pool as P

    pool = P.discover(cfg.pool.path, cfg.pool.text_columns, cfg.pool.id_column)
    fs = P.filesystem(cfg.pool.path)[0]
    return [P.read_chunk(fs, pool, f, 0, list(range(len(f.row_groups)))) for f in pool.files]


HANG_SCRIPT = textwrap.dedent("""
    import sys
    import ray
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=sys.argv[1], log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    from igds_ray import cli
    sys.exit(cli.main(sys.argv[2:]))
""")


def test_refuses_actors_that_leave_no_cpu_for_the_read_tasks(ray_local):
    """The session's Ray has 2 CPUs and no autoscaler: actors that leave less than a read task's quarter CPU
    are refused, naming the keys; a fraction of a CPU left is enough."""
    import warnings

    from igds_ray.errors import ConfigError
    from igds_ray.stages.score import check_cpu_headroom

    assert ray_local.cluster_resources()["CPU"] == 2
    with pytest.raises(ConfigError, match=r"2 scorer actor\(s\) x 1 CPU \(min_actors × num_cpus\) leave 0 of the "
                                          r"cluster's 2 CPUs for the pool's read tasks, which need 0.25 each, and no "
                                          r"autoscaler is configured, so the job would wait forever"):
        check_cpu_headroom(2, 1.0)
    with pytest.raises(ConfigError, match=r"\(actors × num_cpus\) leave 0 of"):
        check_cpu_headroom(4, 1.0, keys="actors × num_cpus")
    with pytest.raises(ConfigError, match=r"leave 0.1 of the cluster's 2 CPUs"):
        check_cpu_headroom(1, 1.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of these may warn or refuse
        assert check_cpu_headroom(1, 1.0) is None
        assert check_cpu_headroom(1, 1.5) is None  # 0.5 CPU left: two read tasks
        assert check_cpu_headroom(2, 0.5) is None
        assert check_cpu_headroom(3, 0.25) is None


@pytest.mark.slow
def test_actors_taking_every_cpu(world, tmp_path):
    """Run in its own Ray (a hung job would hold the shared test cluster's CPUs for good)."""
    ray_tmp = tempfile.mkdtemp(prefix="igdshang", dir="/tmp")
    argv = ["score", "--model", str(world.model_dir), "--sae", str(world.saes["jumprelu"]), "--features", "l0_p3",
            "--pool", str(world.pool_dir), "--out", str(tmp_path / "scores"), "--min-actors", "2",
            "--max-actors", "2", "--num-cpus", "1", "--batch-size", "8"]
    proc = subprocess.Popen([sys.executable, "-c", HANG_SCRIPT, ray_tmp, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the job's own process group: its driver and its Ray
        proc.communicate()
        pytest.fail("the scoring job neither finished nor failed within 120 s")
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    # Either refused up front with the keys named, or finished.
    assert proc.returncode in (0, 2), err.decode(errors="replace")[-2000:]
    if proc.returncode == 2:
        assert b"num_cpus" in err and not (tmp_path / "scores").exists()
    else:
        assert (tmp_path / "scores" / S.SUCCESS).exists()


# ---------------------------------------------------------------------------------------------
# Determinism: 1 vs 2 scorer actors


@pytest.mark.slow  # 50 s: scores the pool twice (1 and 2 actors)
def test_same_selection_on_one_and_two_actors(world, ray_local, tmp_path):
    chosen, scores = {}, {}
    for name, actors in (("one", dict(max_actors=1)), ("two", dict(min_actors=2, max_actors=2))):
        # Half a CPU per actor: on the 2-CPU test cluster two 1-CPU actors would leave none for the
        # read and write tasks, and the job would wait forever (see test_actors_taking_every_cpu).
        cfg = make_cfg(world, tmp_path / name / "scores", pooling="mean", batch_size=8, num_cpus=0.5,
                       pool={"rows_per_read_task": 20}, **actors)
        score.run(cfg)
        select.run(from_dict(SelectConfig, dict(scores=cfg.out, out=str(tmp_path / name / "sel"), fraction=0.5,
                                                write_rows=False)))
        chosen[name] = pd.read_parquet(tmp_path / name / "sel" / "igds.parquet").sort_values(S.RANK)
        scores[name] = read_parts(tmp_path / name / "scores").set_index(S.ID).sort_index()
    a, b = chosen["one"], chosen["two"]
    assert len(a) == len(b) == 100
    assert a[S.ID].tolist() == b[S.ID].tolist() and a[S.RANK].tolist() == b[S.RANK].tolist() == list(range(100))
    # Stated tolerance: batch composition (padding, micro-batches) differs between the two runs.
    np.testing.assert_allclose(a[S.SCORE].to_numpy(), b[S.SCORE].to_numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(scores["one"][S.SCORE], scores["two"][S.SCORE], rtol=0, atol=1e-6)
    assert scores["one"].index.equals(scores["two"].index)


# ---------------------------------------------------------------------------------------------
# Safety


SECRET_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import ray
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=sys.argv[1], logging_level="INFO")
    ray.data.DataContext.get_current().enable_progress_bars = False

    @ray.remote
    def worker_env(names):
        return {k: k in os.environ for k in names}

    print("WORKER_ENV", json.dumps(ray.get(worker_env.remote(json.loads(sys.argv[2])))))
    from igds_ray import cli
    score_argv, select_argv = json.loads(sys.argv[3]), json.loads(sys.argv[4])
    assert cli.main(score_argv) == 0
    assert cli.main(select_argv) == 0
    ray.shutdown()
""")


def test_secrets_never_reach_outputs_or_logs(world, tmp_path):
    """Secrets in the environment (set before Ray starts, so every worker has them) are written to
    no file of the run directory, the Ray session logs or the job's console output."""
    tag = uuid.uuid4().hex[:12]
    secrets = {
        "HF_TOKEN": f"hf_SECRET{tag}abc",
        "HUGGING_FACE_HUB_TOKEN": f"hf_SECRET{tag}def",
        "AWS_ACCESS_KEY_ID": f"AKIASECRET{tag}",
        "AWS_SECRET_ACCESS_KEY": f"awsSECRET{tag}/xyz+",
        "WANDB_API_KEY": f"wandbSECRET{tag}",
    }
    ray_tmp = tempfile.mkdtemp(prefix="igdssec", dir="/tmp")  # short: Ray's socket paths must fit
    run = tmp_path / "run"
    score_argv = ["-v", "score", "--model", str(world.model_dir), "--sae", str(world.saes["jumprelu"]),
                  "--features", ",".join(FEATS), "--pool", str(world.pool_dir), "--out", str(run / "scores"),
                  "--pooling", "max"]
    select_argv = ["-v", "select", "--scores", str(run / "scores"), "--out", str(run / "selection"),
                   "--fraction", "0.3"]
    env = {**os.environ, **secrets, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    try:
        proc = subprocess.run(
            [sys.executable, "-c", SECRET_SCRIPT, ray_tmp, json.dumps(list(secrets)),
             json.dumps(score_argv), json.dumps(select_argv)],
            env=env, capture_output=True, timeout=420,
        )
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
        assert '"HF_TOKEN": true' in proc.stdout.decode(), "the workers should have seen the secrets"
        assert (run / "scores" / S.SUCCESS).exists() and (run / "selection" / "igds.parquet" / S.SUCCESS).exists()
        leaks, n_files, control = [], 0, []
        for root in (run, Path(ray_tmp)):
            for p in root.rglob("*"):
                if p.is_file() and not p.is_symlink():
                    n_files += 1
                    data = p.read_bytes()
                    leaks += [(str(p), k) for k, v in secrets.items() if v.encode() in data]
                    if str(world.pool_dir).encode() in data:  # the search does see what the run wrote
                        control.append(p.name)
        console = proc.stdout + proc.stderr
        leaks += [("console", k) for k, v in secrets.items() if v.encode() in console]
        assert n_files > 10 and any(Path(ray_tmp).rglob("*.log")), "expected Ray session logs to search"
        assert S.SUCCESS in control, control
        assert not leaks, leaks
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_remote_code_is_off_by_default_and_passed_through(world, tmp_path, monkeypatch):
    import transformers

    from igds_ray.models import loading

    assert ModelConfig(name_or_path="m").trust_remote_code is False
    seen: list[tuple[str, object]] = []
    for cls in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        orig = cls.from_pretrained.__func__

        def spy(klass, *a, _orig=orig, _name=cls.__name__, **kw):
            seen.append((_name, kw.get("trust_remote_code", "absent")))
            return _orig(klass, *a, **kw)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    # A checkpoint that ships its own code (auto_map) must not run it unless asked.
    evil = tmp_path / "evil"
    shutil.copytree(world.model_dir, evil)
    sentinel = tmp_path / "remote_code_ran"
    code = f"open({str(sentinel)!r}, 'w').write('ran')\n"
    for mod in ("configuration_evil", "modeling_evil", "tokenization_evil"):
        (evil / f"{mod}.py").write_text(code)
    cfg_json = json.loads((evil / "config.json").read_text())
    cfg_json["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                            "AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (evil / "config.json").write_text(json.dumps(cfg_json))
    tok_json = json.loads((evil / "tokenizer_config.json").read_text())
    tok_json["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (evil / "tokenizer_config.json").write_text(json.dumps(tok_json))
    mc = ModelConfig(name_or_path=str(evil))
    try:
        loading.model_info(mc)
        loading.load_tokenizer(mc)
        loading.load_model(mc, loading.resolve_device("cpu"))
    except ConfigError:
        pass  # refusing the checkpoint is fine too
    assert not sentinel.exists(), "remote code ran without trust_remote_code"
    assert seen and all(v is False for _, v in seen), seen
    assert {n for n, _ in seen} == {"AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"}
    seen.clear()
    opted = ModelConfig(name_or_path=str(world.model_dir), trust_remote_code=True)
    loading.model_info(opted)
    loading.load_tokenizer(opted)
    loading.load_model(opted, loading.resolve_device("cpu"))
    assert {v for _, v in seen} == {True}
