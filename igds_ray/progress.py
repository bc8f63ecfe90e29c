"""Progress you can follow: one line per finished stage (stage, arm, rows/s, what is left of its kind and an
ETA for it), a closing table of every stage's wall time, and the Ray dashboard's page for the job.

Lines go to stderr (stdout stays the command's result), prefixed `[igds]`. The ETA of a stage kind that runs
once per arm (select, finetune, evaluate) is the mean wall time of its finished arms times the arms left,
divided by the arms that run at once.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO


@dataclass
class Done:
    stage: str
    arm: str
    wall_s: float
    rows: int | None
    status: str
    recorded: bool  # False: the stage skipped its finished output (a rerun)


@dataclass
class Progress:
    out: TextIO | None = None
    enabled: bool = True
    t0: float = field(default_factory=time.time)
    done: list[Done] = field(default_factory=list)
    expected: dict[str, tuple[int, int]] = field(default_factory=dict)  # kind -> (arms in all, at once)

    def expect(self, kind: str, n: int, at_once: int = 1) -> None:
        self.expected[kind] = (n, max(1, at_once))

    def _kind(self, stage: str) -> str:
        return stage.split("_", 1)[0] if stage.startswith("score_") else stage

    def note(self, stage: str, arm: str, wall_s: float, rows: int | None = None, status: str = "ok",
             recorded: bool = True) -> str:
        self.done.append(Done(stage, arm, wall_s, rows, status, recorded))
        rate = f"{rows / wall_s:,.0f} rows/s" if rows and wall_s > 0 else ""
        what = f"{stage}" + ("" if arm == "-" else f" [{arm}]")
        line = (f"[igds {time.time() - self.t0:6.0f}s] {what:<32} {status:<7} {wall_s:8.1f}s"
                f"{'  ' + format(rows, ',') + ' rows' if rows else ''}{'  ' + rate if rate else ''}"
                f"{'' if recorded else '  (finished before: skipped)'}")
        kind = self._kind(stage)
        if kind in self.expected:
            n, at_once = self.expected[kind]
            mine = [d for d in self.done if self._kind(d.stage) == kind]
            left = n - len(mine)
            if left > 0:
                mean = sum(d.wall_s for d in mine) / len(mine)
                line += f"  | {left} {kind} left, ETA ~{mean * left / at_once:.0f}s"
        self._print(line)
        return line

    def _print(self, line: str) -> None:
        if self.enabled:
            print(line, file=self.out or sys.stderr, flush=True)

    def table(self) -> str:
        """Every stage noted, in order, with its wall time and rate; then the total since the start."""
        lines = ["| stage | arm | status | wall (s) | rows | rows/s |", "| --- | --- | --- | --- | --- | --- |"]
        for d in self.done:
            rate = f"{d.rows / d.wall_s:,.0f}" if d.rows and d.wall_s > 0 else "–"
            lines.append(f"| {d.stage} | {d.arm} | {d.status if d.recorded else 'skipped (finished)'} | "
                         f"{d.wall_s:.1f} | {d.rows if d.rows is not None else '–'} | {rate} |")
        lines.append(f"| **all** | | | {time.time() - self.t0:.1f} (wall, since the start) | | |")
        return "\n".join(lines)

    def close(self) -> str:
        text = self.table()
        self._print("[igds] stages:\n" + text)
        link = dashboard_job_url()
        if link:
            self._print(f"[igds] Ray dashboard, this job: {link}")
        return text


def dashboard_job_url() -> str | None:
    """The Ray dashboard's page of the job this driver runs in, when it was submitted with `ray job submit`
    (its submission id) and a dashboard is up; else the dashboard's jobs list when one is up; else None."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        from ray._private.worker import get_dashboard_url

        url = get_dashboard_url()
    except Exception:  # noqa: BLE001 - no dashboard is not an error
        return None
    if not url:
        return None
    url = url if url.startswith("http") else f"http://{url}"
    job = None
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if raw:
        try:
            job = (json.loads(raw).get("metadata") or {}).get("job_submission_id")
        except ValueError:
            job = None
    return f"{url}/#/jobs/{job}" if job else f"{url}/#/jobs"
