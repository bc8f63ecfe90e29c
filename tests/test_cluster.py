"""cluster/: the launcher YAMLs pass Ray's own schema and defaults merge, the KubeRay manifests have
the shape autoscaler v2 and token auth need, nothing exposes the dashboard or carries a secret; and
a fake multi-node cluster built from cluster/local-fake-multinode.yaml autoscales GPU workers for a
real scoring run.

`RayHead` (a `ray start --head --block` in its own process group, stopped by that group's id) is
shared with tests/test_job_submit.py. Neither test calls `ray stop`: it would end every Ray on the
machine, including the session's `ray_local` and any concurrent suite.
"""

from __future__ import annotations

import copy
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
from typing import Any, Iterator, Sequence

import jsonschema
import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
DOCS = REPO / "docs" / "cluster.md"
LAUNCHERS = {"aws": CLUSTER / "aws.yaml", "gcp": CLUSTER / "gcp.yaml"}
FAKE = CLUSTER / "local-fake-multinode.yaml"
KUBERAY = {"RayCluster": CLUSTER / "kuberay" / "raycluster.yaml", "RayJob": CLUSTER / "kuberay" / "rayjob.yaml"}
RAY_VERSION = ray.__version__
IMAGE = f"rayproject/ray:{RAY_VERSION}-py311-gpu"
SCHEMA = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


# ---------------------------------------------------------------- a Ray head we own, and only it


def free_ports(n: int) -> list[int]:
    """n distinct ports free right now (all bound at once, so no duplicates)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def ray_cli() -> list[str]:
    """The `ray` command of this interpreter (works in venvs that lack the console script)."""
    return [sys.executable, "-m", "ray.scripts.scripts"]


def dashboard_missing() -> str | None:
    """Why this environment cannot serve Ray's dashboard / job API (ray[default]), or None."""
    from ray._private.utils import get_dashboard_dependency_error

    err = get_dashboard_dependency_error()
    return None if err is None else f"ray[default] is not installed ({err})"


def _group_members(pgid: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # after "pid (comm)": state, ppid, pgrp
            pids.append(int(stat.parent.name))
    return pids


class RayHead:
    """`ray start --head --block` with every port chosen here and its own temp dir and process
    group. Fake worker nodes the autoscaler starts inherit the group, so `stop()` (SIGTERM to the
    head, then to the group, SIGKILL to stragglers) ends exactly the processes this head started.
    """

    def __init__(
        self,
        *,
        num_cpus: int,
        env: dict[str, str],
        dashboard: bool = False,
        extra_args: Sequence[str] = (),
        port: int | None = None,
    ) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="igds-ray-", dir="/tmp"))  # short: socket paths
        ports = free_ports(7)
        self.port = port or ports[0]
        self.dashboard_port = ports[1]
        self.env = env
        self.ip = ray.util.get_node_ip_address()
        self.address = f"{self.ip}:{self.port}"
        self.log = self.root / "head.log"
        args = [
            *ray_cli(), "start", "--head", "--block", f"--port={self.port}", f"--num-cpus={num_cpus}",
            f"--dashboard-port={self.dashboard_port}", "--dashboard-host=127.0.0.1",
            f"--include-dashboard={'true' if dashboard else 'false'}",
            f"--dashboard-agent-listen-port={ports[2]}", f"--dashboard-agent-grpc-port={ports[3]}",
            f"--runtime-env-agent-port={ports[4]}", f"--metrics-export-port={ports[5]}",
            f"--temp-dir={self.root}", "--disable-usage-stats", *extra_args,
        ]
        from ray._private.utils import get_ray_client_dependency_error

        if get_ray_client_dependency_error() is None:  # else no client server starts at all
            args.append(f"--ray-client-server-port={ports[6]}")
        self.args = args
        self.proc: subprocess.Popen | None = None

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self, timeout: float = 120) -> "RayHead":
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         cwd=self.root, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if "block forever" in self.log.read_text(errors="replace"):
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.5)
        tail = self.log.read_text(errors="replace")[-3000:]
        self.stop()
        raise RuntimeError(f"ray head did not start (rc={self.proc.returncode}):\n{tail}")

    def stop(self) -> None:
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the head leads its own group
        # SIGTERM to the whole group at once (a lone head would first drain for up to 30 s), and a
        # short grace: raylet and GCS take ~10 s to stop politely, and this cluster is disposable.
        for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            if not _group_members(pgid):
                break
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            end = time.time() + grace
            while _group_members(pgid) and time.time() < end:
                self.proc.poll()  # reap the head itself
                time.sleep(0.2)
        if self.proc.poll() is None:
            self.proc.wait(timeout=5)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "RayHead":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------------------------ static checks


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, value) for every scalar in a parsed YAML tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, f"{path}[{i}]")
    else:
        yield path, node


def all_yaml_docs() -> list[tuple[Path, Any]]:
    docs = []
    for p in sorted(CLUSTER.rglob("*.yaml")):
        docs.extend((p, d) for d in yaml.safe_load_all(p.read_text()) if d is not None)
    return docs


def text_files() -> list[Path]:
    files = [p for p in sorted(CLUSTER.rglob("*")) if p.is_file() and "__pycache__" not in p.parts]
    return files + [DOCS, REPO / "runtime_env.yaml"]


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_launcher_validates_against_rays_schema_and_defaults(name: str) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = load(LAUNCHERS[name])
    jsonschema.validate(cfg, SCHEMA)
    # As `ray up` does: merge the provider's defaults.yaml, then the schema plus Ray's own checks.
    # The defaults' `--dashboard-host=0.0.0.0` start commands must not come back in the merge.
    merged = prepare_config(copy.deepcopy(cfg))
    validate_config(merged)
    start = " ".join(merged["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "0.0.0.0" not in start
    assert merged["provider"]["type"] == name


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_launcher_shape(name: str) -> None:
    cfg = load(LAUNCHERS[name])
    assert cfg["cluster_name"]
    assert cfg["docker"]["image"] == IMAGE, "cluster image must carry the Ray the jobs are submitted with"
    types = cfg["available_node_types"]
    head = cfg["head_node_type"]
    assert head in types and not types[head]["resources"].get("GPU"), "the head is a CPU node"
    workers = {k: v for k, v in types.items() if k != head}
    gpu = {k: v for k, v in workers.items() if v["resources"].get("GPU", 0) >= 1}
    assert gpu and gpu.keys() == workers.keys()
    for t in gpu.values():
        assert t["min_workers"] == 0 and isinstance(t["max_workers"], int) and t["max_workers"] >= 0
        assert t["max_workers"] <= cfg["max_workers"]
    assert any(t["max_workers"] > 0 for t in gpu.values())
    spot = [t for t in gpu.values() if _is_spot(name, t["node_config"])]
    on_demand = [t for t in gpu.values() if not _is_spot(name, t["node_config"])]
    assert spot and on_demand, "an on-demand GPU type and a spot/preemptible option"
    assert any("pip install" in c and "igds-ray" in c for c in cfg["setup_commands"])
    assert cfg["file_mounts"]["~/igds-ray"] == "."
    assert ".gitignore" in cfg["rsync_filter"], "the checkout's .venv must not be synced"
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for cmds in (cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]):
        starts = [c for c in cmds if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts)
    assert cfg["idle_timeout_minutes"] > 0


def _is_spot(provider: str, node_config: dict[str, Any]) -> bool:
    if provider == "aws":
        return node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    sched = node_config.get("scheduling", {})
    return sched.get("provisioningModel") == "SPOT" or sched.get("preemptible") is True


def test_fake_multinode_config() -> None:
    from ray.autoscaler._private.util import validate_config

    cfg = load(FAKE)
    jsonschema.validate(cfg, SCHEMA)
    validate_config(cfg)
    assert cfg["provider"]["type"] == "fake_multinode"
    gpu = cfg["available_node_types"]["gpu_worker"]
    assert gpu["resources"] == {"CPU": 2, "GPU": 1} and gpu["min_workers"] == 0 and gpu["max_workers"] >= 1


def _kuberay_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def check_kuberay(doc: dict[str, Any], kind: str) -> None:
    """A RayCluster or RayJob as the shipped ones must be: autoscaler v2, token auth, ClusterIP, GPU workers from 0."""
    assert doc["kind"] == kind and doc["apiVersion"] == "ray.io/v1"
    spec = _kuberay_spec(doc)
    assert spec["rayVersion"] == RAY_VERSION
    assert spec["enableInTreeAutoscaling"] is True
    # KubeRay >= 1.4 selects autoscaler v2 with autoscalerOptions.version (the older route was
    # RAY_enable_autoscaler_v2=1 on the head container plus restartPolicy: Never).
    assert spec["autoscalerOptions"]["version"] == "v2"
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    head_c = head["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head_c["resources"].get("limits", {}), "the head is a CPU node"
    groups = spec["workerGroupSpecs"]
    gpu = [g for g in groups if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu
    for g in gpu:
        assert g["minReplicas"] == 0 and g.get("replicas", 0) == 0 and g["maxReplicas"] >= 1
    for c in [head_c] + [g["template"]["spec"]["containers"][0] for g in groups]:
        assert c["image"].endswith(f":ray{RAY_VERSION}-py311-gpu"), c["image"]
    if kind == "RayJob":
        assert doc["spec"]["shutdownAfterJobFinishes"] is True
        assert doc["spec"].get("backoffLimit", 0) == 0, "a failed job is not retried by KubeRay (igds resumes)"
        yaml.safe_load(doc["spec"]["runtimeEnvYAML"])


@pytest.mark.parametrize("kind", sorted(KUBERAY))
def test_kuberay_manifest(kind: str) -> None:
    docs = [d for d in yaml.safe_load_all(KUBERAY[kind].read_text()) if d is not None]
    assert [d["kind"] for d in docs] == [kind]
    check_kuberay(docs[0], kind)
    if kind == "RayJob":
        assert "jobs/score_pool.py" in docs[0]["spec"]["entrypoint"]


def test_kuberay_rounds_cronjob_creates_a_valid_round_rayjob() -> None:
    """cluster/kuberay/rounds-cronjob.yaml: a CronJob whose pod (a service account that may only create and read
    RayJobs) creates, from a ConfigMap template, a RayJob running `jobs/round.py` on the mounted run config; the
    RayJob passes the same checks as rayjob.yaml, the config is a valid RunConfig, and the entrypoint's flags parse."""
    import shlex

    from igds_ray.cli import build_parser
    from igds_ray.config import from_dict
    from igds_ray.pipeline import RunConfig

    docs = {d["kind"]: d for d in yaml.safe_load_all((CLUSTER / "kuberay" / "rounds-cronjob.yaml").read_text()) if d}
    assert set(docs) == {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "CronJob"}
    (rule,) = docs["Role"]["rules"]
    assert rule["apiGroups"] == ["ray.io"] and rule["resources"] == ["rayjobs"]
    assert set(rule["verbs"]) <= {"create", "get", "list", "watch"}, "least privilege: no delete, no update"
    assert docs["RoleBinding"]["subjects"][0]["name"] == docs["ServiceAccount"]["metadata"]["name"]
    assert docs["RoleBinding"]["roleRef"]["name"] == docs["Role"]["metadata"]["name"]
    cron = docs["CronJob"]["spec"]
    assert docs["CronJob"]["apiVersion"] == "batch/v1" and cron["concurrencyPolicy"] == "Forbid"
    assert len(cron["schedule"].split()) == 5
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    (c,) = pod["containers"]
    assert c["command"][:3] == ["kubectl", "create", "-f"]  # create: generateName needs it (apply refuses it)
    cm = docs["ConfigMap"]["data"]
    mount = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    (vol,) = pod["volumes"]
    assert vol["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    assert c["command"][3] == f"{mount[vol['name']]}/{vol['configMap']['items'][0]['path']}"
    job = yaml.safe_load(cm[vol["configMap"]["items"][0]["key"]])
    check_kuberay(job, "RayJob")
    assert job["metadata"]["generateName"] and "name" not in job["metadata"]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", "/home/ray/igds-ray/jobs/round.py"]
    args = build_parser().parse_args(["round", *argv[2:]])
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    (hv,) = head["volumes"]
    assert args.config == f"{mounts[hv['name']]}/{hv['configMap']['items'][0]['path']}"
    assert hv["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    run = yaml.safe_load(cm[hv["configMap"]["items"][0]["key"]])
    cfg = from_dict(RunConfig, run)
    assert cfg.arms == ("igds",) and args.pool == cfg.pool.path and args.root.startswith("s3://")


def test_kuberay_image_is_built_from_the_ray_gpu_image() -> None:
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"ARG RAY_IMAGE={IMAGE}" in dockerfile and "FROM ${RAY_IMAGE}" in dockerfile
    rules = [ln.strip() for ln in (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert rules[0] == "**", "deny by default: .venv and runs/ never enter the build context"
    assert not any(".venv" in r or "runs" in r for r in rules if r.startswith("!"))


def test_nothing_exposes_the_dashboard_or_client_port() -> None:
    for path, doc in all_yaml_docs():
        assert doc.get("kind") not in {"Service", "Ingress", "Gateway", "HTTPRoute"}, path
        for key, value in walk(doc):
            if isinstance(value, str):
                assert "0.0.0.0" not in value, f"{path}: {key} = {value!r}"
                assert value not in {"LoadBalancer", "NodePort"}, f"{path}: {key} = {value!r}"
            # No security-group / firewall rules, no host ports or host networking on pods.
            assert not re.search(r"IpPermissions|firewall|hostPort|hostNetwork", key), f"{path}: {key}"
        # An explicit dashboard-host (ray start flag or KubeRay rayStartParams) must be loopback.
        for key, value in walk(doc):
            if key.endswith("dashboard-host"):
                assert value in {"127.0.0.1", "localhost"}, f"{path}: {key} = {value!r}"
    for path in text_files():
        text = path.read_text()
        for m in re.finditer(r"dashboard[-_]host[= :\"']+([\w.:]+)", text):
            assert m.group(1) in {"127.0.0.1", "localhost"}, f"{path}: {m.group(0)}"
        assert not re.search(r"(-p|--publish)[ =]\S*(8265|10001)", text), path


CREDENTIAL_PATTERNS = {
    "AWS access key id": r"\b(AKIA|ASIA)[0-9A-Z]{16}\b",
    "AWS secret key setting": r"(?i)aws_secret_access_key\s*[:=]",
    "private key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    "Hugging Face token": r"\bhf_[A-Za-z0-9]{30,}\b",
    "GitHub token": r"\bgh[pousr]_[A-Za-z0-9]{30,}\b",
    "Google API key": r"\bAIza[0-9A-Za-z_\-]{35}\b",
    "service account key": r"\"type\"\s*:\s*\"service_account\"",
    "literal secret assignment":
        r"(?i)\b\w*(token|secret|passw(or)?d|api_?key)\w*\b\s*[:=]\s*[\"']?[A-Za-z0-9/+_\-]{16,}",
}


def test_no_credentials_anywhere() -> None:
    for path in text_files():
        text = path.read_text()
        for what, pattern in CREDENTIAL_PATTERNS.items():
            m = re.search(pattern, text)
            assert m is None, f"{path}: looks like a {what}: {m.group(0)[:12]}..."
    for path, doc in all_yaml_docs():
        assert doc.get("kind") != "Secret", f"{path}: secrets are created from a secret store, not committed"
        for key, value in walk(doc):
            assert not key.split(".")[-1].startswith(("gcp_credentials", "ssh_private_key")), f"{path}: {key}"
        # Environment variables that carry secrets come from Secrets (valueFrom), never a literal.
        for key, value in walk(doc):
            if key.endswith(".name") and isinstance(value, str) and re.search(r"TOKEN|SECRET|KEY|PASSWORD", value):
                parent = _lookup(doc, key.rsplit(".", 1)[0])
                assert "value" not in parent and "valueFrom" in parent, f"{path}: {key}"


def _lookup(doc: Any, dotted: str) -> Any:
    node = doc
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", dotted):
        node = node[int(part[1:-1])] if part.startswith("[") else node[part]
    return node


def test_docs_cover_the_lifecycle() -> None:
    text = DOCS.read_text()
    for needle in ("ray up", "ray down", "ray dashboard", "kubectl port-forward", "-L 8265:127.0.0.1:8265",
                   "ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env runtime_env.yaml",
                   "jobs/score_pool.py", "ray job logs", "ray job status", "_SUCCESS", "RAY_AUTH_MODE=token",
                   "cluster/local-fake-multinode.yaml", "kubectl delete"):
        assert needle in text, needle


# ------------------------------------------------------------------- autoscaling, for real

DRIVER = textwrap.dedent("""
    import json, sys, time
    import ray
    from igds_ray.config import ScoreConfig, from_dict
    from igds_ray.stages import score

    address, cfg_json, out_json = sys.argv[1:4]
    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    nodes = lambda: [dict(id=n["NodeID"], alive=n["Alive"], gpu=n["Resources"].get("GPU", 0)) for n in ray.nodes()]
    before = nodes()
    t0 = time.time()
    manifest = score.run(from_dict(ScoreConfig, json.loads(cfg_json)))
    wall = time.time() - t0
    actors = [dict(cls=a["ActorClassName"], node=a["Address"]["NodeID"], state=a["State"])
              for a in ray._private.state.actors().values()]
    json.dump(dict(before=before, after=nodes(), actors=actors, rows=manifest["rows"], wall=wall), open(out_json, "w"))
""")


def test_fake_cluster_autoscales_gpu_workers_for_scoring(tmp_path: Path) -> None:
    """Head with 1 CPU and no GPU; scorer actors that each need half a GPU. The job can only run if
    the autoscaler adds `gpu_worker` nodes from cluster/local-fake-multinode.yaml, and the actors
    must land on them. Runs in subprocesses: the session's in-process `ray_local` is untouched."""
    from igds_ray.demo.tiny import build_world

    world = build_world(tmp_path / "world", n_rows=64, n_files=2, architectures=("standard",))
    cfg = load(FAKE)
    ip, port = ray.util.get_node_ip_address(), free_ports(1)[0]
    cfg["provider"]["gcs_address"] = f"{ip}:{port}"  # the fake workers join this head, not :6379
    config_path = tmp_path / "fake.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
           "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    score_cfg = dict(
        model=str(world.model_dir), sae=str(world.saes["standard"]), features=["l0_p3", "l0_p17"],
        pool={"path": str(world.pool_dir)}, out=str(tmp_path / "scores"),
        num_gpus=0.5, num_cpus=1, min_actors=1, max_actors=2, batch_size=16, max_tokens=128, token_budget=2048,
    )
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    result = tmp_path / "result.json"
    head = RayHead(num_cpus=cfg["available_node_types"]["ray.head.default"]["resources"]["CPU"], env=env,
                   port=port, extra_args=[f"--autoscaling-config={config_path}"])
    with head:
        try:
            proc = subprocess.run([sys.executable, str(driver), head.address, json.dumps(score_cfg), str(result)],
                                  env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"scoring on the fake cluster timed out:\n{(e.stderr or '')[-3000:]}\n"
                        f"{_monitor_log(head)}")
        assert proc.returncode == 0, f"{proc.stderr[-4000:]}\n{_monitor_log(head)}"
    out = json.loads(result.read_text())

    assert [n["gpu"] for n in out["before"]] == [0], "before the job: the head only, no GPU"
    gpu_nodes = {n["id"] for n in out["after"] if n["gpu"] >= 1}
    assert 1 <= len(gpu_nodes) <= 2, out["after"]
    scorers = [a for a in out["actors"] if "FeatureScorer" in a["cls"]]
    assert scorers, out["actors"]
    assert {a["node"] for a in scorers} <= gpu_nodes, "every scorer actor ran on an autoscaled GPU node"
    assert out["rows"] == 64
    assert (tmp_path / "scores" / "_SUCCESS").exists()


def _monitor_log(head: RayHead) -> str:
    logs = sorted(head.root.glob("session_*/logs/monitor.log"))
    return "monitor.log:\n" + logs[-1].read_text(errors="replace")[-3000:] if logs else "(no monitor.log)"
