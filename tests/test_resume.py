"""Whole-job kill and resume: a scoring job SIGKILLed (driver, its Ray, everything) after some parts
are committed is rerun with the same command; the rerun scores only the rows the finished parts lack
(counted by the scorers themselves), and the output equals an uninterrupted run's.

The killed job runs in its own process group and its own Ray (`start_new_session`), so one killpg
takes down the driver, the raylet and the workers at once, as a lost head node would.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from igds_ray import schema as S
from igds_ray.config import ScoreConfig, from_dict
from igds_ray.errors import RunLocked
from igds_ray.stages import score
from igds_ray.storage import LOCK

FEATS = ["l0_p3", "l0_p17", "l0_p40"]
ROOT = Path(__file__).resolve().parents[1]

# The `igds` CLI in a fresh driver with its own 2-CPU Ray (short temp dir: Ray's socket paths must fit).
JOB = textwrap.dedent("""
    import sys
    import ray
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=sys.argv[1], log_to_driver=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    from igds_ray import cli
    sys.exit(cli.main(sys.argv[2:]))
""")


def job_config(world, out: Path) -> dict:
    """20-row read tasks and batches (10 for the 200-row pool), one scorer actor."""
    return dict(model=str(world.model_dir), sae=str(world.saes["jumprelu"]), features=FEATS, out=str(out),
                pool={"path": str(world.pool_dir), "rows_per_read_task": 20}, pooling="max", batch_size=20,
                max_actors=1)


def score_argv(world, out: Path) -> list[str]:
    """`igds score --config <yaml>` for `job_config`."""
    import yaml

    cfg = out.parent / f"{out.name}.yaml"
    cfg.write_text(yaml.safe_dump(job_config(world, out)))
    return ["score", "--config", str(cfg)]


def start_job(argv: list[str], hooks: dict | None = None) -> tuple[subprocess.Popen, str]:
    ray_tmp = tempfile.mkdtemp(prefix="igdsres", dir="/tmp")
    env = {**os.environ, "PYTHONPATH": str(ROOT), score.HOOKS_ENV: json.dumps(hooks or {})}
    proc = subprocess.Popen([sys.executable, "-c", JOB, ray_tmp, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, start_new_session=True)
    return proc, ray_tmp


def committed_parts(out: Path) -> dict[str, int]:
    """Finished parts of the unfinished attempt and their row counts (from their footers)."""
    parts = {}
    for attempt in out.glob("_attempt-*"):
        for p in attempt.glob("part-*.parquet"):
            try:
                parts[str(p)] = pq.ParquetFile(p).metadata.num_rows
            except Exception:  # noqa: BLE001 - cannot happen (parts appear by rename), but never count it
                pass
    return parts


def wait_for_rows(out: Path, rows: int, proc: subprocess.Popen, timeout: float = 240) -> dict[str, int]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        parts = committed_parts(out)
        if sum(parts.values()) >= rows:
            return parts
        if proc.poll() is not None:
            pytest.fail(f"the job ended (rc {proc.returncode}) before {rows} rows were committed: "
                        f"{proc.stderr.read().decode(errors='replace')[-3000:]}")
        time.sleep(0.2)
    pytest.fail(f"fewer than {rows} rows committed within {timeout} s: {committed_parts(out)}")


def kill_job(proc: subprocess.Popen, ray_tmp: str) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver's process group: the driver and its Ray
    except ProcessLookupError:
        pass
    proc.communicate()
    shutil.rmtree(ray_tmp, ignore_errors=True)


def run_job(argv: list[str], hooks: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    proc, ray_tmp = start_job(argv, hooks)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_job(proc, ray_tmp)
        pytest.fail(f"the job did not finish within {timeout} s")
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def reference(world, ray_local, tmp_path_factory):
    """An uninterrupted run of the same scoring job."""
    out = tmp_path_factory.mktemp("ref") / "scores"
    score.run(from_dict(ScoreConfig, job_config(world, out)))
    return pd.read_parquet(out)


def kill_and_resume(world, reference, tmp_path, fresh_driver: bool) -> tuple[int, int]:
    """Kill, rerun, check everything; returns (rows finished before the kill, rows the rerun forwarded)."""
    out = tmp_path / "scores"
    argv = score_argv(world, out)
    cfg = from_dict(ScoreConfig, job_config(world, out))
    # First run: the scorer stops making progress after 3 batches (60 rows), so exactly those are
    # committed when the whole job is killed; its lock is held all along.
    proc, ray_tmp = start_job(argv, hooks={"stall_after_batches": 3})
    try:
        parts = wait_for_rows(out, 60, proc)
        # A second run of the same job meanwhile is refused at once, naming the holder.
        holder = rf"{re.escape(str(out))} is locked by igds scoring on host {re.escape(socket.gethostname())}, " \
                 rf"pid {proc.pid}, started \d{{4}}-\d\d-\d\dT"
        if fresh_driver:
            second = run_job(argv)
            err = second.stderr.decode(errors="replace")
            assert second.returncode == 2 and re.search(holder, err), err[-3000:]
        else:
            with pytest.raises(RunLocked, match=holder):
                score.run(cfg)
        assert committed_parts(out) == parts, "the refused run must not touch the directory"
    finally:
        kill_job(proc, ray_tmp)
    parts = committed_parts(out)
    done_rows = sum(parts.values())
    assert 0 < done_rows < 200 and not (out / S.SUCCESS).exists()

    # Rerun: only the rows the finished parts lack go through the scorers (they count them).
    log_dir = tmp_path / "forward"
    if fresh_driver:  # the same command, in a fresh driver and Ray
        rerun = run_job(argv, hooks={"forward_log": str(log_dir)})
        assert rerun.returncode == 0, rerun.stderr.decode(errors="replace")[-3000:]
    else:  # the same job on the test session's Ray
        score.run(cfg, hooks={"forward_log": str(log_dir)})
    handed, forwarded = score.read_forward_log(str(log_dir))
    assert forwarded == handed == 200 - done_rows, (handed, forwarded, done_rows)

    manifest = json.loads((out / S.SUCCESS).read_text())
    assert manifest["rows"] == 200 and manifest["resumed_rows"] == done_rows
    assert manifest["scored_rows"] == 200 - done_rows and manifest["resumed_parts"] == len(parts)
    names = set(os.listdir(out))
    assert not any(n.startswith("_attempt") for n in names) and LOCK in names
    assert {n for n in names if n.endswith(".parquet")} == set(manifest["files"])
    assert {Path(p).name for p in parts} <= set(manifest["files"])  # the parts finished before the kill

    # Same rows, ids and scores as the uninterrupted run; each id exactly once.
    df = pd.read_parquet(out)
    assert len(df) == 200 and df[S.ID].is_unique and not df.duplicated([S.SRC_FILE, S.SRC_ROW]).any()
    a, b = df.set_index(S.ID).sort_index(), reference.set_index(S.ID).sort_index()
    assert a.index.equals(b.index)
    assert (a[S.SRC_FILE] == b[S.SRC_FILE]).all() and (a[S.SRC_ROW] == b[S.SRC_ROW]).all()
    assert (a[S.N_TOKENS] == b[S.N_TOKENS]).all() and a[S.ERROR].isna().all()
    # Stated tolerance: the batches (and so the padding) of the two runs differ.
    np.testing.assert_allclose(a[S.SCORE], b[S.SCORE], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.stack(a[S.ACTS]), np.stack(b[S.ACTS]), rtol=1e-5, atol=1e-6)

    # And another run of the finished directory changes nothing.
    if fresh_driver:
        assert run_job(argv).returncode == 0
    else:
        score.run(cfg)
    assert json.loads((out / S.SUCCESS).read_text())["committed_at"] == manifest["committed_at"]
    assert len(pd.read_parquet(out)) == 200
    return done_rows, forwarded


@pytest.mark.slow  # 130 s: kills a whole scoring job and resumes it (test_reliability kills one actor in CI)
def test_kill_whole_job_then_rerun_scores_only_the_unfinished_rows(world, reference, tmp_path):
    """The killed job is a real driver process; the refused second run and the rerun use this
    session's Ray (cheap)."""
    done, forwarded = kill_and_resume(world, reference, tmp_path, fresh_driver=False)
    assert done > 0 and forwarded == 200 - done


@pytest.mark.slow
def test_kill_whole_job_then_rerun_the_same_command_in_fresh_drivers(world, reference, tmp_path):
    """Every run is `igds score` in its own driver and Ray, as an operator would rerun it."""
    done, forwarded = kill_and_resume(world, reference, tmp_path, fresh_driver=True)
    assert done > 0 and forwarded == 200 - done


def test_changed_config_or_pool_does_not_resume(world, ray_local, tmp_path):
    """An unfinished attempt is kept only for the same method, config and pool files; runtime knobs
    (batch size, actors, CPUs) may change between the runs."""
    from igds_ray import pool as P
    from igds_ray.storage import StageDir

    base = dict(model=str(world.model_dir), sae=str(world.saes["jumprelu"]), features=FEATS,
                pool={"path": str(world.pool_dir)}, out=str(tmp_path / "o"))
    cfg = from_dict(ScoreConfig, base)
    pool = P.discover(cfg.pool.path, cfg.pool.text_columns, cfg.pool.id_column)
    fp = score.fingerprint("igds", cfg, pool)
    same = from_dict(ScoreConfig, {**base, "batch_size": 7, "max_actors": 3, "num_cpus": 0.5,
                                   "pool": {"path": str(world.pool_dir), "rows_per_read_task": 5}})
    assert score.fingerprint("igds", same, pool) == fp
    assert score.fingerprint("loss+ifd", cfg, pool) != fp
    assert score.fingerprint("igds", from_dict(ScoreConfig, {**base, "pooling": "mean"}), pool) != fp
    assert score.fingerprint("igds", from_dict(ScoreConfig, {**base, "features": ["l0_p3"]}), pool) != fp

    d = StageDir(str(tmp_path / "o"))
    first = d.begin(fingerprint=fp)
    (Path(first) / "part-x.parquet").write_bytes(b"stand-in")
    assert d.begin(fingerprint=fp) == first and d.resumed  # same fingerprint: kept
    assert (Path(first) / "part-x.parquet").exists()
    other = d.begin(fingerprint="something else")  # another: cleared, a fresh attempt
    assert other != first and not Path(first).exists() and not d.resumed
    assert d.begin() != other and not Path(other).exists()  # no fingerprint: never resumed
