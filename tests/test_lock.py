"""Two runs on one directory: the second is refused at once, naming the holder; a killed holder
leaves no stale lock (local paths: the kernel drops a dead process's flock); nesting works.

The holder is a real second process (`hold`); the run refused is this one, or the `igds` CLI in a
third. (The whole-job version, a scoring job SIGKILLed mid-run, is in test_resume.py; the object
store lease in test_s3.py.)
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from igds_ray import pipeline
from igds_ray import schema as S
from igds_ray.config import ScoreConfig, SelectConfig, from_dict, to_dict
from igds_ray.errors import RunLocked, StageOutputError
from igds_ray.stages import score, select
from igds_ray.storage import LOCK, StageDir, lock

ROOT = Path(__file__).resolve().parents[1]
HOLD = textwrap.dedent("""
    import json, os, sys, time
    from igds_ray.storage import lock
    with lock(sys.argv[1], sys.argv[2]):
        print(json.dumps({"pid": os.getpid()}), flush=True)
        time.sleep(3600)
""")


class Holder:
    """Another process holding `<dir>/_LOCK` until killed."""

    def __init__(self, directory: Path, what: str = "igds run") -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", HOLD, str(directory), what], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        line = self.proc.stdout.readline()
        assert line, self.proc.stderr.read()
        self.pid = json.loads(line)["pid"]

    def holder_re(self, directory: Path, what: str) -> str:
        return (rf"{re.escape(str(directory))} is locked by {re.escape(what)} on host "
                rf"{re.escape(socket.gethostname())}, pid {self.pid}, started \d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\dZ")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.communicate()

    def __enter__(self) -> "Holder":
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.kill()


def small_pool(tmp_path: Path) -> Path:
    pool = tmp_path / "pool"
    pool.mkdir()
    pq.write_table(pa.table({"prompt": [f"Tom has {i} apples." for i in range(12)], "response": ["ok"] * 12}),
                   pool / "a.parquet")
    pq.write_table(pa.table({"prompt": [f"A cat sells {i} stones." for i in range(8)], "response": ["ok"] * 8}),
                   pool / "b.parquet")
    return pool


def cfg_for(world, pool: Path, out: Path) -> ScoreConfig:
    return from_dict(ScoreConfig, dict(model=str(world.model_dir), sae=str(world.saes["jumprelu"]),
                                       features=["l0_p3", "l0_p17"], pool={"path": str(pool)}, out=str(out),
                                       batch_size=8))


def test_second_run_is_refused_then_runs_once_the_holder_is_killed(world, ray_local, tmp_path):
    pool, out = small_pool(tmp_path), tmp_path / "scores"
    cfg = cfg_for(world, pool, out)
    with Holder(out, "igds scoring") as h:
        with pytest.raises(RunLocked, match=h.holder_re(out, "igds scoring")):
            score.run(cfg)
        # Refused before anything was written: no attempt, no marker, no output.
        assert sorted(os.listdir(out)) == [LOCK]
        h.kill()  # SIGKILL: no cleanup ran in the holder
    m = score.run(cfg)  # the kernel dropped the dead holder's lock
    df = pd.read_parquet(out)
    assert m["rows"] == len(df) == 20 and df[S.ID].is_unique
    assert set(df[S.ID]) == {f"a.parquet:{r}" for r in range(12)} | {f"b.parquet:{r}" for r in range(8)}
    assert LOCK in os.listdir(out) and (out / S.SUCCESS).exists()
    assert json.loads((out / S.SUCCESS).read_text())["files"] == sorted(
        n for n in os.listdir(out) if n.endswith(".parquet"))

    # A finished directory is skipped without a lock, but overwriting it needs one; select's own
    # output is locked the same way.
    sel = tmp_path / "sel"
    with Holder(out, "igds scoring") as h:
        with pytest.raises(RunLocked, match=h.holder_re(out, "igds scoring")):
            score.run(from_dict(ScoreConfig, {**to_dict(cfg), "overwrite": True}))
        assert score.run(cfg)["committed_at"] == m["committed_at"]
    with Holder(sel / "igds.parquet", "select igds") as h:
        with pytest.raises(RunLocked, match=h.holder_re(sel / "igds.parquet", "select igds")):
            select.run(from_dict(SelectConfig, dict(scores=str(out), out=str(sel), fraction=0.5)))
    assert pd.read_parquet(out).shape[0] == 20  # intact
    m = select.run(from_dict(SelectConfig, dict(scores=str(out), out=str(sel), fraction=0.5)))
    assert m["rows"] == len(pd.read_parquet(sel / "igds.parquet")) == 10


def test_cli_reports_the_holder_and_exits_2(world, tmp_path):
    pool, out = small_pool(tmp_path), tmp_path / "scores"
    with Holder(out, "igds scoring") as h:
        proc = subprocess.run(
            [sys.executable, "-m", "igds_ray.cli", "score", "--model", str(world.model_dir), "--sae",
             str(world.saes["jumprelu"]), "--features", "l0_p3", "--pool", str(pool), "--out", str(out)],
            capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert re.search(r"igds score: error: " + h.holder_re(out, "igds scoring"), proc.stderr), proc.stderr


def test_pipeline_run_is_refused_while_its_run_directory_is_locked(world, tmp_path):
    run_dir = tmp_path / "run"
    cfg = from_dict(pipeline.RunConfig, dict(
        model=str(world.model_dir), sae=str(world.saes["jumprelu"]), run_dir=str(run_dir),
        task=dict(source=str(tmp_path / "task.parquet"), split=None, dev_split=None),
        pool=dict(path=str(world.pool_dir)), arms=["igds"]))
    with Holder(run_dir, "igds run") as h:
        with pytest.raises(RunLocked, match=h.holder_re(run_dir, "igds run")):
            pipeline.run(cfg)
    assert os.listdir(run_dir) == [LOCK]  # nothing else was written


def test_locks_nest_within_a_process_and_exclude_other_processes(tmp_path):
    run = tmp_path / "run"
    with lock(str(run), "igds run") as outer:
        with lock(str(run), "igds run"):  # re-entrant: the same directory again
            with lock(str(run / "scores"), "igds scoring"):  # a stage inside the run
                outer.check()
        outer.check()  # still held after the inner release
        holder = json.loads((run / LOCK).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        # Another process is refused while this one holds it...
        proc = subprocess.run([sys.executable, "-c", HOLD, str(run), "x"], capture_output=True, text=True,
                              timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert proc.returncode != 0 and "is locked by igds run" in proc.stderr and f"pid {os.getpid()}" in proc.stderr
    # ... and gets it once released.
    with Holder(run, "other") as h:
        with pytest.raises(RunLocked, match=h.holder_re(run, "other")):
            with lock(str(run)):
                pass
    with pytest.raises(RunLocked, match="does not hold the lock"):
        lock(str(run)).check()


def test_lock_file_is_neither_cleared_nor_read_as_data(tmp_path):
    d = StageDir(str(tmp_path / "out"))
    with d.lock() as held:
        staging = d.begin()
        pq.write_table(pa.table({"x": [1, 2]}), Path(staging) / "part-0.parquet")
        d.commit(staging, {})
        staging = d.begin(overwrite=True)  # clears the finished output, not the lock it holds
        assert (tmp_path / "out" / LOCK).exists()
        pq.write_table(pa.table({"x": [3]}), Path(staging) / "part-0.parquet")
        d.commit(staging, {})
        held.check()
    assert pd.read_parquet(tmp_path / "out")["x"].tolist() == [3]
    # A directory holding only a lock file is not "someone else's"; one with other files is.
    StageDir(str(tmp_path / "out")).check_ours()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep")
    with pytest.raises(StageOutputError, match="not written by igds"):
        StageDir(str(foreign)).check_ours()
    assert not (foreign / LOCK).exists()
