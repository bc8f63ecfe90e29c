"""ray job submit --working-dir . --runtime-env runtime_env.yaml -- python jobs/round.py --config configs/gemma2_2b_math.yaml --root s3://bucket/rounds/math --pool s3://bucket/pool/

One turn of continuous selection (same flags as `igds round`): round 1 on the first call; then `igds monitor`
on the last round, `igds identify --if-drift`, and the next round, continuing it. Exit 3 when the monitor saw
drift (the round still ran and committed; by default it kept the previous models: rounds.on_drift).
"""

from __future__ import annotations

import sys
from typing import Sequence

from igds_ray.cli import job_args
from igds_ray.cli import main as cli_main


def parse_args(argv: Sequence[str] | None = None) -> list[str]:
    return job_args("round", argv)


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
