"""A pool read task carries only its own chunk (issue 12, part 2): its pickled size does not grow with the pool."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.cloudpickle as cloudpickle

from igds_ray.pool import Pool, PoolFile, discover, make_datasource


def _pool(n_files: int) -> Pool:
    files = tuple(PoolFile(f"/pool/part-{i:06d}.parquet", f"part-{i:06d}.parquet", (1000,) * 5, 1 << 20)
                  for i in range(n_files))
    return Pool("/pool", files, ("prompt", "response"), "id", pa.string())


def test_a_read_task_pickles_to_the_same_size_at_20_and_10000_files() -> None:
    small = make_datasource(_pool(20), 8192).get_read_tasks(1)
    big = make_datasource(_pool(10_000), 8192).get_read_tasks(1)
    assert len(small) == 20 and len(big) == 10_000
    sizes = {len(cloudpickle.dumps(t)) for t in (small[0], small[-1], big[0], big[5000], big[-1])}
    assert len(sizes) == 1 and sizes.pop() < 2048  # was 751,569 bytes per task at 10,000 files


def test_a_read_task_reads_its_rows_and_skips_the_finished_ones(tmp_path) -> None:
    for i in range(3):
        pq.write_table(pa.table({"id": [f"f{i}-{j}" for j in range(30)], "prompt": [f"p{j}" for j in range(30)],
                                 "response": ["r"] * 30}), tmp_path / f"part-{i}.parquet", row_group_size=10)
    pool = discover(str(tmp_path), ("prompt", "response"), "id")
    done = {"part-1.parquet": np.array([[0, 3], [25, 26]], dtype=np.int64)}  # [start, end) runs
    tasks = make_datasource(pool, 20, done).get_read_tasks(1)
    blocks = [b for t in tasks for b in t()]
    table = pa.concat_tables(blocks)
    keys = set(zip(table.column("src_file").to_pylist(), table.column("src_row").to_pylist()))
    want = {(f"part-{i}.parquet", r) for i in range(3) for r in range(30)} - {("part-1.parquet", r) for r in (0, 1, 2, 25)}
    assert keys == want and table.num_rows == len(want)
    row = table.filter(pc.equal(table.column("id"), "f2-17")).to_pylist()[0]
    assert (row["src_file"], row["src_row"], row["prompt"]) == ("part-2.parquet", 17, "p17")
    assert sum(t.metadata.num_rows for t in tasks) == len(want)


def test_the_read_task_size_comes_from_the_footers(tmp_path) -> None:
    rng = np.random.default_rng(0)  # distinct texts: no dictionary encoding shrinks them
    texts = ["".join(rng.choice(list("abcdefgh"), 1000)) for _ in range(50)]
    pq.write_table(pa.table({"meta": [{"a": 1}] * 50, "id": [str(i) for i in range(50)], "prompt": texts,
                             "response": ["y"] * 50}), tmp_path / "part-0.parquet", compression="none")
    pool = discover(str(tmp_path), ("prompt", "response"), "id")
    per_row = pool.files[0].read_bytes / 50
    assert 1000 < per_row < 1100  # the nested column before them is not counted
    assert pool.rows_per_read_task() == int((64 << 20) / per_row)
    assert pool.rows_per_read_task(target_bytes=1 << 20) == 8192  # never below the floor
    assert pool.rows_per_read_task(target_bytes=1 << 40) == 131072  # nor above the cap
