"""The scorer: parity with a direct transformers + sae-lens computation, bad rows, and the Ray job."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from sae_lens import SAE
from transformers import AutoModelForCausalLM, AutoTokenizer

from igds_ray import pool as P
from igds_ray import schema as S
from igds_ray.config import ScoreConfig, from_dict, to_dict
from igds_ray.errors import ModelSAEMismatch, PoolError, StageOutputError
from igds_ray.stages import score
from igds_ray.stages.score import FeatureScorer, micro_batches
from igds_ray.storage import StageDir

FEATS = [3, 17, 40]


def make_cfg(world, arch="jumprelu", pooling="last", text_column=None, out="unused", **kw):
    pool = {"path": str(world.pool_dir), "text_column": text_column, **kw.pop("pool", {})}
    return from_dict(ScoreConfig, dict(
        model=str(world.model_dir), sae=str(world.saes[arch]), features=[f"l0_p{i}" for i in FEATS],
        pool=pool, out=str(out), pooling=pooling, **kw))


def table_of(rows: list[dict], text_columns=("prompt", "response")) -> pa.Table:
    """Rows as the pool reader hands them to a scorer."""
    n = len(rows)
    cols = {S.ID: pa.array([f"r{i}" for i in range(n)]), S.SRC_FILE: pa.array(["f"] * n),
            S.SRC_ROW: pa.array(range(n), pa.int64())}
    errors = [None] * n
    for c in text_columns:
        vals, errs = P._as_text(pa.chunked_array([pa.array([r.get(c) for r in rows])]), c)
        cols[c] = pa.array(vals, pa.large_string())
        errors = [a or b for a, b in zip(errors, errs)]
    cols[S.INPUT_ERROR] = pa.array(errors, pa.string())
    return pa.table(cols)


@pytest.fixture(scope="module")
def reference(world):
    tok = AutoTokenizer.from_pretrained(world.model_dir)
    model = AutoModelForCausalLM.from_pretrained(world.model_dir).eval()
    return tok, model


def direct(tok, model, sae, row, pooling, text_column):
    """The naive path, one row at a time: full forward with hidden states, full encode, slice, pool."""
    if text_column:
        ids = tok(row["text"]).input_ids
        pos = [len(ids) - 1] if pooling == "last" else list(range(1, len(ids)))
    else:
        p = tok(row["prompt"]).input_ids
        r = tok(row["response"], add_special_tokens=False).input_ids
        ids = p + r
        pos = [len(p) - 1] if pooling == "last" else list(range(len(p), len(ids)))
    with torch.no_grad():
        h = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[1][0]  # output of block 0
        a = sae.encode(h)[:, FEATS][pos]
    return {"last": a[-1], "max": a.max(0).values, "mean": a.mean(0)}[pooling].numpy()


@pytest.mark.parametrize("arch", ["standard", "jumprelu"])
@pytest.mark.parametrize("pooling", ["last", "max", "mean"])
@pytest.mark.parametrize("text_column", [None, "text"])
def test_parity_with_direct_computation(world, reference, arch, pooling, text_column):
    tok, model = reference
    sae = SAE.load_from_disk(world.saes[arch])
    cfg = make_cfg(world, arch, pooling, text_column, token_budget=256, max_tokens=128)
    scorer = FeatureScorer(cfg)
    pool = P.discover(cfg.pool.path, cfg.pool.text_columns, cfg.pool.id_column)
    table = P.read_chunk(P.filesystem(cfg.pool.path)[0], pool, pool.files[0], 0, [0]).slice(0, 40)
    out = scorer.score_table(table)
    assert out.num_rows == 40 and out.column(S.ERROR).null_count == 40
    got = np.array(out.column(S.ACTS).to_pylist(), dtype=np.float32)
    ref = np.stack([direct(tok, model, sae, r, pooling, text_column) for r in table.to_pylist()])
    # Stated tolerance: batched/padded float32 forward vs one row at a time.
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out.column(S.SCORE).to_numpy(), ref.astype(np.float64).sum(1), rtol=1e-4, atol=1e-6)
    assert (ref > 0).any(), "the chosen features should fire on some rows"
    n_tok = out.column(S.N_TOKENS).to_numpy()
    assert (n_tok > 0).all()


def test_bad_rows_keep_their_ids(world):
    scorer = FeatureScorer(make_cfg(world, pooling="mean"))
    rows = [
        {"prompt": "Tom has 3 apples.", "response": "3 + 1 = 4 #### 4"},
        {"prompt": None, "response": "x"},
        {"prompt": "", "response": "x"},
        {"prompt": "   \n", "response": "x"},
        {"prompt": "hi", "response": ""},
        {"prompt": "hi", "response": None},
    ]
    out = scorer.score_table(table_of(rows)).to_pylist()
    assert [r[S.ID] for r in out] == [f"r{i}" for i in range(6)]
    assert out[0][S.ERROR] is None and out[0][S.SCORE] is not None
    errs = [r[S.ERROR] for r in out[1:]]
    assert errs == ["prompt is null", "prompt is empty or whitespace only", "prompt is empty or whitespace only",
                    "response is empty or whitespace only", "response is null"]
    assert all(r[S.SCORE] is None and r[S.ACTS] is None for r in out[1:])
    # Non-string and invalid UTF-8 values.
    t = table_of([{"prompt": 5, "response": "x"}])
    assert scorer.score_table(t).column(S.ERROR)[0].as_py() == "prompt has type int64, not a string"
    vals, errs = P._as_text(pa.chunked_array([pa.array([b"ok", b"\xff\xfe"], pa.binary())]), "text")
    assert vals[0] == "ok" and errs[1].startswith("text is not valid UTF-8")


def test_last_pooling_reads_only_the_prompt(world):
    """`last` runs only the prompt: the response cannot change the score, and costs no tokens."""
    scorer = FeatureScorer(make_cfg(world, pooling="last"))
    a = scorer.score_table(table_of([{"prompt": "Tom has 3 apples.", "response": "short"}])).to_pylist()[0]
    b = scorer.score_table(table_of([{"prompt": "Tom has 3 apples.", "response": "much longer " * 20}])).to_pylist()[0]
    assert a[S.ACTS] == b[S.ACTS] and a[S.N_TOKENS] == b[S.N_TOKENS]


def test_truncation_is_recorded(world):
    scorer = FeatureScorer(make_cfg(world, pooling="max", max_tokens=16, token_budget=64))
    long = {"prompt": "Tom has 3 apples.", "response": "and then " * 40}
    out = scorer.score_table(table_of([long, {"prompt": "x " * 30, "response": "y"}])).to_pylist()
    assert out[0][S.TRUNCATED] is True and out[0][S.N_TOKENS] == 16 and out[0][S.ERROR] is None
    assert out[1][S.ERROR].startswith("response truncated away")
    huge = {"prompt": "Tom has", "response": "7" * 5_000_000}  # capped before tokenizing
    assert scorer.score_table(table_of([huge])).to_pylist()[0][S.TRUNCATED] is True
    last = FeatureScorer(make_cfg(world, pooling="last", max_tokens=8, token_budget=64))
    r = last.score_table(table_of([{"prompt": "one two three four five six seven eight nine ten", "response": "x"}]))
    assert r.column(S.TRUNCATED)[0].as_py() is True and r.column(S.N_TOKENS)[0].as_py() == 8


def test_chat_template_and_special_tokens_never_pooled(world):
    tok = AutoTokenizer.from_pretrained(world.model_dir)
    from igds_ray.tokenize import ExampleBuilder

    b = ExampleBuilder(tok, "last", 64, chat_template=True)
    (ex,) = b.build_pairs(["Tom has 3 apples."], ["4"])
    assert tok.convert_ids_to_tokens(ex.input_ids[:2]) == ["<s>", "<|user|>"]
    assert ex.input_ids[ex.positions[0]] not in tok.all_special_ids
    for pooling in ("max", "mean"):
        (ex,) = ExampleBuilder(tok, pooling, 64).build_text(["the cat"])
        assert 0 not in ex.positions and all(ex.input_ids[p] not in tok.all_special_ids for p in ex.positions)


def test_micro_batches_respect_budget():
    lengths = [5, 50, 7, 20, 20, 3, 64]
    batches = micro_batches(lengths, 64)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len(b) * max(lengths[i] for i in b) <= 64 for b in batches)


# --------------------------------------------------------------------------------------------
# The Ray job


@pytest.fixture(scope="module")
def scored(world, ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "scores"
    cfg = make_cfg(world, pooling="max", out=out, batch_size=16, max_actors=2, pool={"rows_per_read_task": 25},
                   tokenize_in="stage")
    return cfg, score.run(cfg, hooks={"forward_log": str(out.parent / "forward")})


def test_tokenisation_runs_in_the_cpu_stage_before_the_actors(scored):
    """With `tokenize_in: stage` (auto's choice for GPU actors) every batch reached a scorer actor already
    tokenised (issue 12, part 6); each row once. The CPU-actor default tokenises in the actor."""
    from igds_ray.stages.scorer import forward_log_prepared

    cfg, _ = scored
    log_dir = str(Path(cfg.out).parent / "forward")
    assert score.read_forward_log(log_dir) == (200, 200)
    assert forward_log_prepared(log_dir) == {True}


def test_ray_job_scores_every_row_once(world, scored):
    cfg, manifest = scored
    df = pd.read_parquet(cfg.out)
    pool = pd.concat([pd.read_parquet(p) for p in sorted(world.pool_dir.glob("*.parquet"))], ignore_index=True)
    assert len(df) == len(pool) == manifest["rows"] == 200
    assert df[S.ID].is_unique
    # Generated ids are `<file>:<row>`, stable across runs.
    assert set(df[S.ID]) == {f"part-{f:03d}.parquet:{r}" for f in range(2) for r in range(100)}
    assert (df[S.ID] == df[S.SRC_FILE] + ":" + df[S.SRC_ROW].astype(str)).all()
    assert df[S.ERROR].isna().all() and manifest["errors"] == 0
    assert all(len(a) == 3 for a in df[S.ACTS])
    np.testing.assert_allclose(df[S.SCORE], [float(np.sum(a, dtype=np.float64)) for a in df[S.ACTS]], rtol=1e-6)
    assert manifest["tokens"] == int(df[S.N_TOKENS].sum())
    assert manifest["config"]["features"] == ["l0_p3", "l0_p17", "l0_p40"]
    # No task given: `auto` scores prompts as stored, and the manifest says so.
    p = manifest["prompts"]
    assert (p["prompt_template"], p["applied"], p["task"], p["rendered_rows"]) == ("auto", "none", None, 0)
    assert p["note"].startswith("no task given") and not df[S.RENDERED].any()
    names = os.listdir(cfg.out)
    assert "_SUCCESS" in names and not any(n.startswith("_attempt") for n in names)
    committed = json.loads((Path(cfg.out) / "_SUCCESS").read_text())["files"]
    assert set(committed) == {n for n in names if n.endswith(".parquet")}


def test_ray_job_matches_in_process_scores(world, scored):
    cfg, _ = scored
    df = pd.read_parquet(cfg.out).set_index(S.ID)
    pool = P.discover(cfg.pool.path, cfg.pool.text_columns, None)
    t = P.read_chunk(P.filesystem(cfg.pool.path)[0], pool, pool.files[1], 0, [0])
    local = FeatureScorer(cfg).score_table(t).to_pandas().set_index(S.ID)
    np.testing.assert_allclose(df.loc[local.index, S.SCORE], local[S.SCORE], rtol=1e-5)


def test_rerun_skips_finished_and_overwrite_does_not_duplicate(world, scored):
    cfg, manifest = scored
    again = score.run(cfg)
    assert again["committed_at"] == manifest["committed_at"]  # skipped
    redo = score.run(from_dict(ScoreConfig, {**to_dict(cfg), "overwrite": True}))
    assert redo["rows"] == 200 and len(pd.read_parquet(cfg.out)) == 200


def test_unfinished_output_is_cleared_not_counted(world, ray_local, tmp_path):
    out = tmp_path / "scores"
    d = StageDir(str(out))
    staging = d.begin()
    # A crashed attempt: a stray part in staging and one already moved, but no _SUCCESS.
    pq.write_table(pa.table({"id": ["ghost"]}), os.path.join(staging, "stray.parquet"))
    pq.write_table(pa.table({"id": ["ghost"]}), out / "moved.parquet")
    with pytest.raises(StageOutputError, match="not a finished stage"):
        d.manifest()
    score.run(make_cfg(world, out=out, batch_size=64))
    df = pd.read_parquet(out)
    assert len(df) == 200 and "ghost" not in set(df[S.ID])


def test_refuses_to_clear_a_foreign_directory(world, tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(StageOutputError, match="not written by igds"):
        score.run(make_cfg(world, out=tmp_path))
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_pool_with_ids_and_bad_rows(world, ray_local, tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    pq.write_table(pa.table({"id": [10, 11, 12], "prompt": ["Tom has 3 apples.", None, ""], "response": ["4", "x", "y"]}),
                   pool / "a.parquet")
    pq.write_table(pa.table({"id": pa.array([], pa.int64()), "prompt": pa.array([], pa.string()),
                             "response": pa.array([], pa.string())}), pool / "empty.parquet")
    out = tmp_path / "scores"
    m = score.run(make_cfg(world, out=out, pool={"path": str(pool)}))
    df = pd.read_parquet(out).sort_values(S.ID)
    assert list(df[S.ID]) == [10, 11, 12] and m["rows"] == 3 and m["errors"] == 2
    assert df[S.ERROR].tolist()[1:] == ["prompt is null", "prompt is empty or whitespace only"]


def test_errors_before_compute(world, tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    pq.write_table(pa.table({"prompt": ["a"], "response": ["b"]}), pool / "good.parquet")
    (pool / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(PoolError, match="bad.parquet: not a readable Parquet file"):
        score.run(make_cfg(world, out=tmp_path / "o1", pool={"path": str(pool)}))
    with pytest.raises(PoolError, match="missing column 'body'"):
        score.run(make_cfg(world, out=tmp_path / "o2", text_column="body"))
    with pytest.raises(PoolError, match="no such file"):
        score.run(make_cfg(world, out=tmp_path / "o3", pool={"path": str(tmp_path / "nowhere")}))
    with pytest.raises(ModelSAEMismatch, match="out of range"):
        cfg = make_cfg(world, out=tmp_path / "o4")
        score.run(from_dict(ScoreConfig, {**to_dict(cfg),
                                          "features": ["l0_p64"]}))
    with pytest.raises(ModelSAEMismatch, match="on layer 1"):
        score.run(from_dict(ScoreConfig, {**to_dict(cfg),
                                          "features": ["l1_p3"]}))
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o4").exists()
