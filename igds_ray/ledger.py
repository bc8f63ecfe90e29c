"""A run's ledger: one small JSON record per (stage, arm) with wall time, resources and counts.

Each record is its own file (`<run>/ledger/<stage>__<arm>.json`, written atomically), so parallel
stages never contend for one file; the report reads them all. Every number in the report comes
from these records and the stages' own outputs.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from igds_ray.storage import exists, filesystem, join, read_json, write_json_atomic


@dataclass
class Record:
    stage: str
    arm: str = "-"
    status: str = "ok"
    wall_s: float = 0.0
    cpus: float = 0.0  # CPUs held during the stage (sum over actors/workers)
    gpus: float = 0.0
    tokens: int | None = None
    rows: int | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    written_at: str = ""

    @property
    def cpu_hours(self) -> float:
        return self.wall_s * self.cpus / 3600

    @property
    def gpu_hours(self) -> float:
        return self.wall_s * self.gpus / 3600


def record(run_dir: str, rec: Record) -> None:
    rec.written_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_json_atomic(join(run_dir, "ledger", f"{rec.stage}__{rec.arm}.json"), asdict(rec))


def read_all(run_dir: str) -> list[Record]:
    import pyarrow.fs as pafs

    uri = join(run_dir, "ledger")
    if not exists(uri):
        return []
    fs, path = filesystem(uri)
    out = []
    for info in sorted(fs.get_file_info(pafs.FileSelector(path)), key=lambda i: i.path):
        if info.path.endswith(".json"):
            out.append(Record(**read_json(join(uri, info.path.rsplit("/", 1)[-1]))))
    return out
