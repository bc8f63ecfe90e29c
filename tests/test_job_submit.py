"""`ray job submit` the way docs/cluster.md submits to a cluster: a real Ray head with the dashboard on
127.0.0.1 and token authentication on, this checkout uploaded as the job's working_dir with
runtime_env.yaml, `python jobs/demo.py --quick` running the embedded demo end to end. Checks that the job API refuses
callers without the token, that the job's Python imports `igds_ray` from the uploaded working_dir
(not from an installed copy), that the upload leaves .venv behind, and that the job's outputs are
complete.

Needs Ray's dashboard (the job API lives there), i.e. `ray[default]`; skipped with the reason
otherwise. Never calls `ray stop` (it would end every Ray on the machine): the head is stopped by
its own process group (tests/test_cluster.py: RayHead).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pyarrow.dataset as pads
import pytest
import yaml

from tests.test_cluster import REPO, RayHead, dashboard_missing, ray_cli


ARMS = ("igds", "random", "oracle")
PROBE = (
    "import os, sys; sys.path.pop(0); "  # drop cwd: leave sys.path as `python jobs/x.py` sees it
    "import igds_ray; "
    "print('IGDS_RAY_FILE=' + igds_ray.__file__); print('JOB_PYTHONPATH=' + os.environ.get('PYTHONPATH', ''))"
)


def cli(args: list[str], env: dict[str, str], timeout: float, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([*ray_cli(), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def wait_for_job_api(url: str, token: str, timeout: float = 120) -> None:
    req = urllib.request.Request(f"{url}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
    deadline, last = time.time() + timeout, None
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError) as e:
            last = e
        time.sleep(1)
    raise TimeoutError(f"job API at {url} not ready: {last}")


def job_info(url: str, token: str, sub_id: str) -> dict:
    req = urllib.request.Request(f"{url}/api/jobs/{sub_id}", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_runtime_env_leaves_local_envs_behind() -> None:
    excludes = yaml.safe_load((REPO / "runtime_env.yaml").read_text())["excludes"]
    assert {".venv/", ".venv-*/", ".git/", "runs/"} <= set(excludes)


@pytest.mark.skipif(dashboard_missing() is not None, reason=f"the job API needs the dashboard: {dashboard_missing()}")
def test_ray_job_submit_quick_demo_with_token_auth(tmp_path: Path) -> None:
    """`ray job submit ... python jobs/demo.py --quick`: the README's embedded default, submitted as a job."""
    t_start = time.time()
    run_dir = tmp_path / "demo"
    token = secrets.token_hex(32)  # made per run: a test token, never stored
    # No inherited RAY_* (the suite sets RAY_AUTH_MODE=disabled; RAY_ADDRESS would redirect) and no
    # PYTHONPATH: the job must find igds_ray through its working_dir alone.
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "PYTHONPATH"}
    # `python` in the entrypoint is this interpreter, as it is the image's python on a cluster.
    base.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    env = {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}

    with RayHead(num_cpus=2, env=env, dashboard=True) as head:
        url = head.dashboard_url
        wait_for_job_api(url, token)

        # Token auth is on: no token, or a wrong one, is refused.
        for bad in ({**base, "RAY_AUTH_MODE": "disabled"},
                    {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}):
            r = cli(["job", "list", "--address", url], bad, timeout=60)
            assert r.returncode != 0 and re.search(r"Unauthorized|Forbidden|[Aa]uthentication", r.stdout + r.stderr)

        sub_id = f"igds-test-{uuid.uuid4().hex[:8]}"
        # Three of the quick demo's arms (full data is fine-tuned in tests/test_pipeline.py): a selection
        # method, the random baseline and the label-reading ceiling.
        demo = ["python", "jobs/demo.py", "--quick", "--arms", ",".join(ARMS), "--run-dir", str(run_dir)]
        # Ray quotes each word after `--`; `sh -c` runs the probe, then the documented command.
        entrypoint = ["sh", "-c", f"python -c {shlex.quote(PROBE)} && {shlex.join(demo)}"]
        t_submit = time.time()
        try:
            r = cli(["job", "submit", "--address", url, "--submission-id", sub_id, "--working-dir", ".",
                     "--runtime-env", "runtime_env.yaml", "--", *entrypoint], env, timeout=900)
        except subprocess.TimeoutExpired:
            cli(["job", "stop", "--address", url, sub_id], env, timeout=60)
            pytest.fail("the job did not finish in 900 s")
        job_s = time.time() - t_submit
        log = r.stdout + r.stderr
        assert r.returncode == 0, log[-5000:]
        info = job_info(url, token, sub_id)
        assert info["status"] == "SUCCEEDED" and info["entrypoint"].startswith("sh -c"), info

        # The job imported igds_ray from the uploaded working_dir, which sits first on its PYTHONPATH.
        igds_file = Path(re.search(r"IGDS_RAY_FILE=(/\S+)", log).group(1))
        job_path = re.search(r"JOB_PYTHONPATH=(/\S*)", log).group(1).split(os.pathsep)
        wd = igds_file.parent.parent
        assert wd.parent.name == "working_dir_files", igds_file
        assert job_path[0] == str(wd)
        assert (wd / "jobs" / "demo.py").exists()
        # ... and the upload left the local environments and runs behind.
        for heavy in (".venv", ".venv-vllm", ".git", "runs"):
            assert not (wd / heavy).exists(), heavy
        upload_mb = sum(f.stat().st_size for f in wd.rglob("*") if f.is_file()) / 2**20
        assert upload_mb < 20, f"working_dir upload is {upload_mb:.1f} MiB"

    # The run directory is laid out as the design's contract says, every stage committed.
    world = json.loads((run_dir / "world" / "world.json").read_text())
    assert world["stats"]["sae"]["saved_architecture"] == "jumprelu" and world["stats"]["params"] > 100_000
    cal = world["stats"]["calibration"]  # the world measured P1/P2 itself, on the dev set
    assert cal["set"] == "dev" and {"base", "full", "oracle", "p1", "p2"} <= set(cal)
    for rel in ("features/features.json", "features/recall.parquet/_SUCCESS", "features/causal.parquet/_SUCCESS",
                "eval/metrics.json", "report/report.md", "config.yaml"):
        assert (run_dir / rel).is_file(), rel
    features = json.loads((run_dir / "features" / "features.json").read_text())["features"]
    assert len(features) == 1 and re.fullmatch(r"l2_p\d+", features[0])
    n_pool = sum(world["stats"]["pool_kinds"].values())
    for arm in ARMS:
        sel = run_dir / "selection" / f"{arm}.parquet"
        manifest = json.loads((sel / "_SUCCESS").read_text())
        ids = pads.dataset(str(sel), format="parquet", exclude_invalid_files=True).to_table().column("id").to_pylist()
        assert len(ids) == len(set(ids)) == manifest["rows"]
        assert manifest["rows"] == (n_pool if arm == "full" else n_pool // 2), (arm, manifest["rows"])
        # The demo fine-tunes all weights (a 0.3M-parameter model): an HF model directory per arm.
        assert (run_dir / "models" / arm / "config.json").is_file() and list((run_dir / "models" / arm).glob("*.safetensors"))
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert {"base", *ARMS} == set(metrics["arms"])
    assert all(a["status"] == "ok" and 0.0 <= a["metrics"]["metric"] <= 1.0 for a in metrics["arms"].values())
    report = (run_dir / "report" / "report.md").read_text()
    assert "## Verdict" in report and "What each arm kept" in report and "math_wrong" in report
    assert "oracle (ceiling: reads labels)" in report
    print(f"\njob submit test: {time.time() - t_start:.0f} s total, job {job_s:.0f} s, upload {upload_mb:.2f} MiB")
