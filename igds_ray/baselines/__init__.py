"""Baseline selectors. Each is a Ray Data stage that writes a scores directory in the layout and commit
protocol of `igds score` (one row per pool row: `id`, `score`, `n_tokens`, `truncated`, `error`,
`src_file`, `src_row`, plus its own columns); the common exact top-fraction selection
(`igds_ray.stages.select.run`) then picks each arm from it:

| arm      | scorer (`run(cfg)`)              | select with                                   |
|----------|----------------------------------|-----------------------------------------------|
| `random` | `baselines.random` (seeded hash) | `score_column="score"`                        |
| `loss`   | `baselines.lm` (one stage ...)   | `score_column="loss"` (highest loss first)    |
| `ifd`    | `baselines.lm` (... both arms)   | `score_column="ifd", max_score=1.0`           |
| `zip`    | `baselines.zip` (greedy, zlib)   | `score_column="score"` (first picks first)    |
| `full`   | none: any baseline's scores      | `fraction=1.0` (e.g. on random's scores)      |
| `oracle` | `baselines.oracle` (a label col) | `score_column="score"` (a ceiling: reads labels) |

`full` needs no scorer: selecting `fraction=1.0` keeps every row that has a score, i.e. every usable
row (rows with an `error`, such as a null or blank response, cannot be trained on by any arm). Use
`select_config("full", scores=<random's scores>, ...)`. Submodules are imported lazily: `random` and
`zip` never import torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from igds_ray.baselines.common import IFD, LOSS


@dataclass(frozen=True)
class Arm:
    scorer: str | None  # module under igds_ray.baselines that writes its scores; None: reuse any
    score_column: str = "score"
    max_score: float | None = None
    fraction: float | None = None  # fixed fraction (full); None: the run's fraction


ARMS: dict[str, Arm] = {
    "random": Arm("random"),
    "loss": Arm("lm", LOSS),
    "ifd": Arm("lm", IFD, max_score=1.0),
    "zip": Arm("zip"),
    "full": Arm(None, fraction=1.0),
    "oracle": Arm("oracle"),  # reads the pool's label column: a ceiling, not a method (see baselines.oracle)
}
# Arms that read ground-truth labels of the pool, which no selection method may read: a ceiling, marked
# so in every table.
LABEL_ARMS = ("oracle",)


def select_config(arm: str, scores: str, out: str, fraction: float = 0.5, **kw: Any) -> "SelectConfig":  # noqa: F821
    """The `SelectConfig` that picks baseline `arm` from `scores` (for `full`: any scores directory)."""
    from igds_ray.config import SelectConfig
    from igds_ray.errors import ConfigError

    if arm not in ARMS:
        raise ConfigError(f"unknown baseline arm {arm!r} (known: {', '.join(ARMS)})")
    a = ARMS[arm]
    return SelectConfig(scores=scores, out=out, fraction=a.fraction or fraction, arm=arm,
                        score_column=a.score_column, max_score=a.max_score, **kw)


__all__ = ["ARMS", "Arm", "LABEL_ARMS", "select_config"]
