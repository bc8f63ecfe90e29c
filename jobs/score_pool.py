"""ray job submit --working-dir . --runtime-env runtime_env.yaml -- python jobs/score_pool.py --model M --sae S --features l12_p3041 --pool s3://bucket/pool/ --out s3://bucket/run/scores

Score a Parquet pool with the chosen SAE features (same flags and YAML as `igds score`).
"""

from __future__ import annotations

import sys
from typing import Sequence

from igds_ray.cli import job_args
from igds_ray.cli import main as cli_main


def parse_args(argv: Sequence[str] | None = None) -> list[str]:
    return job_args("score", argv)


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
