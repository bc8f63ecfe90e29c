"""Incremental scoring of a growing pool (`score.incremental`, `igds score --incremental`).

A finished scores directory is one version. When the pool has changed since, an increment scores only
what is new and commits the next version in the same directory:
- pool files are keyed by relative path, size, modification time and row groups (`file_keys`); the
  committed manifest records the keys it scored;
- a committed part is reused, not copied, when every pool file its rows come from (the [start, end) runs
  in its footer summary) is unchanged; the other committed parts are dropped after the new version is
  committed, and their rows that still exist are scored again with the new and changed files' rows;
- the new version's manifest lists the reused and the new parts, and `reused_rows`, `scored_rows`,
  `added_files`, `changed_files`, `removed_files`, `dropped_parts`, `version`, `versions`;
- exactly once holds as for a fresh run: the reused and new parts' summaries must add up to the grown
  pool's row count and checksum before anything is committed, and an increment killed midway resumes
  from its own finished parts (the attempt carries the grown pool's fingerprint).
Only stages whose rows are scored one by one can grow (`igds`, `loss+ifd`); ZIP's ranks depend on the
other rows of a shard.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass, field
from typing import Any

from igds_ray.config import to_dict
from igds_ray.errors import ConfigError


def file_keys(pool: Any) -> dict[str, list[int]]:  # noqa: ANN401
    """rel -> [size, mtime in ns (-1: unknown), rows]: what tells a changed pool file from the one scored (from
    the pool's listing and footers: no request per file)."""
    return {f.rel: [int(f.size), int(f.mtime_ns), int(f.num_rows)] for f in pool.files}


def config_fingerprint(method: str, cfg: Any, pool: Any, runtime_keys: frozenset[str]) -> str:  # noqa: ANN401
    """The fingerprint of what decides each row's score, without the pool's file list: parts of versions with
    the same one can be reused."""
    d = {k: v for k, v in to_dict(cfg).items() if k not in runtime_keys}
    if isinstance(d.get("pool"), dict):
        d["pool"] = {k: v for k, v in d["pool"].items() if k not in ("rows_per_read_task", "path")}
    blob = json.dumps({"method": method, "config": d, "id_column": pool.id_column,
                       "text_columns": list(pool.text_columns)}, sort_keys=True, default=str)
    return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()


@dataclass
class Increment:
    version: int
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    reuse: dict[str, dict[str, Any]] = field(default_factory=dict)  # committed part name -> its summary
    drop: list[str] = field(default_factory=list)  # committed parts not reused

    @property
    def reused_rows(self) -> int:
        return sum(int(s["rows"]) for s in self.reuse.values())

    def facts(self) -> dict[str, Any]:
        return {"version": self.version, "added_files": self.added, "changed_files": self.changed,
                "removed_files": self.removed, "reused_rows": self.reused_rows, "reused_parts": len(self.reuse),
                "dropped_parts": len(self.drop)}


def plan(out: Any, prev: dict[str, Any], keys: dict[str, list[int]], cfp: str, method: str  # noqa: ANN401
         ) -> Increment | None:
    """What an increment of the committed version `prev` (its manifest) must do for a pool with `keys`;
    None when nothing changed. Reads the committed parts' footers (O(parts))."""
    from igds_ray.stages.parts import read_summaries

    if prev.get("config_fingerprint") is None or prev.get("file_keys") is None:
        raise ConfigError(f"{out.uri}: these scores were committed without file keys (before incremental scoring): "
                          "score once with overwrite, then increments can follow")
    if prev["config_fingerprint"] != cfp:
        raise ConfigError(f"{out.uri}: the committed scores were written with another {method} config (model, "
                          "SAE, features, pooling, columns or template): an increment cannot reuse them; use "
                          "overwrite, or another output directory")
    old = prev["file_keys"]
    inc = Increment(version=int(prev.get("version", 1)) + 1)
    inc.added = sorted(set(keys) - set(old))
    inc.removed = sorted(set(old) - set(keys))
    inc.changed = sorted(r for r in set(keys) & set(old) if list(keys[r]) != list(old[r]))
    if not (inc.added or inc.removed or inc.changed):
        return None
    stale = set(inc.removed) | set(inc.changed)
    paths = {n: posixpath.join(out.path, n) for n in prev["files"]}
    summaries = read_summaries(out.fs, list(paths.values()))
    for name, path in paths.items():
        s = summaries.get(path)
        if s is None or s.get("runs") is None or set(s["runs"]) & stale:
            inc.drop.append(name)  # rows of a changed or removed file (or no summary): scored again if they exist
        else:
            inc.reuse[name] = s
    return inc


def carry(out: Any, inc: Increment, staging_path: str, fingerprint: str, keep_files: set[str]  # noqa: ANN401
          ) -> dict[str, int]:
    """Write, into the increment's attempt, the rows of dropped committed parts that come from unchanged pool
    files (a part may hold rows of several files): they keep their scores without another forward pass.
    Returns {part name: rows}. The names hash the rows' keys, so a resumed increment rewrites the same parts."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from igds_ray import schema as S
    from igds_ray.stages.parts import summarize, with_summary
    from igds_ray.storage import part_name, write_part

    out_names: dict[str, int] = {}
    for name in inc.drop:
        path = posixpath.join(out.path, name)
        with out.fs.open_input_file(path) as f:
            t = pq.read_table(f)
        t = t.replace_schema_metadata(None)
        col = t.column(S.SRC_FILE)
        mask = pc.is_in(col, value_set=pa.array(sorted(keep_files), type=col.type))  # typed: keep_files may be empty
        t = t.filter(mask)
        if t.num_rows == 0:
            continue
        new = part_name(t, (S.SRC_FILE, S.SRC_ROW))
        write_part(out.fs, staging_path, new, with_summary(t, summarize(t, fingerprint)))
        out_names[new] = t.num_rows
    return out_names
