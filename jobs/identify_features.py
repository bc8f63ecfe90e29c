"""ray job submit --working-dir . --runtime-env runtime_env.yaml -- python jobs/identify_features.py --config configs/identify.yaml

Task feature identification (frequency recall + causal filtering on Ray Tune); same flags as `igds identify`.
"""

from __future__ import annotations

import sys
from typing import Sequence

from igds_ray.cli import job_args
from igds_ray.cli import main as cli_main


def parse_args(argv: Sequence[str] | None = None) -> list[str]:
    return job_args("identify", argv)


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
