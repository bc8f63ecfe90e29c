"""ray job submit --working-dir . --runtime-env runtime_env.yaml -- python jobs/finetune.py --config finetune.yaml --data s3://bucket/run/selection/igds.parquet --out s3://bucket/run/models/igds

Fine-tune the base model on one selection with Ray Train + peft; same flags as `igds finetune`.
"""

from __future__ import annotations

import sys
from typing import Sequence

from igds_ray.cli import job_args
from igds_ray.cli import main as cli_main


def parse_args(argv: Sequence[str] | None = None) -> list[str]:
    return job_args("finetune", argv)


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
