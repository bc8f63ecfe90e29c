"""Fine-tuning's streaming data path: the selection tokenised once per training run, in a CPU stage, into
memory-mappable Arrow IPC shards in id order; each Ray Train worker maps them and reads only the rows of
its own part of each global batch.

`<train run>/tokens/` (a stage directory, `_SUCCESS` last) holds `shard-*.arrow` files with `input_ids`
(list<int32>: BOS + prompt + response + EOS, cut at `max_tokens`) and `n_prompt` (the leading tokens
without loss), and the manifest lists the shards in order with their row counts. Rows are in (id,
src_file, src_row) order, so the batches depend on the selected rows and the seed only, never on how the
selection's files were written. The examples are exactly `tokenize_pairs`' (prompt and response are
tokenised per row), so the batches, and the trained weights, are those of the earlier in-memory path.

- A selection of at most `LOCAL_MAX_ROWS` rows is tokenised in the driver (a Ray Data job costs 10-25 s
  of start-up, which dominates a small arm); a larger one by Ray Data: a sort by those keys, then
  `map_batches` on CPU actors that load the tokenizer once, each block written as a shard by the write
  task that receives it (the driver orders the shards by their first row's keys: O(shards)).
- A worker maps the shards (a remote run directory is first copied to the worker's local disk): pages,
  not a Python list of every row; it computes one seeded permutation per epoch and keeps it for the epoch.
- A resumed run reuses the committed shards (same run, same fingerprint).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import uuid
from collections import OrderedDict
from typing import Any, Sequence, TYPE_CHECKING

import numpy as np
import pyarrow as pa

from igds_ray import schema as S
from igds_ray.errors import StageOutputError
from igds_ray.stages.finetune_data import IGNORE_INDEX, TrainExample, tokenize_pairs
from igds_ray.storage import StageDir, filesystem, join

if TYPE_CHECKING:
    from igds_ray.stages.finetune import FinetuneConfig
    from igds_ray.stages.finetune_data import Selection

log = logging.getLogger(__name__)

TOKENS_DIR = "tokens"
SHARD_ROWS = 65536  # rows per shard (driver path)
BLOCK_ROWS = 16384  # rows per tokenised block, and so at most per shard (Ray Data path)
OPEN_SHARDS = 256  # memory maps a worker keeps open (least recently used closed first)
LOCAL_MAX_ROWS = 200_000  # selections tokenised in the driver; larger ones by Ray Data
SUFFIX = ".arrow"
SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("n_prompt", pa.int32())])


def order_keys(columns: Sequence[str]) -> list[str]:
    """The row order: id, then the row's source position (present ones; none: the files' order)."""
    return [c for c in (S.ID, S.SRC_FILE, S.SRC_ROW) if c in columns]


TOKENIZE_ROWS = 1024  # rows tokenised at a time: the Python lists of one chunk are all that is held


def tokenize_table(t: pa.Table, tok: Any, cfg: "FinetuneConfig") -> pa.Table:  # noqa: ANN401
    """`input_ids` and `n_prompt` of each row (`tokenize_pairs`), a chunk of rows at a time."""
    parts = []
    for lo in range(0, t.num_rows, TOKENIZE_ROWS):
        c = t.slice(lo, TOKENIZE_ROWS)
        prompts = [p or "" for p in c.column(cfg.prompt_column).to_pylist()]
        responses = [r or "" for r in c.column(cfg.response_column).to_pylist()]
        exs = tokenize_pairs(tok, prompts, responses, cfg.max_tokens, cfg.chat_template)
        n_prompt = [next((i for i, v in enumerate(e.labels) if v != IGNORE_INDEX), len(e.labels)) for e in exs]
        parts.append(pa.table({"input_ids": pa.array([e.input_ids for e in exs], pa.list_(pa.int32())),
                               "n_prompt": pa.array(n_prompt, pa.int32())}, schema=SCHEMA))
    return pa.concat_tables(parts).combine_chunks() if parts else SCHEMA.empty_table()


def _write_shard(fs: Any, dir_path: str, name: str, table: pa.Table) -> None:  # noqa: ANN401
    from igds_ray.storage import write_whole

    buf = pa.BufferOutputStream()
    with pa.ipc.new_file(buf, SCHEMA) as w:
        w.write_table(table.select(SCHEMA.names).cast(SCHEMA))
    write_whole(fs, dir_path, name, buf.getvalue())


def build(cfg: "FinetuneConfig", sel: "Selection", run_uri: str, tok: Any, local_max_rows: int | None = None  # noqa: ANN401
          ) -> dict[str, Any]:
    """Tokenise the selection into `<run_uri>/tokens/` unless a committed one is there; returns its manifest."""
    out = StageDir(join(run_uri, TOKENS_DIR))
    if out.done():
        m = out.manifest()
        if m.get("rows") == sel.n_rows:
            return m
    staging = out.begin(overwrite=True)
    assert staging is not None
    staging_path = filesystem(staging)[1]
    keys = order_keys(sel.columns)
    cols = keys + [c for c in (cfg.prompt_column, cfg.response_column) if c not in keys]
    limit = LOCAL_MAX_ROWS if local_max_rows is None else local_max_rows
    if sel.n_rows <= limit:
        shards, how = _build_local(cfg, sel, tok, cols, keys, out.fs, staging_path), "local"
    else:
        shards, how = _build_ray(cfg, sel, cols, keys, out.fs, staging_path), "ray_data"
    rows = sum(n for _, n in shards)
    if rows != sel.n_rows:
        raise StageOutputError(f"arm {cfg.arm!r}: tokenised {rows} rows of a selection of {sel.n_rows}")
    return out.commit(staging, {"stage": "tokens", "rows": rows, "tokenized_in": how,
                                "shards": [{"name": n, "rows": r} for n, r in shards]}, suffix=SUFFIX)


def _build_local(cfg: "FinetuneConfig", sel: "Selection", tok: Any, cols: list[str], keys: list[str],  # noqa: ANN401
                 fs: Any, staging_path: str) -> list[tuple[str, int]]:
    import pyarrow.dataset as pads

    t = pads.dataset(sel.files, format="parquet", filesystem=sel.fs).to_table(columns=cols)
    if keys:
        t = t.sort_by([(k, "ascending") for k in keys])
    shards = []
    for i, lo in enumerate(range(0, t.num_rows, SHARD_ROWS)):
        name = f"shard-{i:06d}{SUFFIX}"
        part = t.slice(lo, SHARD_ROWS)
        _write_shard(fs, staging_path, name, tokenize_table(part, tok, cfg))
        shards.append((name, part.num_rows))
    return shards


class _Tokenize:
    """A CPU actor of the Ray Data path: loads the tokenizer once."""

    def __init__(self, cfg: dict[str, Any], keys: list[str]) -> None:
        from igds_ray.config import from_dict
        from igds_ray.stages.finetune import FinetuneConfig
        from igds_ray.stages.finetune_train import training_tokenizer

        self.cfg = from_dict(FinetuneConfig, cfg)
        self.tok = training_tokenizer(self.cfg.model)
        self.keys = keys

    def __call__(self, t: pa.Table) -> pa.Table:
        out = tokenize_table(t, self.tok, self.cfg)
        # Each row keeps its order keys, so that whichever way Ray Data cuts the output into blocks, a
        # shard's first row says where it goes.
        for i, k in enumerate(self.keys):
            out = out.append_column(f"_key{i}", t.column(k))
        return out


def _shard_sink(fs: Any, staging_path: str) -> Any:  # noqa: ANN401
    from ray.data.block import BlockAccessor
    from ray.data.datasource import Datasink

    class ShardSink(Datasink):
        def __init__(self) -> None:
            self.shards: list[tuple[list, str, int]] = []

        def get_name(self) -> str:
            return "IGDSTokenShards"

        def write(self, blocks, ctx) -> str:  # noqa: ANN001
            done = []
            for b in blocks:  # one shard per block: a block is a contiguous run of the sorted rows
                t = BlockAccessor.for_block(b).to_arrow()
                if not t.num_rows:
                    continue
                name = f"shard-{uuid.uuid4().hex}{SUFFIX}"
                _write_shard(fs, staging_path, name, t)
                first = [t.column(c)[0].as_py() for c in t.column_names if c.startswith("_key")]
                done.append([first, name, t.num_rows])
            return json.dumps(done)

        def on_write_complete(self, write_result) -> None:  # noqa: ANN001
            for ret in write_result.write_returns:
                self.shards.extend(json.loads(ret or "[]"))

    return ShardSink()


def _build_ray(cfg: "FinetuneConfig", sel: "Selection", cols: list[str], keys: list[str], fs: Any,  # noqa: ANN401
               staging_path: str) -> list[tuple[str, int]]:
    import ray

    from igds_ray.config import to_dict
    from igds_ray.stages.score import init_ray

    init_ray()
    ds = ray.data.read_parquet(sel.files, filesystem=sel.fs, columns=cols)
    if keys:
        ds = ds.sort(keys)
    ds = ds.map_batches(_Tokenize, fn_constructor_kwargs={"cfg": to_dict(cfg), "keys": keys},
                        batch_format="pyarrow", batch_size=BLOCK_ROWS, num_cpus=1, concurrency=(1, 4))
    sink = _shard_sink(fs, staging_path)
    ds.write_datasink(sink, ray_remote_args={"num_cpus": 0})
    if keys:
        firsts = [tuple(s[0]) for s in sink.shards]
        if len(set(firsts)) != len(firsts):
            raise StageOutputError(f"arm {cfg.arm!r}: two token shards begin with the same key {firsts[0]}")
        sink.shards.sort(key=lambda s: tuple(s[0]))
    return [(name, n) for _, name, n in sink.shards]


class TokenShards:
    """The committed shards of a run, memory-mapped; rows by their index in the global order."""

    def __init__(self, tokens_uri: str) -> None:
        sd = StageDir(tokens_uri)
        manifest = sd.manifest()
        fs, path = filesystem(tokens_uri)
        from igds_ray.storage import is_local

        if not is_local(fs):  # mmap needs a local file: copy the shards to this node's disk once
            import pyarrow.fs as pafs

            self._tmp = tempfile.TemporaryDirectory(prefix="igds-tokens-")
            pafs.copy_files(path, self._tmp.name, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            path = self._tmp.name
        self.paths = [os.path.join(path, s["name"]) for s in manifest["shards"]]
        rows = [int(s["rows"]) for s in manifest["shards"]]
        self.starts = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
        self.n_rows = int(self.starts[-1])
        self._open: OrderedDict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()

    def _shard(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if i in self._open:
            self._open.move_to_end(i)
        else:
            t = pa.ipc.open_file(pa.memory_map(self.paths[i], "r")).read_all()  # zero-copy over the mapping
            ids = t.column("input_ids").combine_chunks()
            self._open[i] = (ids.offsets.to_numpy(), ids.values.to_numpy(), t.column("n_prompt").to_numpy())
            while len(self._open) > OPEN_SHARDS:  # a file descriptor per open map: stay under the limits
                self._open.popitem(last=False)
        return self._open[i]

    def examples(self, rows: Sequence[int]) -> list[TrainExample]:
        out = []
        for r in rows:
            i = int(np.searchsorted(self.starts, r, side="right")) - 1
            off, vals, n_prompt = self._shard(i)
            j = int(r - self.starts[i])
            ids = vals[off[j]:off[j + 1]].tolist()
            k = int(n_prompt[j])
            out.append(TrainExample(ids, [IGNORE_INDEX] * k + ids[k:]))
        return out
