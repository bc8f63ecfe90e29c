"""The CLI contract (`igds score`, `igds select`, `igds demo`) and the `ray job submit` entrypoints' parsing."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from igds_ray import cli
from igds_ray import schema as S


def test_score_and_select_through_the_cli(world, ray_local, tmp_path, capsys):
    out = tmp_path / "scores"
    rc = cli.main(["score", "--model", str(world.model_dir), "--sae", str(world.saes["standard"]),
                   "--features", "l0_p3,l0_p17", "--pool", str(world.pool_dir), "--out", str(out),
                   "--pooling", "mean", "--text-column", "text", "--max-tokens", "64"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["rows"] == 200 and summary["errors"] == 0
    cfg = json.loads((out / "_SUCCESS").read_text())["config"]
    assert (cfg["pooling"], cfg["pool"]["text_column"], cfg["max_tokens"]) == ("mean", "text", 64)

    y = tmp_path / "select.yaml"
    y.write_text(f"scores: {out}\nout: {tmp_path / 'sel'}\nfraction: 0.25\narm: igds\n")
    assert cli.main(["select", "--config", str(y), "--fraction", "0.5"]) == 0
    chosen = pd.read_parquet(tmp_path / "sel" / "igds.parquet")
    assert len(chosen) == 100 and {"text", S.RANK, S.SCORE}.issubset(chosen.columns)


def test_cli_errors_are_one_line_and_exit_2(world, tmp_path, capsys):
    rc = cli.main(["score", "--model", str(world.model_dir), "--sae", str(world.saes["standard"]),
                   "--features", "l0_p99", "--pool", str(world.pool_dir), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "index 99 is out of range for an SAE of d_sae=64" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["score", "--text-column", "a", "--prompt-column", "b"])


def test_job_entrypoints_parse_like_the_cli():
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for name, sub in (("score_pool", "score"), ("select_top", "select"), ("identify_features", "identify"), ("run_pipeline", "run"), ("finetune", "finetune"), ("demo", "demo")):
        spec = importlib.util.spec_from_file_location(name, root / "jobs" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        assert mod.parse_args(["--out", "x"]) == [sub, "--out", "x"]
        assert mod.__doc__.startswith("ray job submit --working-dir . --runtime-env runtime_env.yaml -- python jobs/")
