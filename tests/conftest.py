"""Shared fixtures: one local Ray per session, tiny real worlds built in code per session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local test cluster only; real clusters keep auth on


import pytest


@pytest.fixture(scope="session")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory):
    """Tokenizer, 2-layer Llama, standard + JumpReLU + TopK SAEs at layer 0, a 200-row pool in 2 files."""
    from igds_ray.demo.tiny import build_world

    return build_world(tmp_path_factory.mktemp("world"), n_rows=200, n_files=2,
                       architectures=("standard", "jumprelu", "topk"))


_TIMES = os.environ.get("IGDS_TEST_TIMES")  # a file: each test's wall time is appended as it finishes


def pytest_runtest_logreport(report):  # noqa: ANN001, ANN201 - pytest hook
    if _TIMES:
        with open(_TIMES, "a") as f:
            f.write(f"{report.duration:9.2f} {report.when:8} {report.outcome:7} {report.nodeid}\n")
