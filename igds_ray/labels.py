"""A labelled pool's columns joined to a stage's rows by (src_file, src_row), in bounded memory.

The report's composition table and the label AUROCs read a pool column (a world's `kind`, `correct`) for
every row of a selection or a scores directory. Nothing here holds one value per pool row: the stage's
parts are read one at a time, each part's rows are looked up file by file, and at most `cache_rows` label
values (a few pool files' columns) are cached. Scores parts keep the rows of a read task together, so each
part touches few files; a rank-ordered selection's part may touch every file, which costs reads, not memory.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from igds_ray import schema as S
from igds_ray.errors import ConfigError, StageOutputError

CACHE_ROWS = 4_000_000  # label values cached across pool files
AUROC_BINS = 1 << 20  # histogram bins of the scores for the label AUROC (error bound reported)


class PoolColumn:
    """One column of a pool, by (file, row), with an LRU cache of whole files' columns."""

    def __init__(self, pool_path: str, column: str, key: str, cache_rows: int = CACHE_ROWS) -> None:
        from igds_ray.pool import list_files

        self.fs, files = list_files(pool_path)
        self.paths = {rel: path for path, rel, _size in files}
        self.pool_path, self.column, self.key, self.cache_rows = pool_path, column, key, cache_rows
        self._cache: OrderedDict[str, pa.Array] = OrderedDict()
        self._rows = 0

    def file(self, rel: str) -> pa.Array | None:
        import pyarrow.parquet as pq

        if rel in self._cache:
            self._cache.move_to_end(rel)
            return self._cache[rel]
        path = self.paths.get(rel)
        if path is None:
            return None
        with self.fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            if self.column not in pf.schema_arrow.names:
                raise ConfigError(f"{self.key}: pool file {rel} has no column {self.column!r}")
            col = pf.read(columns=[self.column]).column(0).combine_chunks()
        self._cache[rel] = col
        self._rows += len(col)
        while self._rows > self.cache_rows and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._rows -= len(old)
        return col

    def counts(self) -> dict[str, int]:
        """Rows per value (as text) over the whole pool, one file at a time."""
        out: dict[str, int] = {}
        for rel in self.paths:
            vc = pc.value_counts(pc.cast(self.file(rel), pa.string()))
            for v, c in zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist()):
                out[str(v)] = out.get(str(v), 0) + c
        return out


def joined(stage_uri: str, pool: PoolColumn, columns: Sequence[str] = (), strict: bool = True
           ) -> Iterator[tuple[str, pa.Array, pa.Table]]:
    """(pool file, its column's values, the stage's `columns`) for the rows of a finished stage directory, a file group
    of one part at a time. A row naming a file or row the pool lacks raises (`strict`) or gets a null."""
    import pyarrow.parquet as pq

    from igds_ray.storage import StageDir, filesystem

    sd = StageDir(stage_uri)
    for uri in sd.files():
        extra = [c for c in columns if c not in (S.SRC_FILE, S.SRC_ROW)]
        t = pq.read_table(filesystem(uri)[1], columns=[S.SRC_FILE, S.SRC_ROW, *extra], filesystem=sd.fs)
        files = t.column(S.SRC_FILE).combine_chunks().dictionary_encode()
        idx = files.indices.to_numpy(zero_copy_only=False)
        rows = t.column(S.SRC_ROW).to_numpy()
        by_file = np.argsort(idx, kind="stable")  # one sort, not a scan of the part per file
        bounds = np.searchsorted(idx[by_file], np.arange(len(files.dictionary) + 1))
        for i, rel in enumerate(files.dictionary.to_pylist()):
            at = by_file[bounds[i]:bounds[i + 1]]
            col = pool.file(rel)
            r = rows[at]
            bad = col is None or (len(r) and (r.min() < 0 or r.max() >= len(col)))
            if bad and strict:
                row = int(r[0]) if col is None else int(r[(r < 0) | (r >= len(col))][0])
                raise StageOutputError(f"{stage_uri}: row {rel}:{row} is not a row of the pool at {pool.pool_path}")
            if bad:
                ok = [col is not None and 0 <= int(x) < len(col) for x in r]
                vals = pa.array([col[int(x)].as_py() if g else None for x, g in zip(r, ok)],
                                col.type if col is not None else pa.null())
            else:
                vals = col.take(pa.array(r))
            yield rel, vals, t.take(pa.array(at)).select(list(columns))


def composition_counts(stage_uri: str, pool: PoolColumn, unknown: str = "(not a pool row)") -> dict[str, int]:
    """Rows per label value (as text) among a stage's rows."""
    out: dict[str, int] = {}
    for _, vals, _ in joined(stage_uri, pool, strict=False):
        text = pc.cast(vals, pa.string()) if vals.type != pa.null() else pa.nulls(len(vals), pa.string())
        vc = pc.value_counts(text)
        for v, c in zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist()):
            k = unknown if v is None else v
            out[k] = out.get(k, 0) + c
    return out


def histogram_auroc(stage_uri: str, pool: PoolColumn, bins: int = AUROC_BINS) -> dict[str, Any]:
    """AUROC of a scores directory's `score` for rows whose boolean pool label is true against false, from
    per-class histograms of the scores (two passes, `bins` equal-width bins over the scores' range: memory
    does not grow with the pool). Pairs in one bin count one half, as exact ties do; `auroc_max_error` bounds
    what that can move the figure (0 when every bin holds one score value, as when scores are few or tied)."""
    lo, hi, n_c, n_w, n_unscored = np.inf, -np.inf, 0, 0, 0

    def labelled() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for rel, vals, t in joined(stage_uri, pool, [S.SCORE]):
            if not (pa.types.is_boolean(vals.type) or pa.types.is_null(vals.type)):
                raise ConfigError(f"report.correct_column: column {pool.column!r} of pool file {rel} is "
                                  f"{vals.type}, not boolean")
            known = np.asarray(pc.is_valid(vals).to_numpy(zero_copy_only=False), bool)
            if pa.types.is_null(vals.type):  # a file whose column holds no value at all (e.g. off-task rows only)
                vals = pa.nulls(len(vals), pa.bool_())
            y = np.asarray(pc.fill_null(vals, False).to_numpy(zero_copy_only=False), bool) if len(vals) else \
                np.zeros(0, bool)
            s = np.asarray(t.column(S.SCORE).to_numpy(zero_copy_only=False), np.float64)
            yield s[known], y[known]

    for s, y in labelled():
        ok = np.isfinite(s)
        n_unscored += int((~ok).sum())
        if ok.any():
            lo, hi = min(lo, float(s[ok].min())), max(hi, float(s[ok].max()))
    pos, neg = np.zeros(bins, np.int64), np.zeros(bins, np.int64)
    vmin, vmax = np.full(bins, np.inf), np.full(bins, -np.inf)  # per bin, to tell one value from several
    width = (hi - lo) / bins if hi > lo else 1.0
    for s, y in labelled():
        ok = np.isfinite(s)
        s, y = s[ok], y[ok]
        b = np.minimum(((s - lo) / width).astype(np.int64), bins - 1) if len(s) else np.zeros(0, np.int64)
        np.add.at(pos, b[y], 1)
        np.add.at(neg, b[~y], 1)
        np.minimum.at(vmin, b, s)
        np.maximum.at(vmax, b, s)
    n_c, n_w = int(pos.sum()), int(neg.sum())
    out: dict[str, Any] = {"auroc": None, "n_correct": n_c, "n_wrong": n_w, "n_unscored": n_unscored,
                           "auroc_max_error": None}
    if n_c and n_w:
        below = np.cumsum(neg) - neg  # wrong rows in lower bins
        u = float((pos * below).sum() + 0.5 * (pos * neg).sum())
        mixed = vmax > vmin  # bins holding more than one score value
        out["auroc"] = u / (n_c * n_w)
        out["auroc_max_error"] = float(0.5 * (pos[mixed] * neg[mixed]).sum() / (n_c * n_w))
    return out
