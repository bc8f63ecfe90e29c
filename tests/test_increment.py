"""Incremental scoring of a growing pool (issue 14, part 1): a finished scores directory whose pool gained,
changed or lost files gets a new version in which only the new and changed files' rows go through the model
(counted by the scorers), the earlier parts are reused in place, and every pool row is there exactly once."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from igds_ray import schema as S
from igds_ray.config import ScoreConfig, SelectConfig, from_dict
from igds_ray.demo.tiny import make_rows, write_pool
from igds_ray.errors import ConfigError
from igds_ray.stages import score, select


def cfg_for(world, pool: Path, out: Path, **kw) -> ScoreConfig:
    return from_dict(ScoreConfig, {
        "model": str(world.model_dir), "sae": str(world.saes["jumprelu"]), "features": ["l0_p3", "l0_p17"],
        "pool": {"path": str(pool), "rows_per_read_task": 25}, "out": str(out), "pooling": "max", "batch_size": 25,
        "incremental": True, **kw})


def add_file(pool: Path, name: str, n: int, seed: int) -> None:
    tmp = pool.parent / f"new-{name}"
    write_pool(tmp, make_rows(n, seed=seed), n_files=1)
    shutil.move(str(tmp / "part-000.parquet"), str(pool / name))
    shutil.rmtree(tmp)


def scored(out: Path) -> pd.DataFrame:
    files = json.loads((out / S.SUCCESS).read_text())["files"]
    return pd.concat([pd.read_parquet(out / f) for f in files], ignore_index=True)


def forwarded(log_dir: Path) -> int:
    handed, fwd = score.read_forward_log(str(log_dir))
    assert handed == fwd
    return fwd


@pytest.fixture
def pool(world, tmp_path) -> Path:
    p = tmp_path / "pool"
    shutil.copytree(world.pool_dir, p)
    return p


def test_new_files_are_the_only_rows_forwarded(world, ray_local, pool, tmp_path):
    out = tmp_path / "scores"
    v1 = score.run(cfg_for(world, pool, out), hooks={"forward_log": str(tmp_path / "f1")})
    assert v1["version"] == 1 and forwarded(tmp_path / "f1") == 200
    again = score.run(cfg_for(world, pool, out), hooks={"forward_log": str(tmp_path / "f0")})
    assert again == v1 and forwarded(tmp_path / "f0") == 0  # nothing changed: nothing scored

    add_file(pool, "part-002.parquet", 50, seed=5)
    v2 = score.run(cfg_for(world, pool, out), hooks={"forward_log": str(tmp_path / "f2")})
    assert forwarded(tmp_path / "f2") == 50
    assert (v2["version"], v2["rows"], v2["reused_rows"], v2["scored_rows"]) == (2, 250, 200, 50)
    assert v2["carried_rows"] == 0 and v2["dropped_parts"] == 0
    assert v2["added_files"] == ["part-002.parquet"] and not v2["changed_files"] and not v2["removed_files"]
    assert set(v1["files"]) <= set(v2["files"])  # reused in place, not copied
    assert [v["version"] for v in v2["versions"]] == [1, 2]
    on_disk = {n for n in os.listdir(out) if n.endswith(".parquet")}
    assert on_disk == set(v2["files"]) and not any(n.startswith("_attempt") for n in os.listdir(out))
    df = scored(out)
    assert len(df) == 250 and not df.duplicated([S.SRC_FILE, S.SRC_ROW]).any()
    # the same scores as the grown pool scored from scratch
    fresh = score.run(cfg_for(world, pool, tmp_path / "fresh", incremental=False))
    assert fresh["rows"] == 250
    a = df.set_index([S.SRC_FILE, S.SRC_ROW]).sort_index()
    b = pd.read_parquet(tmp_path / "fresh").set_index([S.SRC_FILE, S.SRC_ROW]).sort_index()
    assert (a.index == b.index).all() and (a[S.ID] == b[S.ID]).all()
    np.testing.assert_allclose(a[S.SCORE], b[S.SCORE], rtol=1e-5, atol=1e-6)
    # select reads the version as one pool
    m = select.run(from_dict(SelectConfig, dict(scores=str(out), out=str(tmp_path / "sel"), arm="igds",
                                                fraction=0.5, write_rows=False)))
    assert m["rows_scored"] == 250 and m["rows"] == 125


def test_a_changed_file_is_rescored_and_a_removed_one_dropped(world, ray_local, pool, tmp_path):
    out = tmp_path / "scores"
    add_file(pool, "part-002.parquet", 40, seed=6)
    v1 = score.run(cfg_for(world, pool, out))
    assert v1["rows"] == 240
    add_file(pool, "part-001.parquet", 80, seed=7)  # the same name, other rows
    os.remove(pool / "part-002.parquet")
    v2 = score.run(cfg_for(world, pool, out), hooks={"forward_log": str(tmp_path / "f2")})
    assert v2["changed_files"] == ["part-001.parquet"] and v2["removed_files"] == ["part-002.parquet"]
    # part-000's rows are reused in place, or carried out of parts they shared with the changed or removed files
    assert v2["rows"] == 180 and v2["reused_rows"] + v2["carried_rows"] == 100 and v2["scored_rows"] == 80
    assert forwarded(tmp_path / "f2") == 80
    assert {n for n in os.listdir(out) if n.endswith(".parquet")} == set(v2["files"])  # dropped parts deleted
    df = scored(out)
    assert sorted(df[S.SRC_FILE].unique()) == ["part-000.parquet", "part-001.parquet"]
    assert len(df) == 180 and not df.duplicated([S.SRC_FILE, S.SRC_ROW]).any()
    new = pq.read_table(pool / "part-001.parquet").to_pandas()
    got = df[df[S.SRC_FILE] == "part-001.parquet"].sort_values(S.SRC_ROW)
    assert got[S.SRC_ROW].tolist() == list(range(80)) and len(new) == 80


def test_an_interrupted_increment_resumes_exactly_once(world, ray_local, pool, tmp_path):
    out = tmp_path / "scores"
    score.run(cfg_for(world, pool, out))
    add_file(pool, "part-002.parquet", 50, seed=8)
    add_file(pool, "part-003.parquet", 50, seed=9)
    # Each batch waits 1 s, so the first batches' parts are written before the third one raises (as in test_s3).
    with pytest.raises(Exception, match="test hook"):
        score.run(cfg_for(world, pool, out), hooks={"raise_after_batches": 3, "batch_delay_s": 1.0})
    before = json.loads((out / S.SUCCESS).read_text())
    assert before["version"] == 1 and len(scored(out)) == 200  # the committed version is untouched
    staged = [p for p in out.glob("_attempt-*/*.parquet")]
    done = sum(pq.ParquetFile(p).metadata.num_rows for p in staged)
    assert 0 < done < 100
    v2 = score.run(cfg_for(world, pool, out), hooks={"forward_log": str(tmp_path / "f2")})
    assert forwarded(tmp_path / "f2") == 100 - done
    assert (v2["version"], v2["rows"], v2["reused_rows"], v2["resumed_rows"]) == (2, 300, 200, done)
    df = scored(out)
    assert len(df) == 300 and not df.duplicated([S.SRC_FILE, S.SRC_ROW]).any()


def test_an_increment_with_another_config_is_refused(world, ray_local, pool, tmp_path):
    out = tmp_path / "scores"
    score.run(cfg_for(world, pool, out))
    add_file(pool, "part-002.parquet", 10, seed=10)
    with pytest.raises(ConfigError, match="another igds config"):
        score.run(cfg_for(world, pool, out, pooling="mean"))
    from igds_ray.stages.protocol import run_stage

    cfg = cfg_for(world, pool, tmp_path / "z")
    with pytest.raises(ConfigError, match="needs a method that scores each row on its own"):
        run_stage("zip", cfg, cfg.pool, cfg.out, False, lambda ds, p: ds, resumable=False, incremental=True)
