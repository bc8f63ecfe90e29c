"""ray job submit --working-dir . --runtime-env runtime_env.yaml -- python jobs/demo.py --quick --run-dir /tmp/igds-demo

The embedded demo (builds its tiny world, then the whole pipeline with every arm); same flags as `igds demo`.
On a cluster, give --run-dir a path every node can read (shared storage); on one node any path works.
"""

from __future__ import annotations

import sys
from typing import Sequence

from igds_ray.cli import job_args
from igds_ray.cli import main as cli_main


def parse_args(argv: Sequence[str] | None = None) -> list[str]:
    return job_args("demo", argv)


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
