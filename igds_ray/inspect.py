"""`igds inspect --scores DIR [--top 20] [--feature ID]`: the highest- and lowest-scoring rows of a scores
directory in the terminal, each with its score and its tokens shaded by activation, and where the
selection's cutoff falls between them.

Everything comes from the scores directory: its manifest names the model, SAE, features, pooling and
prompt rendering, so the tokens are read exactly where scoring read them (a second pass over only the
shown rows, `stages.cards_tokens`). The rows are found one part at a time (bounded memory). The cutoff
comes from the selections of the same run that read these scores (`<run>/selection/<arm>.parquet`).
"""

from __future__ import annotations

import posixpath
import sys
from typing import Any, TextIO

import numpy as np

from igds_ray import schema as S
from igds_ray.errors import ConfigError, StageOutputError

# 256-colour backgrounds from pale to strong orange; a token's activation picks one by its share of the row's max.
SHADES = (230, 223, 216, 215, 208, 202)


def _extremes(uri: str, col: int | None, n: int) -> tuple[list[dict], list[dict], int]:
    """(top n rows, bottom n rows, scored rows) by `score`, or by feature column `col` of `acts`."""
    import pyarrow.parquet as pq

    from igds_ray.storage import StageDir, filesystem

    sd = StageDir(uri)
    top: list[tuple] = []
    bottom: list[tuple] = []
    scored = 0
    for p in sd.files():
        t = pq.read_table(filesystem(p)[1], columns=[S.ID, S.SCORE, S.ACTS, S.SRC_FILE, S.SRC_ROW], filesystem=sd.fs)
        if col is None:
            v = np.asarray(t.column(S.SCORE).to_numpy(zero_copy_only=False), np.float64)
            keep = np.nonzero(np.isfinite(v))[0]
            v = v[keep]
        else:
            a, valid = _acts_any(t)
            keep = np.nonzero(valid)[0]
            v = a[:, col].astype(np.float64)
        scored += len(v)
        ids, files, rows = t.column(S.ID).to_pylist(), t.column(S.SRC_FILE).to_pylist(), t.column(S.SRC_ROW).to_pylist()
        for sign, acc in ((-1, top), (1, bottom)):
            for i in np.argsort(sign * v, kind="stable")[:n]:
                j = keep[i]
                acc.append((float(v[i]), files[j], int(rows[j]), ids[j]))
        top[:] = sorted(top, key=lambda x: (-x[0], x[1], x[2]))[:n]
        bottom[:] = sorted(bottom, key=lambda x: (x[0], x[1], x[2]))[:n]
    keys = ("value", "src_file", "src_row", "id")
    return [dict(zip(keys, x)) for x in top], [dict(zip(keys, x)) for x in bottom], scored


def _acts_any(t: Any) -> tuple[np.ndarray, np.ndarray]:
    from igds_ray.stages.cards import _acts

    col = t.column(S.ACTS)
    first = next((x for x in col.to_pylist() if x is not None), None)
    return _acts(col, len(first) if first else 1)


def cutoffs(scores_uri: str) -> list[dict]:
    """The selections beside these scores (`<run>/selection/<arm>.parquet` whose manifest names them)."""
    import pyarrow.fs as pafs

    from igds_ray.storage import StageDir, filesystem, join

    run = posixpath.dirname(posixpath.dirname(scores_uri.rstrip("/")))
    sel_root = join(run, "selection")
    fs, path = filesystem(sel_root)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    out = []
    for info in fs.get_file_info(pafs.FileSelector(path)):
        if not info.base_name.endswith(".parquet"):
            continue
        sd = StageDir(join(sel_root, info.base_name))
        if not sd.done():
            continue
        m = sd.manifest()
        if posixpath.normpath(m.get("scores", "")) == posixpath.normpath(scores_uri) and m.get("cutoff"):
            out.append({"arm": m.get("arm") or info.base_name.removesuffix(".parquet"), "rows": m.get("rows"),
                        "rows_scored": m.get("rows_scored"), "score": m["cutoff"]["score"],
                        "rank": m["cutoff"].get("rank"), "tie_block": m.get("tie_block")})
    return sorted(out, key=lambda c: c["arm"])


def _shade(tokens: list[str], acts: list[float], read: list[int], boundary: int, color: bool,
           special: list[int] = ()) -> str:
    """Tokens shaded by activation (share of the row's largest, special tokens left out); without colour, each
    active token is followed by its value in brackets. Tokens the score does not read are dimmed."""
    skip = set(special)
    hi = max([a for i, a in enumerate(acts) if a > 0 and i not in skip], default=0.0)
    read_set = set(read)
    out = []
    for i, (tok, a) in enumerate(zip(tokens, acts)):
        if i == boundary and i > 0:
            out.append(" ⏎response⏎ ")
        text = tok.replace("\n", "⏎")
        if i in skip:
            out.append(f"\x1b[2m{text}\x1b[0m" if color else text)
            continue
        if color:
            code = "" if a <= 0 or hi <= 0 else f"\x1b[48;5;{SHADES[min(len(SHADES) - 1, int(a / hi * len(SHADES)))]}m"
            dim = "" if i in read_set else "\x1b[2m"
            out.append(f"{dim}{code}{text}\x1b[0m" if (code or dim) else text)
        else:
            out.append(f"{text}[{a:.3g}]" if a > 0 else text)
    return "".join(out)


def inspect(scores: str, top: int = 20, feature: str | None = None, tokens: bool = True,
            color: bool | None = None, out: TextIO | None = None) -> dict[str, Any]:
    """Print the view; returns what it printed, as data (rows, cutoffs)."""
    from igds_ray.config import ScoreConfig, from_dict
    from igds_ray.storage import StageDir

    out = out or sys.stdout
    color = out.isatty() if color is None else color
    sd = StageDir(scores)
    if not sd.done():
        raise StageOutputError(f"igds inspect: {scores} is not a finished scores directory (no _SUCCESS)")
    m = sd.manifest()
    if m.get("stage") != "score" or "features" not in (m.get("config") or {}):
        raise ConfigError(f"igds inspect: {scores} holds {m.get('method') or m.get('stage')} scores, not IGDS feature "
                          "scores (written by igds score or igds run)")
    scfg = from_dict(ScoreConfig, m["config"])
    feats = list(scfg.features)
    col = None
    if feature is not None:
        if feature not in feats:
            raise ConfigError(f"--feature {feature}: these scores hold {', '.join(feats)}")
        col = feats.index(feature)
    hi, lo, scored = _extremes(scores, col, top)
    cuts = cutoffs(scores)
    by = f"feature {feature}" if feature else f"score (sum of {', '.join(feats)})"
    print(f"{scores}: {scored:,} scored rows of {m.get('rows', scored):,}; ranked by {by}, pooling {scfg.pooling}",
          file=out)
    shown: dict[tuple, dict] = {}
    if tokens and (hi or lo):
        from igds_ray.pool_rows import pool_rows_at
        from igds_ray.stages.cards import render_prompts
        from igds_ray.stages.cards_tokens import TokenActs

        keys = [(r["src_file"], r["src_row"]) for r in hi + lo]
        texts = pool_rows_at(scfg.pool, set(keys))
        keys = [k for k in dict.fromkeys(keys) if k in texts]
        ta = TokenActs(scfg.model, scfg.sae, feats, scfg.token_budget)
        prompts = render_prompts(m["config"], [texts[k][0] for k in keys])
        rows = ta.rows(prompts, [texts[k][1] for k in keys], scfg.pooling,
                       scfg.max_tokens, scfg.pool.chat_template)
        for k, r in zip(keys, rows):
            if isinstance(r, dict):
                a = r["acts"][:, col] if col is not None else r["acts"].sum(axis=1)
                shown[k] = {"tokens": ta_tokens(ta, r["ids"]), "acts": [float(x) for x in a], "read": r["read"],
                            "boundary": r["boundary"], "special": r["special"], "value": float(
                                r["pooled"][col] if col is not None else r["pooled"].sum())}

    def line(rank: str, r: dict) -> None:
        print(f"{rank:>8}  {r['value']:.5g}  id {r['id']}  ({r['src_file']}:{r['src_row']})", file=out)
        s = shown.get((r["src_file"], r["src_row"]))
        if s:
            print("          " + _shade(s["tokens"], s["acts"], s["read"], s["boundary"], color, s["special"]),
                  file=out)

    print(f"-- top {len(hi)} --", file=out)
    for i, r in enumerate(hi):
        line(f"#{i + 1}", r)
    for c in cuts:
        if feature is None:
            print(f"-- cutoff of selection {c['arm']}: keeps {c['rows']:,} of {c['rows_scored']:,} rows, the last at "
                  f"score {c['score']:.5g} (#{c['rank'] + 1}) --", file=out)
        else:
            print(f"-- selection {c['arm']} cuts on the summed score at {c['score']:.5g}, not on this feature --",
                  file=out)
    if not cuts:
        print("-- no selection of these scores found beside them (igds select writes one) --", file=out)
    print(f"-- bottom {len(lo)} --", file=out)
    for i, r in enumerate(lo):
        line(f"#{scored - i:,}", r)
    return {"top": hi, "bottom": lo, "scored": scored, "cutoffs": cuts, "tokens": {f"{k[0]}:{k[1]}": v
                                                                                 for k, v in shown.items()}}


def ta_tokens(ta: Any, ids: list[int]) -> list[str]:
    from igds_ray.stages.cards_tokens import _token_texts

    return _token_texts(ta.tok, ids)
