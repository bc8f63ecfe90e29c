"""Exactly-once on S3: a moto S3 server on 127.0.0.1 stands in for the object store.

The driver finds it through `AWS_ENDPOINT_URL` (pyarrow >= 15 reads it), with fake credentials.
Ray workers reach the store only through the filesystem objects the driver resolved and shipped to
them (the endpoint travels with them, credentials do not), which is what reads, writes and select's
row fetch rely on here. Workers still need credentials of their own, as a real cluster's nodes have
(an instance role, env): without any, the AWS SDK sends unsigned aws-chunked uploads that moto
stores undecoded. So the scoring tests restart the session's Ray with the credentials in its
environment, and restore it as it was afterwards; they are `slow` (a Ray restart, five scoring
jobs); the lease test is not.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

pytest.importorskip("moto.server")
pytest.importorskip("boto3")

from igds_ray import schema as S  # noqa: E402
from igds_ray.config import ScoreConfig, SelectConfig, from_dict, to_dict  # noqa: E402
from igds_ray.errors import RunLocked  # noqa: E402
from igds_ray.stages import score, select  # noqa: E402
from igds_ray.storage import ATTEMPT, LOCK, StageDir, filesystem, lock  # noqa: E402

FEATS = ["l0_p3", "l0_p17", "l0_p40"]
BUCKET = "igds-test"
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_ray_init(ray) -> None:
    # As tests/conftest.py's `ray_local` starts it.
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False


@pytest.fixture(scope="module")
def moto():
    """A moto S3 server with one bucket; the driver's environment points pyarrow at it."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request access log
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "IGDS_LOCK_SETTLE_S": "0.2",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=BUCKET)
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture(scope="module")
def s3(moto, world, ray_local):
    """The world's pool in the bucket, and the session's Ray restarted with the credentials (then
    restored as it was)."""
    ray_local.shutdown()
    _session_ray_init(ray_local)  # its workers inherit the credentials
    try:
        fs, _ = filesystem(f"s3://{BUCKET}/pool")
        for p in sorted(Path(world.pool_dir).glob("*.parquet")):
            with fs.open_output_stream(f"{BUCKET}/pool/{p.name}") as f:
                f.write(p.read_bytes())
        yield moto
    finally:
        ray_local.shutdown()
        saved = {k: os.environ.pop(k) for k in moto if k in os.environ}
        _session_ray_init(ray_local)  # without them, as tests/conftest.py started it
        os.environ.update(saved)


def uri(*parts: str) -> str:
    return "s3://" + posixpath.join(BUCKET, *parts)


def names(u: str) -> dict[str, pafs.FileInfo]:
    fs, path = filesystem(u)
    return {posixpath.basename(e.path): e for e in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))}


def read(u: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = filesystem(u)
    return pq.read_table(path, filesystem=fs, columns=columns)


def make_cfg(world, out: str, **kw) -> ScoreConfig:
    return from_dict(ScoreConfig, dict(model=str(world.model_dir), sae=str(world.saes["jumprelu"]), features=FEATS,
                                       pool={"path": uri("pool"), "rows_per_read_task": 25}, out=out, batch_size=25,
                                       **kw))


def assert_each_row_once(t: pa.Table, n: int = 200) -> None:
    keys = list(zip(t.column(S.SRC_FILE).to_pylist(), t.column(S.SRC_ROW).to_pylist()))
    assert len(keys) == n and len(set(keys)) == n
    assert set(keys) == {(f"part-{f:03d}.parquet", r) for f in range(2) for r in range(100)}
    assert len(set(t.column(S.ID).to_pylist())) == n


@pytest.fixture(scope="module")
def scored(world, s3):
    out = uri("run", "scores")
    return out, score.run(make_cfg(world, out))


@pytest.mark.slow
def test_s3_pool_to_s3_scores_commits_success_last_each_row_once(scored):
    out, manifest = scored
    listed = names(out)
    assert S.SUCCESS in listed and not any(n.startswith("_attempt") for n in listed)
    parts = {n for n in listed if n.endswith(".parquet")}
    assert parts == set(manifest["files"]) and parts
    # `_SUCCESS` is the last object written (S3's own LastModified).
    assert all(listed[S.SUCCESS].mtime >= listed[n].mtime for n in parts)
    t = read(out)
    assert_each_row_once(t)
    assert manifest["rows"] == 200 and manifest["errors"] == 0 and manifest["pool"]["uri"] == uri("pool")
    assert np.isfinite(t.column(S.SCORE).to_numpy()).all()


@pytest.mark.slow
def test_select_from_s3_fetches_rows_back_from_the_s3_pool(scored, world):
    out, _ = scored
    m = select.run(from_dict(SelectConfig, dict(scores=out, out=uri("run", "selection"), fraction=0.25)))
    chosen = read(uri("run", "selection", "igds.parquet")).to_pandas()
    assert m["rows"] == len(chosen) == 50 and not chosen.duplicated([S.SRC_FILE, S.SRC_ROW]).any()
    for rel, rows in chosen.groupby(S.SRC_FILE):
        src = pq.read_table(Path(world.pool_dir) / rel, columns=["prompt"]).column("prompt").to_pylist()
        assert rows["prompt"].tolist() == [src[r] for r in rows[S.SRC_ROW]]


@pytest.mark.slow
def test_rerun_into_the_finished_s3_directory_does_not_duplicate(scored, world):
    out, manifest = scored
    assert score.run(make_cfg(world, out))["committed_at"] == manifest["committed_at"]
    redo = score.run(make_cfg(world, out, overwrite=True))
    assert redo["rows"] == 200 and redo["committed_at"] >= manifest["committed_at"]
    assert_each_row_once(read(out))
    assert set(redo["files"]) == {n for n in names(out) if n.endswith(".parquet")}


def _put(u: str, data: bytes) -> None:
    fs, path = filesystem(u)
    with fs.open_output_stream(path) as f:
        f.write(data)


def _parquet(table: pa.Table) -> bytes:
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    return buf.getvalue().to_pybytes()


@pytest.mark.slow
def test_crashed_attempts_are_resumed_or_cleared_never_counted(world, s3, tmp_path):
    out = uri("crash", "scores")
    cfg = make_cfg(world, out)
    # 1. A real interrupted attempt: the scorer fails on its 4th batch (each batch waits 1 s, so
    # that the write tasks of the first ones run meanwhile); the parts committed by then stay.
    with pytest.raises(Exception, match="test hook: scorer fails"):
        score.run(cfg, hooks={"raise_after_batches": 3, "batch_delay_s": 1.0})
    attempts = [n for n in names(out) if n.startswith("_attempt-")]
    assert len(attempts) == 1 and S.SUCCESS not in names(out)
    # Write tasks of the failed job that were already running may still land: wait until quiet.
    parts, stable_since = None, time.time()
    while time.time() - stable_since < 1.5:
        now = {n: e.size for n, e in names(uri("crash", "scores", attempts[0])).items() if n.startswith("part-")}
        if now != parts:
            parts, stable_since = now, time.time()
        time.sleep(0.2)
    done = sum(pq.read_metadata(filesystem(uri("crash", "scores", attempts[0], n))[1],
                                filesystem=filesystem(out)[0]).num_rows for n in parts)
    assert 0 < done <= 75, parts
    # 2. Leftovers of other crashes: an attempt of another config holding ghost rows, a part moved
    # out of an attempt whose commit never finished. Neither may be counted.
    ghost = _parquet(pa.table({S.ID: ["ghost"], S.SRC_FILE: ["part-000.parquet"], S.SRC_ROW: [0]}))
    _put(uri("crash", "scores", "_attempt-other", ATTEMPT), json.dumps({"fingerprint": "other"}).encode())
    _put(uri("crash", "scores", "_attempt-other", "part-ghost.parquet"), ghost)
    _put(uri("crash", "scores", "part-moved.parquet"), ghost)
    log_dir = tmp_path / "forward"
    m = score.run(cfg, hooks={"forward_log": str(log_dir)})
    handed, forwarded = score.read_forward_log(str(log_dir))
    assert forwarded == handed == 200 - done and m["resumed_rows"] == done and m["scored_rows"] == 200 - done
    t = read(out)
    assert_each_row_once(t)
    assert "ghost" not in t.column(S.ID).to_pylist()
    listed = names(out)
    assert not any(n.startswith("_attempt") for n in listed) and "part-moved.parquet" not in listed
    assert set(m["files"]) == {n for n in listed if n.endswith(".parquet")} >= set(parts)


HOLD = textwrap.dedent("""
    import json, os, sys, time
    from igds_ray.storage import lock
    with lock(sys.argv[1], "igds scoring"):
        print(json.dumps({"pid": os.getpid()}), flush=True)
        time.sleep(3600)
""")


@pytest.mark.slow
def test_lock_on_s3_refuses_a_second_run_and_a_dead_holder_goes_stale(world, s3):
    out = uri("locked", "scores")
    fs, path = filesystem(out)
    # A live holder in another process, heartbeating every 0.5 s (stale after 2 s without one).
    env = {**os.environ, "PYTHONPATH": str(ROOT), "IGDS_LOCK_STALE_S": "2"}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, out], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        pid = json.loads(line)["pid"]
        time.sleep(3)  # longer than the stale time: only the heartbeat keeps the lease fresh
        holder = (rf"{re.escape(out)} is locked by igds scoring on host {re.escape(socket.gethostname())}, "
                  rf"pid {pid}, started \S+, last heartbeat \d+ s ago")
        with pytest.raises(RunLocked, match=holder):
            score.run(make_cfg(world, out))
        assert set(names(out)) == {LOCK}
        lease = json.loads(fs.open_input_stream(posixpath.join(path, LOCK)).read())
        assert lease["pid"] == pid and lease["stale_after_s"] == 2
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    # SIGKILL: the lease is still there, but its holder is a dead process of this host.
    assert LOCK in names(out)
    m = score.run(make_cfg(world, out))
    assert m["rows"] == 200 and LOCK not in names(out)  # released (deleted) at the end
    assert_each_row_once(read(out))


def test_s3_lease_of_another_host_is_refused_until_stale(moto):
    d = uri("lease")
    fs, path = filesystem(d)
    lease = {"what": "igds run", "host": "elsewhere", "pid": 1, "started_at": "2026-01-01T00:00:00Z",
             "token": "t", "stale_after_s": 300}
    _put(posixpath.join(d, LOCK), json.dumps({**lease, "heartbeat_unix": time.time() - 10}).encode())
    with pytest.raises(RunLocked, match=r"locked by igds run on host elsewhere, pid 1, started 2026-01-01T00:00:00Z, "
                                        r"last heartbeat 1\d s ago.*taken over"):
        with lock(d):
            pass
    _put(posixpath.join(d, LOCK), json.dumps({**lease, "heartbeat_unix": time.time() - 301}).encode())
    with lock(d) as held:  # stale: taken over
        mine = json.loads(fs.open_input_stream(posixpath.join(path, LOCK)).read())
        assert mine["host"] == socket.gethostname() and mine["pid"] == os.getpid()
        held.check()
        # Another run that takes it over (as if this one had stopped heartbeating) is noticed.
        _put(posixpath.join(d, LOCK), json.dumps({**lease, "heartbeat_unix": time.time()}).encode())
        with pytest.raises(RunLocked, match="lost its lock to igds run on host elsewhere"):
            held.check()
    # Releasing a lease that is no longer ours leaves the other holder's lease alone.
    assert json.loads(fs.open_input_stream(posixpath.join(path, LOCK)).read())["host"] == "elsewhere"
