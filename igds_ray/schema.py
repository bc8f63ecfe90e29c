"""Column names, output schemas and feature ids: one place for every name shared across stages."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pyarrow as pa

from igds_ray.errors import ConfigError

# Columns of a scores part (one row per pool row).
ID = "id"
SCORE = "score"
ACTS = "acts"
N_TOKENS = "n_tokens"
TRUNCATED = "truncated"
ERROR = "error"
SRC_FILE = "src_file"  # pool file, relative to the pool root
SRC_ROW = "src_row"  # row index inside that file
RANK = "rank"
RENDERED = "rendered"  # igds scores only: the prompt was put into the task template before scoring

# Columns the baseline scorers add to a scores part (igds_ray.baselines).
LOSS = "loss"  # mean NLL of the response tokens given BOS + prompt (the SFT loss)
UNCOND_LOSS = "uncond_loss"  # mean NLL of the same response tokens given only BOS
IFD = "ifd"  # exp(loss - uncond_loss) = PPL(response | prompt) / PPL(response)
ZIP_POS = "zip_pos"  # greedy position inside the row's ZIP shard (0 = picked first)
ZIP_RATIO = "zip_ratio"  # compression ratio of (selected set + row) when the row was picked
ZIP_SHARD = "zip_shard"  # the ZIP shard the row was ranked in

# Internal column carried from the reader to the scorer: why a row cannot be scored.
INPUT_ERROR = "_input_error"

# Default pool columns.
DEFAULT_TEXT = "text"
DEFAULT_PROMPT = "prompt"
DEFAULT_RESPONSE = "response"

SUCCESS = "_SUCCESS"  # written last into a finished stage directory


def scores_schema(id_type: pa.DataType) -> pa.Schema:
    """The schema of every scores part; `id` keeps the pool's own id type."""
    return pa.schema(
        [
            pa.field(ID, id_type, nullable=False),
            pa.field(SCORE, pa.float64()),
            pa.field(ACTS, pa.list_(pa.float32())),
            pa.field(N_TOKENS, pa.int32()),
            pa.field(TRUNCATED, pa.bool_()),
            pa.field(ERROR, pa.string()),
            pa.field(SRC_FILE, pa.string(), nullable=False),
            pa.field(SRC_ROW, pa.int64(), nullable=False),
        ]
    )


_FEATURE_RE = re.compile(r"^l(\d+)_p(\d+)$")


@dataclass(frozen=True, order=True)
class FeatureId:
    """An SAE latent: `l{layer}_p{index}`, e.g. `l14_p11575` is latent 11575 of the layer-14 SAE."""

    layer: int
    index: int

    @classmethod
    def parse(cls, text: str) -> "FeatureId":
        m = _FEATURE_RE.match(str(text).strip())
        if not m:
            raise ConfigError(f"feature id {text!r} is not of the form l<layer>_p<index>, e.g. l14_p11575")
        return cls(int(m.group(1)), int(m.group(2)))

    def __str__(self) -> str:
        return f"l{self.layer}_p{self.index}"


def parse_features(value: str | list | tuple) -> tuple[FeatureId, ...]:
    """Parse `l1_p3,l1_p17` or a list of ids; order is kept (it is the order of `acts`), duplicates refused."""
    items = [s for s in value.split(",")] if isinstance(value, str) else list(value)
    items = [str(s).strip() for s in items if str(s).strip()]
    if not items:
        raise ConfigError("features: at least one feature id is needed, e.g. l12_p3041")
    feats = tuple(FeatureId.parse(s) for s in items)
    seen: set[FeatureId] = set()
    for f in feats:
        if f in seen:
            raise ConfigError(f"features: {f} is listed twice")
        seen.add(f)
    layers = {f.layer for f in feats}
    if len(layers) > 1:
        raise ConfigError(f"features: all features must come from one SAE layer, got layers {sorted(layers)}")
    return feats
