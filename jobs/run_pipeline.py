"""ray job submit --working-dir . --runtime-env runtime_env.yaml -- python jobs/run_pipeline.py --config configs/gemma2_2b_math.yaml

The whole IGDS pipeline (identify -> score -> select all arms -> fine-tune -> evaluate -> report); same flags as `igds run`.
"""

from __future__ import annotations

import sys
from typing import Sequence

from igds_ray.cli import job_args
from igds_ray.cli import main as cli_main


def parse_args(argv: Sequence[str] | None = None) -> list[str]:
    return job_args("run", argv)


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
