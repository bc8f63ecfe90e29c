"""`igds plan` and the memory plan: shipped configs against every known GPU type, the refusal, the calibration."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from igds_ray import cli, plan
from igds_ray.config import from_dict, load_yaml
from igds_ray.errors import ConfigError
from igds_ray.hardware import GIB, GPU_TYPES, KNOWN_SHAPES, model_shape, sae_shape, shape_from_config
from igds_ray.pipeline import RunConfig
from igds_ray.stages.finetune import DEFAULT_TARGETS

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(glob.glob(str(ROOT / "configs" / "*.yaml")))
# The Qwen3 config's SAE is the user's own (no cfg.json here): planned as a 16x SAE, 65,536 latents.
WIDTH = {"qwen3_8b_math.yaml": 65536}


def _cfg(path: str, **over) -> RunConfig:
    data = load_yaml(path)
    for key, val in over.items():
        data[key] = {**data.get(key, {}), **val} if isinstance(val, dict) else val
    return from_dict(RunConfig, data)


@pytest.mark.parametrize("gpu", list(GPU_TYPES))
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: Path(p).stem)
def test_every_shipped_config_fits_every_known_gpu_type(config: str, gpu: str) -> None:
    p = plan.plan(_cfg(config), gpu, pool_rows=100_000, tokens_per_row=300, sae_width=WIDTH.get(Path(config).name))
    assert p.fits, plan.render(p)
    g = GPU_TYPES[gpu]
    for s in p.stages:
        assert s.have_bytes == pytest.approx(g.mem_gib * GIB * min(1.0, s.gpus_per_actor) - plan.CONTEXT_BYTES)
        assert 0 < s.need_bytes <= s.have_bytes
        assert s.gpu_seconds > 0 and s.cost == pytest.approx(s.gpu_seconds / 3600 * 2.5)
    # the fine-tuning memory, written out: bf16 weights + LoRA (fp32 weight, grad, two Adam moments) + checkpointed
    # activations + float32 logits (4 copies, 5 with Gemma's soft-capping)
    m = model_shape(_cfg(config).model.name_or_path)
    ft = _cfg(config).finetune
    tokens = ft["batch_size"] * ft.get("max_tokens", 1024)
    lora = m.lora_params(ft.get("lora_r", 16), DEFAULT_TARGETS)
    need = (m.params() * 2 + lora * 16 + tokens * 2 * m.hidden * m.layers + tokens * 2 * (14 * m.hidden + 4 * m.intermediate)
            + tokens * m.vocab * 4 * (5 if m.softcap else 4))
    assert next(s for s in p.stages if s.stage == "finetune").need_bytes == need


def test_a_config_that_cannot_fit_is_refused_naming_the_stage_and_key(tmp_path: Path, capsys) -> None:
    # Gemma-2-2B's old fine-tuning micro-batch: 8 x 1024 tokens of float32 logits over 256k tokens, 5 copies,
    # is 42 GB by itself, more than a 24 GB card.
    assert 8 * 1024 * 256000 * 4 * 5 > GPU_TYPES["A10G-24GB"].mem_gib * GIB
    data = load_yaml(ROOT / "configs" / "gemma2_2b_math.yaml")
    data["finetune"] = {**data["finetune"], "batch_size": 8, "grad_accum": 4, "gradient_checkpointing": False}
    cfg_path = tmp_path / "big.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    rc = cli.main(["plan", "--config", str(cfg_path), "--gpu-type", "A10G-24GB", "--pool-rows", "1000",
                   "--tokens-per-row", "200"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 1
    assert "| finetune | 1 | 4 | 71.7 | 21.5 | NO |" in "\n".join(out)
    assert any(line.startswith("DOES NOT FIT: stage finetune does not fit on A10G-24GB") and "change finetune.batch_size"
               in line for line in out)
    last = json.loads(out[-1])
    assert last["fits"] is False and [s["stage"] for s in last["stages"] if not s["fits"]] == ["finetune"]
    # the same config fits an 80 GB card: exit 0
    assert cli.main(["plan", "--config", str(cfg_path), "--gpu-type", "H100-80GB", "--pool-rows", "1000",
                     "--tokens-per-row", "200"]) == 0


def test_the_plan_reproduces_the_h200_measurements() -> None:
    """BENCHMARKS.md, "GPU: one NVIDIA H200": LoRA step 16 x 512 peaked at 76.9 GB; the scorer at 128 x 256
    tokens at 7.43 GB and 174k tokens/s; the rates are calibrated there, the memory terms checked here."""
    g = shape_from_config(KNOWN_SHAPES["google/gemma-2-2b"], "test")
    tokens = 16 * 512
    lora = g.lora_params(16, DEFAULT_TARGETS)
    assert lora == pytest.approx(20.8e6, rel=0.01)  # the measured run's trainable parameters
    ft = g.params() * 2 + lora * 16 + tokens * g.layers * 2 * (14 * g.hidden + 4 * g.intermediate) \
        + tokens * g.vocab * 4 * 5
    assert ft == pytest.approx(76.9e9, rel=0.03)
    scorer = g.params(13, head=False) * 2 + plan._forward_bytes(g, 128 * 256)
    assert scorer == pytest.approx(7.43e9, rel=0.03)
    # on the H200 itself the forward rate is the measured one: 174,021 tokens/s
    assert plan._rate(GPU_TYPES["H200-141GB"], "forward") / (2 * g.matmul_params(13, head=False)) \
        == pytest.approx(174021, rel=1e-9)


def test_vllm_options_come_from_the_plan() -> None:
    assert plan.vllm_memory_options(1.0, 300, 256) == {"max_model_len": 564, "gpu_memory_utilization": 0.9}
    assert plan.vllm_memory_options(0.5, 300, 256)["gpu_memory_utilization"] == 0.45
    assert plan.vllm_memory_options(0.25, 300, 256)["gpu_memory_utilization"] == 0.225
    assert plan.vllm_memory_options(0.0, 300, 256, max_positions=512)["max_model_len"] == 512


def test_shapes_and_sae_widths_without_weights(tmp_path: Path) -> None:
    s = sae_shape(None, "gemma-scope-2b-pt-res-canonical", "layer_12/width_16k/canonical", 2304)
    assert (s.d_sae, s.layer) == (16384, 12)
    s = sae_shape(None, "llama_scope_lxr_8x", "l15r_8x", 4096)
    assert (s.d_sae, s.layer) == (32768, 15)
    with pytest.raises(ConfigError, match="sae.path '/mnt/x/qwen3-8b-layer18'.*width"):
        sae_shape("/mnt/x/qwen3-8b-layer18", None, None, 4096)
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2,
                                                      "intermediate_size": 128, "vocab_size": 300}))
    m = model_shape(str(tmp_path))
    assert (m.layers, m.kv_heads, m.head_dim, m.tied) == (2, 2, 32, False)
    assert m.params() == 2 * (64 * 64 * 4 + 3 * 64 * 128) + 2 * 300 * 64
    with pytest.raises(ConfigError, match="model.name_or_path 'nobody/unknown-model'"):
        model_shape("nobody/unknown-model")


def test_cluster_yamls_give_the_gpu_type() -> None:
    n, kind = plan.cluster_gpus(str(ROOT / "cluster" / "aws.yaml"))
    assert kind == "A10G-24GB" and n >= 1
    assert plan.cluster_gpus(str(ROOT / "cluster" / "gcp.yaml"))[1] == "L4-24GB"


def test_pool_rows_and_tokens_come_from_the_parquet_footers(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    pool.mkdir()
    for i in range(2):
        pq.write_table(pa.table({"id": [f"{i}-{j}" for j in range(30)], "prompt": ["x" * 40] * 30,
                                 "response": ["y" * 40] * 30}), pool / f"part-{i}.parquet")
    cfg = _cfg(CONFIGS[0], pool={"path": str(pool), "prompt_column": "prompt", "response_column": "response"})
    assert plan.pool_stats(cfg.pool, None, None) == (60, 20.0)


def test_igds_run_checks_storage_and_fit_before_any_compute(tmp_path: Path, capsys) -> None:
    # the shipped config as a new user runs it: its placeholder bucket fails in one line naming the key
    rc = cli.main(["run", "--config", str(ROOT / "configs" / "gemma2_2b_math.yaml")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("igds run: error: run_dir 's3://YOUR-BUCKET/runs/gemma2-2b-math' cannot be reached")
    # a local run that cannot fit its GPU type is refused before the run directory is touched
    pool = tmp_path / "pool.parquet"
    pq.write_table(pa.table({"id": ["a"], "query": ["q"], "response": ["r"]}), pool)
    run_dir = tmp_path / "run"
    model_dir = tmp_path / "gemma-2-2b"  # the model's config alone: the plan needs no weights
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "gemma2", **KNOWN_SHAPES["google/gemma-2-2b"]}))
    data = load_yaml(ROOT / "configs" / "gemma2_2b_math.yaml")
    data.update(run_dir=str(run_dir), gpu_type="L4-24GB", pool={**data["pool"], "path": str(pool)},
                model={**data["model"], "name_or_path": str(model_dir)},
                finetune={**data["finetune"], "batch_size": 8, "gradient_checkpointing": False})
    from igds_ray import pipeline

    with pytest.raises(ConfigError, match=r"stage finetune does not fit on L4-24GB.*change finetune.batch_size"):
        pipeline.run(from_dict(RunConfig, data))
    assert not run_dir.exists()
    with pytest.raises(ConfigError, match="unknown GPU type 'T4'"):
        from_dict(RunConfig, {**data, "gpu_type": "T4"})


def test_stage_commands_check_storage_and_models_first(world, tmp_path: Path, capsys, monkeypatch) -> None:
    """Issue 11, part 6: each stage command refuses, in one line naming the key, before any compute."""
    from igds_ray.preflight import model_reachable, reachable, sae_reachable

    rc = cli.main(["select", "--scores", "s3://YOUR-BUCKET/scores/igds", "--out", str(tmp_path / "sel")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(
        "igds select: error: scores 's3://YOUR-BUCKET/scores/igds' cannot be reached: ")
    assert not (tmp_path / "sel").exists()
    with pytest.raises(ConfigError, match=r"^out 'nosuch://x/y' cannot be reached: "):
        reachable("out", "nosuch://x/y")
    reachable("out", str(tmp_path / "not-yet"))  # an output that does not exist yet is fine
    with pytest.raises(ConfigError, match=r"model.name_or_path '\./missing/model': no such directory"):
        model_reachable("model.name_or_path", "./missing/model")
    with pytest.raises(ConfigError, match="no config.json in that directory"):
        model_reachable("model.name_or_path", str(tmp_path))
    model_reachable("model.name_or_path", str(world.model_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="'nobody/nothing-here': not in the local Hugging Face cache"):
        model_reachable("model.name_or_path", "nobody/nothing-here")
    with pytest.raises(ConfigError, match="sae.path .*: no sae_weights.safetensors there"):
        from igds_ray.config import SAEConfig

        sae_reachable(SAEConfig(path=str(tmp_path)))
