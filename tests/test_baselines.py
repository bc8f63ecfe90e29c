"""Baselines: loss/IFD against a direct transformers computation, random's determinism, ZIP's greedy
choice on a pool small enough to check by hand, and every scorer as a Ray job feeding `select`."""

from __future__ import annotations

import shutil
import zlib

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from igds_ray import pool as P
from igds_ray import schema as S
from igds_ray.baselines import ARMS, select_config
from igds_ray.baselines import lm as LM
from igds_ray.baselines import random as RND
from igds_ray.baselines import zip as ZIP
from igds_ray.baselines.common import IFD, LOSS, UNCOND_LOSS, ZIP_POS, ZIP_SHARD, uniform01
from igds_ray.config import PoolConfig, from_dict
from igds_ray.errors import ConfigError
from igds_ray.stages import select

BAD_ROWS = [  # (prompt, response, expected error)
    (None, "x", "prompt is null"),
    ("Tom has 3 apples.", None, "response is null"),
    ("Tom has 3 apples.", "", "response is empty or whitespace only"),
    ("Tom has 3 apples.", "  \n", "response is empty or whitespace only"),
    ("   ", "4", "prompt is empty or whitespace only"),
    ("Tom has 3 apples.", "3 + 1 = 4 #### 4", None),
]


def table_of(rows: list[dict]) -> pa.Table:
    """Rows as the pool reader hands them to a scorer."""
    n = len(rows)
    cols = {S.ID: pa.array([f"r{i}" for i in range(n)]), S.SRC_FILE: pa.array(["f"] * n),
            S.SRC_ROW: pa.array(range(n), pa.int64())}
    errors = [None] * n
    for c in ("prompt", "response"):
        vals, errs = P._as_text(pa.chunked_array([pa.array([r.get(c) for r in rows], pa.string())]), c)
        cols[c] = pa.array(vals, pa.large_string())
        errors = [a or b for a, b in zip(errors, errs)]
    cols[S.INPUT_ERROR] = pa.array(errors, pa.string())
    return pa.table(cols)


def lm_cfg(world, out="unused", pool=None, **kw) -> LM.LMConfig:
    return from_dict(LM.LMConfig, dict(model=str(world.model_dir), pool=str(pool or world.pool_dir), out=str(out),
                                       **kw))


def errors_of(df: pd.DataFrame) -> list[str | None]:
    return [None if pd.isna(e) else e for e in df[S.ERROR]]


@pytest.fixture(scope="module")
def reference(world):
    tok = AutoTokenizer.from_pretrained(world.model_dir)
    model = AutoModelForCausalLM.from_pretrained(world.model_dir).eval()
    return tok, model


def direct_nll(model, ids: list[int], n_ctx: int) -> float:
    """Naive path: one sequence, full forward, log_softmax over the vocabulary, mean NLL after n_ctx."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    return float(-np.mean([logp[t - 1, ids[t]].item() for t in range(n_ctx, len(ids))]))


def direct_row(tok, model, prompt: str, response: str, max_tokens: int = 10_000) -> tuple[float, float]:
    p = tok(prompt).input_ids  # BOS + prompt
    r = tok(response, add_special_tokens=False).input_ids[: max_tokens - len(p)]
    return direct_nll(model, p + r, len(p)), direct_nll(model, [tok.bos_token_id] + r, 1)


@pytest.fixture(scope="module")
def mixed_pool(world, tmp_path_factory):
    """The world's 200-row pool (2 files) plus a third file of rows no arm can use."""
    root = tmp_path_factory.mktemp("mixed") / "pool"
    root.mkdir()
    for f in sorted(world.pool_dir.glob("*.parquet")):
        shutil.copy(f, root / f.name)
    prompts, responses, _ = zip(*BAD_ROWS)
    pq.write_table(pa.table({"prompt": pa.array(prompts, pa.string()), "response": pa.array(responses, pa.string()),
                             "text": ["t"] * len(BAD_ROWS)}), root / "part-bad.parquet")
    return root


# --------------------------------------------------------------------------------------------
# loss + IFD


def test_loss_and_ifd_equal_direct_computation(world, reference):
    tok, model = reference
    # A small token budget: many micro-batches mixing conditional and unconditional sequences.
    scorer = LM.LMScorer(lm_cfg(world, token_budget=96, max_tokens=64))
    assert scorer.nll.split, "the chunked LM-head path should pass its start-up check on Llama"
    pool = P.discover(str(world.pool_dir), ("prompt", "response"), None)
    table = P.read_chunk(P.filesystem(str(world.pool_dir))[0], pool, pool.files[0], 0, [0]).slice(0, 12)
    out = scorer.score_table(table).to_pylist()
    ref = np.array([direct_row(tok, model, r["prompt"], r["response"]) for r in table.to_pylist()])
    got = np.array([[o[LOSS], o[UNCOND_LOSS]] for o in out])
    # Stated tolerance: batched, right-padded float32 forward vs one float64 log_softmax per row.
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([o[IFD] for o in out], np.exp(ref[:, 0] - ref[:, 1]), rtol=1e-5)
    assert [o[S.SCORE] for o in out] == [o[LOSS] for o in out]
    assert all(o[S.ERROR] is None and o[S.N_TOKENS] > 0 for o in out)
    # The full-forward fallback gives the same numbers.
    scorer.nll.split = False
    again = scorer.score_table(table).column(LOSS).to_numpy()
    np.testing.assert_allclose(again, ref[:, 0], rtol=1e-5, atol=1e-6)


def test_lm_bad_and_truncated_rows(world, reference):
    tok, model = reference
    scorer = LM.LMScorer(lm_cfg(world, max_tokens=16, token_budget=64))
    rows = [{"prompt": p, "response": r} for p, r, _ in BAD_ROWS]
    rows += [{"prompt": "Tom has 3 apples.", "response": "and then " * 20},  # truncated
             {"prompt": "x " * 30, "response": "y"}]  # the prompt fills max_tokens
    out = scorer.score_table(table_of(rows)).to_pylist()
    assert [o[S.ID] for o in out] == [f"r{i}" for i in range(len(rows))]
    assert [o[S.ERROR] for o in out[: len(BAD_ROWS)]] == [e for _, _, e in BAD_ROWS]
    assert all(o[LOSS] is None and o[IFD] is None and o[S.SCORE] is None for o in out[:5])
    long = out[len(BAD_ROWS)]
    assert long[S.TRUNCATED] and long[S.ERROR] is None
    loss, unc = direct_row(tok, model, rows[-2]["prompt"], rows[-2]["response"], max_tokens=16)
    assert long[LOSS] == pytest.approx(loss, rel=1e-5) and long[UNCOND_LOSS] == pytest.approx(unc, rel=1e-5)
    assert out[-1][S.ERROR].startswith("response truncated away")


def test_lm_config_refuses_a_text_column(world):
    with pytest.raises(ConfigError, match="not pool.text_column"):
        from_dict(LM.LMConfig, dict(model=str(world.model_dir), pool={"path": "p", "text_column": "text"}, out="o"))


@pytest.fixture(scope="module")
def lm_scores(world, ray_local, mixed_pool, tmp_path_factory):
    out = tmp_path_factory.mktemp("lm") / "scores"
    m = LM.run(lm_cfg(world, out=out, pool=mixed_pool, batch_size=64, max_tokens=64, token_budget=512))
    return out, m


def test_lm_job_one_row_per_pool_row(lm_scores, reference):
    out, m = lm_scores
    df = pd.read_parquet(out)
    assert len(df) == m["rows"] == 206 and df[S.ID].is_unique and m["errors"] == 5
    bad = df[df[S.SRC_FILE] == "part-bad.parquet"].sort_values(S.SRC_ROW)
    assert errors_of(bad) == [e for _, _, e in BAD_ROWS]
    ok = df[df[S.ERROR].isna()]
    np.testing.assert_allclose(ok[IFD], np.exp(ok[LOSS] - ok[UNCOND_LOSS]), rtol=1e-12)
    assert (ok[S.SCORE] == ok[LOSS]).all() and m["tokens"] == int(df[S.N_TOKENS].sum())
    # Spot-check one pool row against the direct computation.
    tok, model = reference
    first = ok.sort_values([S.SRC_FILE, S.SRC_ROW]).iloc[0]
    pool_row = pd.read_parquet(m["pool"]["uri"] + "/" + first[S.SRC_FILE]).iloc[int(first[S.SRC_ROW])]
    loss, unc = direct_row(tok, model, pool_row["prompt"], pool_row["response"], max_tokens=64)
    assert first[LOSS] == pytest.approx(loss, rel=1e-5) and first[UNCOND_LOSS] == pytest.approx(unc, rel=1e-5)


def test_ifd_selection_never_picks_ifd_above_one(lm_scores, tmp_path):
    out, _ = lm_scores
    df = pd.read_parquet(out)
    assert (df[IFD] > 1).any() and (df[IFD] <= 1).any(), "the pool should hold rows on both sides of IFD = 1"
    m = select.run(select_config("ifd", str(out), str(tmp_path), fraction=0.5, write_rows=False))
    chosen = pd.read_parquet(tmp_path / "ifd.parquet")
    assert len(chosen) == m["rows"] > 0
    ifd = df.set_index(S.ID).loc[chosen[S.ID], IFD]
    assert (ifd <= 1.0).all()
    eligible = df[df[IFD] <= 1.0]
    assert set(chosen[S.ID]) == set(eligible.nlargest(len(chosen), IFD)[S.ID])
    assert ARMS["loss"].score_column == LOSS and ARMS["ifd"].max_score == 1.0


# --------------------------------------------------------------------------------------------
# random


def test_uniform01_is_deterministic_and_uniform():
    ids = [f"part-000.parquet:{i}" for i in range(20000)]
    u = uniform01(7, ids)
    assert np.array_equal(u, uniform01(7, ids)) and not np.array_equal(u, uniform01(8, ids))
    assert (u >= 0).all() and (u < 1).all()
    counts, _ = np.histogram(u, bins=10, range=(0, 1))
    chi2 = float(((counts - 2000) ** 2 / 2000).sum())
    assert chi2 < 27.9, counts  # chi-square, 9 dof, p = 0.001
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.03  # consecutive ids are not correlated
    assert uniform01(0, [1])[0] != uniform01(0, ["1"])[0]


def test_random_job_is_seeded(ray_local, mixed_pool, tmp_path):
    def run(seed, name):
        cfg = RND.RandomConfig(pool=PoolConfig(path=str(mixed_pool)), out=str(tmp_path / name), seed=seed,
                               batch_size=50)
        m = RND.run(cfg)
        df = pd.read_parquet(cfg.out)
        # What `select` keeps at fraction 0.5 (exact top half, ties by id; checked in test_select.py).
        top = set(df.dropna(subset=[S.SCORE]).sort_values([S.SCORE, S.ID], ascending=[False, True]).head(100)[S.ID])
        return m, df, top

    m, a, sel_a = run(0, "a")
    _, b, sel_b = run(0, "b")
    _, c, sel_c = run(1, "c")
    assert m["rows"] == len(a) == 206 and m["errors"] == 5 and a[S.ID].is_unique
    assert a.set_index(S.ID)[S.SCORE].sort_index().equals(b.set_index(S.ID)[S.SCORE].sort_index()) and sel_a == sel_b
    assert sel_a != sel_c and 0.3 < len(sel_a & sel_c) / 100 < 0.7
    bad = a[a[S.SRC_FILE] == "part-bad.parquet"].sort_values(S.SRC_ROW)
    assert errors_of(bad) == [e for _, _, e in BAD_ROWS] and bad[S.SCORE].isna().sum() == 5
    # `full`: fraction 1.0 of any scores keeps every usable row.
    fm = select.run(select_config("full", str(tmp_path / "a"), str(tmp_path / "sel"), write_rows=False))
    assert fm["rows"] == 201 and ARMS["full"].scorer is None
    assert set(pd.read_parquet(tmp_path / "sel" / "full.parquet")[S.ID]) == set(a[a[S.ERROR].isna()][S.ID])


# --------------------------------------------------------------------------------------------
# ZIP

A = b"the quick brown fox jumps over the lazy dog"
B = b"pack my box with five dozen liquor jugs, said the wizard"
C = b"sphinx of black quartz, judge my vow!"
SMALL = [A, A, B, C, A + b"!", B]  # groups: A (two copies and a near copy), B (two copies), C
GROUP = ["A", "A", "B", "C", "A", "B"]


def raw_size(data: bytes, zdict: bytes = b"") -> int:
    """Hand check: raw deflate at level 6, written out again without the module's helpers."""
    c = zlib.compressobj(6, zlib.DEFLATED, -15, zdict=zdict) if zdict else zlib.compressobj(6, zlib.DEFLATED, -15)
    return len(c.compress(data) + c.flush())


def test_zip_picks_one_of_each_group_first_by_hand():
    order, ratios = ZIP.zip_order(SMALL, k1=len(SMALL), k2=1)  # K1 = pool, K2 = 1: the exact greedy
    assert sorted(order) == list(range(len(SMALL)))
    assert {GROUP[i] for i in order[:3]} == {"A", "B", "C"}, order  # one of each group before any copy
    # By hand: pick 1 = lowest own ratio len / deflated len (C: short, no repeats).
    own = [len(x) / raw_size(x) for x in SMALL]
    assert order[0] == min(range(6), key=lambda i: (own[i], i)) == 3 and ratios[0] == pytest.approx(own[3])
    # Pick k+1 = lowest ratio of (selected + x) = (|S| + |x|) / (C(S) + C(x | dictionary S)), with
    # C(S) the sum of the increments of the rows picked so far.
    sel, size = [3], raw_size(SMALL[3])
    for k in range(1, 6):
        s = b"".join(SMALL[i] for i in sel)
        ratio = {i: (len(s) + len(x)) / (size + raw_size(x, zdict=s)) for i, x in enumerate(SMALL) if i not in sel}
        best = min(ratio, key=lambda i: (ratio[i], i))
        assert order[k] == best and ratios[k] == pytest.approx(ratio[best]), k
        size += raw_size(SMALL[best], zdict=s)
        sel.append(best)
    assert order == [3, 2, 4, 0, 1, 5]
    assert min(ratios[3:]) > 1.3 > max(ratios[:3])  # a copy compresses to a few bytes: the set's ratio jumps
    # The dictionary approximation vs compressing the concatenation as one stream: the same matches,
    # but each piece is its own deflate block, which costs tiny rows like these about 25% more.
    one_stream = raw_size(b"".join(SMALL[i] for i in order))
    assert one_stream <= size <= 1.3 * one_stream


def test_zip_k1_window_and_k2_batches():
    texts = [bytes(f"row {i} " * (1 + i % 7), "ascii") for i in range(40)]
    full = ZIP.zip_order(texts, k1=40, k2=1)[0]
    assert sorted(full) == list(range(40))
    # K1 = K2: no re-evaluation beyond the candidate window; still a permutation.
    assert sorted(ZIP.zip_order(texts, k1=5, k2=5)[0]) == list(range(40))
    assert ZIP.zip_order(texts, k1=40, k2=1) == ZIP.zip_order(texts, k1=40, k2=1)
    with pytest.raises(ConfigError, match="k2"):
        ZIP.ZipConfig(pool=PoolConfig(path="p"), out="o", k1=2, k2=3)


def test_zip_job_one_shard_matches_the_greedy_order(ray_local, tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    prompts = [x.decode() for x in SMALL] + [None]
    pq.write_table(pa.table({"id": list(range(10, 17)), "prompt": prompts,
                             "response": ["ok"] * 7}), pool / "a.parquet")
    cfg = from_dict(ZIP.ZipConfig, dict(pool={"path": str(pool)}, out=str(tmp_path / "zip"), k1=7, k2=1))
    m = ZIP.run(cfg)
    df = pd.read_parquet(cfg.out).sort_values(S.ID)
    assert m["rows"] == 7 and df[S.ID].tolist() == list(range(10, 17)) and df[S.ERROR].tolist()[-1] == "prompt is null"
    order, _ = ZIP.zip_order([x + b"\nok" for x in SMALL], k1=7, k2=1)
    assert df[ZIP_POS].tolist()[:6] == [order.index(i) for i in range(6)]
    np.testing.assert_allclose(df[S.SCORE].tolist()[:6], [1 - order.index(i) / 6 for i in range(6)])
    top = df.dropna(subset=[S.SCORE]).sort_values(S.SCORE, ascending=False).head(3)
    assert top[S.ID].tolist() == [10 + i for i in order[:3]]  # what select keeps at fraction 0.5


def test_zip_job_sharded(ray_local, mixed_pool, tmp_path):
    cfg = from_dict(ZIP.ZipConfig, dict(pool={"path": str(mixed_pool)}, out=str(tmp_path / "zip"), k1=32, k2=4,
                                        shard_rows=60))
    m = ZIP.run(cfg)
    df = pd.read_parquet(cfg.out)
    assert m["rows"] == len(df) == 206 and df[S.ID].is_unique and m["errors"] == 5
    ok = df[df[S.ERROR].isna()]
    assert ok[ZIP_SHARD].nunique() == ZIP.n_shards(206, 60) == 4
    for _, g in ok.groupby(ZIP_SHARD):  # each shard is one full greedy order
        assert sorted(g[ZIP_POS]) == list(range(len(g)))
        np.testing.assert_allclose(g[S.SCORE], 1 - g[ZIP_POS] / len(g))
    sm = select.run(select_config("zip", cfg.out, str(tmp_path / "sel"), fraction=0.5, write_rows=False))
    chosen = pd.read_parquet(tmp_path / "sel" / "zip.parquet")
    assert sm["rows"] == len(chosen) == 100
    # About the first half of every shard.
    per_shard = ok.set_index(S.ID).loc[chosen[S.ID]].groupby(ZIP_SHARD).size() / ok.groupby(ZIP_SHARD).size()
    assert per_shard.between(0.4, 0.6).all(), per_shard
