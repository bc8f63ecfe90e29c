"""ray job submit --working-dir . --runtime-env runtime_env.yaml -- python jobs/select_top.py --scores s3://bucket/run/scores --fraction 0.5 --out s3://bucket/run/selection

Keep the top fraction of a scored pool (same flags and YAML as `igds select`).
"""

from __future__ import annotations

import sys
from typing import Sequence

from igds_ray.cli import job_args
from igds_ray.cli import main as cli_main


def parse_args(argv: Sequence[str] | None = None) -> list[str]:
    return job_args("select", argv)


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
