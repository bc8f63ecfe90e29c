"""Evaluation of arms (base, a LoRA adapter, a broken adapter), the mechanism summary and the report."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from igds_ray.config import ModelConfig, SAEConfig, TaskConfig
from igds_ray.demo.tiny import make_rows
from igds_ray.ledger import Record, record
from igds_ray.stages import evaluate
from igds_ray.stages.evaluate import EvalConfig


@pytest.fixture(scope="module")
def adapter(world, tmp_path_factory):
    """A LoRA adapter with non-zero weights, saved by peft."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(world.model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    d = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def evaluated(world, adapter, ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrun")
    rows = [{"question": r["prompt"], "answer": r["response"]} for r in make_rows(300, seed=9) if "How many" in r["prompt"]]
    pd.DataFrame(rows).to_parquet(root / "task.parquet")
    arms = {
        "base": ModelConfig(str(world.model_dir)),
        "lora": ModelConfig(str(world.model_dir), adapter=str(adapter)),
        "broken": ModelConfig(str(world.model_dir), adapter=str(root / "missing")),
    }
    out = evaluate.run(str(root / "run"), arms, SAEConfig(path=str(world.saes["jumprelu"])), ["l0_p3", "l0_p17"],
                       TaskConfig(source=str(root / "task.parquet"), split=None),
                       EvalConfig(split=None, limit=24, max_new_tokens=8))
    return root / "run", out, arms


def test_arms_evaluated_and_broken_arm_reported(evaluated):
    run, out, _ = evaluated
    arms = out["arms"]
    assert arms["base"]["status"] == arms["lora"]["status"] == "ok"
    assert arms["broken"]["status"] == "failed" and "adapter_config.json" in arms["broken"]["error"]
    base = pd.read_parquet(run / "eval" / "base.parquet")
    lora = pd.read_parquet(run / "eval" / "lora.parquet")
    assert len(base) == len(lora) == 24 and list(base["id"]) == list(lora["id"])
    assert (base["prediction"] != lora["prediction"]).any()  # the adapter changes the model
    assert arms["base"]["metrics"]["n"] == 24 and "n_unparseable" in arms["base"]["metrics"]
    assert not (run / "eval" / "broken.parquet").exists()
    on_disk = json.loads((run / "eval" / "metrics.json").read_text())
    assert on_disk["arms"]["lora"]["feature_median"].keys() == {"l0_p3", "l0_p17"}


def test_feature_activations_match_the_scorer(world, adapter, evaluated):
    """eval's per-prompt activations equal the scorer's on the same prompts under the merged adapter."""
    from igds_ray.config import ScoreConfig, from_dict
    from igds_ray.stages.score import FeatureScorer
    from tests.test_score import table_of

    run, _, arms = evaluated
    lora = pd.read_parquet(run / "eval" / "lora.parquet")
    cfg = from_dict(ScoreConfig, dict(model={"name_or_path": str(world.model_dir), "adapter": str(adapter)},
                                      sae=str(world.saes["jumprelu"]), features=["l0_p3", "l0_p17"],
                                      pool=str(world.pool_dir), out="unused", max_tokens=4096))
    scored = FeatureScorer(cfg).score_table(table_of([{"prompt": p, "response": "x"} for p in lora["prompt"]]))
    np.testing.assert_allclose(np.stack(lora["acts"]), np.stack(scored.column("acts").to_pylist()), rtol=1e-5,
                               atol=1e-7)


def test_rerun_skips_finished_arms(world, evaluated):
    run, out, arms = evaluated
    before = (run / "eval" / "base.parquet").stat().st_mtime_ns
    again = evaluate.run(str(run), {"base": arms["base"]}, SAEConfig(path=str(world.saes["jumprelu"])),
                         ["l0_p3", "l0_p17"], TaskConfig(source=str(run.parent / "task.parquet"), split=None),
                         EvalConfig(split=None, limit=24, max_new_tokens=8))
    assert (run / "eval" / "base.parquet").stat().st_mtime_ns == before
    assert again["arms"]["lora"]["status"] == "ok"  # earlier arms are kept


def test_report_from_run_files(evaluated):
    from igds_ray import report

    run, out, _ = evaluated
    record(str(run), Record(stage="finetune", arm="lora", wall_s=36.0, cpus=2.0, tokens=1234))
    record(str(run), Record(stage="score", wall_s=18.0, gpus=1.0, extra={"used_by": ["lora"]}))
    path = report.build(str(run), price_per_gpu_hour=3.0, price_per_cpu_hour=0.1)
    text = open(path).read()
    lora_line = next(line for line in text.splitlines() if line.startswith("| lora"))
    assert "finetune 36.0" in lora_line and "score 18.0" in lora_line and "1234" in lora_line
    # 18 s x 1 GPU at $3/h + 36 s x 2 CPUs at $0.1/h
    assert f"{18 / 3600 * 3 + 72 / 3600 * 0.1:.4f}" in lora_line
    assert "broken (failed)" in text and "## Verdict" in text and "## Mechanism" in text
    for png in ("metric_by_arm.png", "activation_by_arm.png", "cost_vs_metric.png"):
        assert (run / "report" / png).stat().st_size > 1000


def test_feature_activation_is_read_where_scoring_read(world):
    """`prompt_max` reads every prompt token: never below the last token's value, above it somewhere
    (the pipeline passes score.pooling to evaluation when scoring read the prompt)."""
    from dataclasses import replace

    from igds_ray.config import to_dict
    from igds_ray.tasks import TaskExample, get_task

    task = get_task("math")
    exs = [TaskExample(id=f"q{i}", source=r["prompt"], reference=r["response"]).to_dict()
           for i, r in enumerate(r for r in make_rows(60, seed=4) if "How many" in r["prompt"])][:8]
    feats = [f"l0_p{i}" for i in range(16)]
    ecfg = EvalConfig(split=None, max_new_tokens=2)
    out = {}
    for pooling in ("last", "prompt_max"):
        table, info = evaluate._evaluate_arm("base", to_dict(ModelConfig(str(world.model_dir))),
                                             to_dict(SAEConfig(path=str(world.saes["jumprelu"]))), feats, task, exs,
                                             to_dict(replace(ecfg, pooling=pooling)))
        out[pooling] = np.stack(table.column("acts").to_pylist())
    assert out["last"].shape == out["prompt_max"].shape == (len(exs), 16)
    assert (out["prompt_max"] >= out["last"] - 1e-6).all() and (out["prompt_max"] > out["last"] + 1e-6).any()
