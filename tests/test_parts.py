"""Exactly-once in O(parts) (issue 12, part 1): the parts' summaries catch a missing row, a row twice, a part
of another pool; resume runs come from footers; duplicate ids are counted the same in the driver and in Ray."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from igds_ray import schema as S
from igds_ray.errors import StageOutputError
from igds_ray.pool import discover
from igds_ray.stages import parts as P
from igds_ray.storage import write_part

FP = "fingerprint-of-this-attempt"


@pytest.fixture()
def pool(tmp_path):
    root = tmp_path / "pool"
    root.mkdir()
    for i in range(3):
        pq.write_table(pa.table({"id": [f"f{i}-{j}" for j in range(30)], "prompt": ["p"] * 30,
                                 "response": ["r"] * 30}), root / f"part-{i}.parquet", row_group_size=10)
    return discover(str(root), ("prompt", "response"), "id")


def scores(keys: list[tuple[str, int]], ids: list | None = None) -> pa.Table:
    n = len(keys)
    return pa.table({
        S.ID: pa.array(ids if ids is not None else [f"{f}:{r}" for f, r in keys]),
        S.SCORE: pa.array([1.0] * n, pa.float64()),
        S.N_TOKENS: pa.array([5] * n, pa.int32()),
        S.TRUNCATED: pa.array([r % 7 == 0 for _, r in keys], pa.bool_()),
        S.ERROR: pa.array(["bad" if r == 3 else None for _, r in keys], pa.string()),
        S.SRC_FILE: pa.array([f for f, _ in keys], pa.string()),
        S.SRC_ROW: pa.array([r for _, r in keys], pa.int64()),
    })


def write(tmp_path, groups: list[list[tuple[str, int]]], fp: str = FP) -> tuple[list[str], P.Tally]:
    d = tmp_path / "staging"
    d.mkdir(exist_ok=True)
    fs = pafs.LocalFileSystem()
    tally, paths = P.Tally(), []
    for i, keys in enumerate(groups):
        t = scores(keys)
        s = P.summarize(t, fp)
        paths.append(write_part(fs, str(d), f"part-{i}.parquet", P.with_summary(t, s)))
        tally.add(f"part-{i}.parquet", P.read_summary(fs, paths[-1]), FP)  # from the footer
    return paths, tally


def every_row(pool) -> list[tuple[str, int]]:
    return [(f.rel, r) for f in pool.files for r in range(f.num_rows)]


def test_complete_parts_pass_and_their_counts_add_up(pool, tmp_path) -> None:
    keys = every_row(pool)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(keys))  # any order, any split into parts
    paths, tally = write(tmp_path, [[keys[i] for i in order[a:b]] for a, b in ((0, 17), (17, 60), (60, 90))])
    P.check(tally, pool, pafs.LocalFileSystem(), paths, "igds", "out")
    assert (tally.rows, tally.parts, tally.tokens) == (90, 3, 450)
    assert tally.errors == 3 and tally.truncated == 3 * 5  # row 3 of each file; rows 0, 7, 14, 21, 28
    assert tally.checksum == P.pool_checksum((f.rel, f.num_rows) for f in pool.files)


@pytest.mark.parametrize("change, message", [
    ("missing", r"wrote 89 rows for a pool of 90 \(1 file\(s\) with a wrong row count, e.g. 'part-1.parquet': 29 of 30\)"),
    ("twice", r"wrote 91 rows for a pool of 90 \(1 file\(s\) with a wrong row count, e.g. 'part-2.parquet': 31 of 30\)"),
    ("swap", r"wrote 90 rows for a pool of 90 \(every file has its row count, but some row is there twice and "
             r"another is missing\)"),
    ("unknown", r"wrote 90 rows for a pool of 90 \(rows of 1 file\(s\) not in the pool, e.g. 'other.parquet'\)"),
])
def test_the_check_names_a_missing_row_a_row_twice_and_rows_of_another_pool(pool, tmp_path, change, message) -> None:
    keys = every_row(pool)
    if change == "missing":
        keys.remove(("part-1.parquet", 12))
    elif change == "twice":
        keys.append(("part-2.parquet", 29))
    elif change == "swap":  # same count per file: only the checksum sees it
        keys[keys.index(("part-0.parquet", 5))] = ("part-0.parquet", 6)
    else:
        keys[keys.index(("part-0.parquet", 5))] = ("other.parquet", 5)
    paths, tally = write(tmp_path, [keys[:45], keys[45:]])
    with pytest.raises(StageOutputError, match=message + ": not committing out"):
        P.check(tally, pool, pafs.LocalFileSystem(), paths, "igds", "out")


def test_a_part_of_another_attempt_or_without_a_summary_is_named(pool, tmp_path) -> None:
    keys = every_row(pool)
    paths, tally = write(tmp_path, [keys], fp="another config")
    with pytest.raises(StageOutputError, match=r"1 part\(s\) were not written by this attempt .* e.g. part-0.parquet"):
        P.check(tally, pool, pafs.LocalFileSystem(), paths, "igds", "out")
    bare = tmp_path / "bare.parquet"
    pq.write_table(scores(keys), bare)
    assert P.read_summary(pafs.LocalFileSystem(), str(bare)) is None


def test_runs_come_from_footers_and_merge_or_refuse_overlaps(tmp_path) -> None:
    t = scores([("a", r) for r in (5, 3, 4, 9, 10)] + [("b", 0)])
    s = P.summarize(t, FP)
    assert s["runs"] == {"a": [[3, 6], [9, 11]], "b": [[0, 1]]}
    other = P.summarize(scores([("a", 6), ("a", 7), ("a", 8)]), FP)
    merged = P.merge_runs([s, other])
    assert merged["a"].tolist() == [[3, 11]] and merged["b"].tolist() == [[0, 1]]  # touching runs coalesce
    assert P.merge_runs([s, P.summarize(scores([("a", 10)]), FP)]) is None  # row 10 in two parts
    scattered = P.summarize(scores([("a", 2 * r) for r in range(P.MAX_RUNS + 1)]), FP)
    assert scattered["runs"] is None and scattered["rows"] == P.MAX_RUNS + 1  # not reusable on resume
    assert P.summarize(scores([("a", 1), ("a", 1)]), FP)["runs"] is None  # a row twice in one part


@pytest.mark.parametrize("ids", ["string", "integer"])
def test_duplicate_ids_are_counted_the_same_in_the_driver_and_in_ray(ray_local, tmp_path, ids) -> None:
    fs = pafs.LocalFileSystem()
    rng = np.random.default_rng(1)
    values = rng.integers(0, 2500, size=4000)  # about 1,300 repeats, some ids three or more times
    want = len(values) - len(np.unique(values))
    d = tmp_path / "parts"
    d.mkdir()
    paths = []
    for i in range(4):
        chunk = values[i * 1000:(i + 1) * 1000]
        col = [f"id-{v}" for v in chunk] if ids == "string" else chunk.tolist()
        paths.append(write_part(fs, str(d), f"part-{i}.parquet", scores([("a", r) for r in range(1000)], col)))
    assert P.count_duplicate_ids(fs, paths, 4000) == (want, "driver")
    assert P.count_duplicate_ids(fs, paths, 4000, limit=0) == (want, "ray_data")
