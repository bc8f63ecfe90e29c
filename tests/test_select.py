"""Selection: exact, deterministic top fraction / top n with ties broken by id, rows fetched back."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from igds_ray import schema as S
from igds_ray.config import SelectConfig, from_dict
from igds_ray.errors import ConfigError, StageOutputError
from igds_ray.stages import select
from igds_ray.stages.select import keep_count
from igds_ray.storage import StageDir


def write_scored_world(root, n=600, n_files=3, seed=0):
    """A pool and a finished scores directory for it, with many tied scores and some error rows."""
    rng = np.random.default_rng(seed)
    pool = root / "pool"
    pool.mkdir(parents=True)
    scores = StageDir(str(root / "scores"))
    staging = scores.begin()
    per = n // n_files
    files = []
    for f in range(n_files):
        rel = f"p{f}.parquet"
        files.append(rel)
        prompts = [f"prompt {f}-{i}" for i in range(per)]
        pq.write_table(pa.table({"prompt": prompts, "response": [f"resp {f}-{i}" for i in range(per)]}),
                       pool / rel, row_group_size=70)
        sc = rng.integers(0, 20, per).astype(float)  # heavy ties
        err = rng.random(per) < 0.05
        pq.write_table(pa.table({
            S.ID: [f"{rel}:{i}" for i in range(per)],
            S.SCORE: pa.array([None if e else s for s, e in zip(sc, err)], pa.float64()),
            S.SRC_FILE: [rel] * per,
            S.SRC_ROW: pa.array(range(per), pa.int64()),
            S.ERROR: [("bad" if e else None) for e in err],
        }), f"{staging}/part-{f}.parquet", row_group_size=50)
    scores.commit(staging, {"stage": "score", "rows": n, "pool": {
        "uri": str(pool), "files": files, "id_column": None, "text_columns": ["prompt", "response"]}})
    return pool, root / "scores"


@pytest.fixture(scope="module")
def scored_world(tmp_path_factory):
    return write_scored_world(tmp_path_factory.mktemp("sel"))


def expected_top(scores_dir, k):
    df = pd.read_parquet(scores_dir)
    df = df[df[S.SCORE].notna()]
    return df.sort_values([S.SCORE, S.ID], ascending=[False, True]).head(k)


@pytest.mark.parametrize("fraction", [0.5, 0.1, 1.0])
def test_top_fraction_is_exact_with_ties(ray_local, scored_world, tmp_path, fraction):
    pool, scores = scored_world
    m = select.run(from_dict(SelectConfig, dict(scores=str(scores), out=str(tmp_path), fraction=fraction)))
    got = pd.read_parquet(tmp_path / "igds.parquet").sort_values(S.RANK)
    n_scored = int(pd.read_parquet(scores)[S.SCORE].notna().sum())
    k = int(np.floor(fraction * n_scored + 1e-9))
    exp = expected_top(scores, k)
    assert m["rows"] == len(got) == k and m["rows_scored"] == n_scored
    assert list(got[S.ID]) == list(exp[S.ID])
    assert list(got[S.RANK]) == list(range(k))
    assert m["cutoff"]["id"] == exp[S.ID].iloc[-1]
    # The chosen rows are the pool's own rows.
    pool_df = pd.concat({f.name: pd.read_parquet(f) for f in sorted(pool.glob("*.parquet"))}).reset_index()
    pool_df[S.ID] = pool_df["level_0"] + ":" + pool_df["level_1"].astype(str)
    merged = got.merge(pool_df[[S.ID, "prompt", "response"]], on=S.ID, suffixes=("", "_pool"))
    assert len(merged) == k
    assert (merged["prompt"] == merged["prompt_pool"]).all() and (merged["response"] == merged["response_pool"]).all()


def test_top_n_and_determinism(ray_local, scored_world, tmp_path):
    _, scores = scored_world
    a = select.run(from_dict(SelectConfig, dict(scores=str(scores), out=str(tmp_path / "a"), n=37, fraction=None,
                                                 write_rows=False)))
    select.run(from_dict(SelectConfig, dict(scores=str(scores), out=str(tmp_path / "b"), n=37, fraction=None,
                                                 write_rows=False)))
    ga = pd.read_parquet(tmp_path / "a" / "igds.parquet").sort_values(S.RANK)
    gb = pd.read_parquet(tmp_path / "b" / "igds.parquet").sort_values(S.RANK)
    assert a["rows"] == 37 and list(ga[S.ID]) == list(gb[S.ID]) == list(expected_top(scores, 37)[S.ID])
    assert "prompt" not in ga.columns


def test_errors_and_bad_requests(ray_local, scored_world, tmp_path):
    _, scores = scored_world
    with pytest.raises(ConfigError, match="only .* rows have a score"):
        select.run(from_dict(SelectConfig, dict(scores=str(scores), out=str(tmp_path / "x"), n=10_000, fraction=None)))
    with pytest.raises(StageOutputError, match="not a finished stage directory"):
        select.run(from_dict(SelectConfig, dict(scores=str(tmp_path / "nothing"), out=str(tmp_path / "y"))))


def test_keep_count():
    assert keep_count(10, 0.5, None) == 5
    assert keep_count(5, 0.5, None) == 2
    assert keep_count(3, 0.1, None) == 1
    assert keep_count(0, 0.5, None) == 0
    assert keep_count(10, None, 10) == 10
