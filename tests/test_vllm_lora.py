"""vLLM serving a fine-tuned arm (a PEFT LoRA adapter dir) as a vLLM LoRA, against the HF backend that
merges the same adapter: same greedy texts, log-likelihoods and SAE interventions, and different from the
base model (so the checks can fail).

Needs vLLM (the CPU build in .venv-vllm: `bash scripts/make_vllm_venv.sh`); skipped elsewhere.
Run: HF_HUB_OFFLINE=1 .venv-vllm/bin/python -m pytest -q tests/test_vllm_lora.py
"""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("vllm")
pytest.importorskip("peft")

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import torch  # noqa: E402

from igds_ray.config import ModelConfig, SAEConfig  # noqa: E402
from igds_ray.demo.tiny import make_rows  # noqa: E402
from igds_ray.errors import ConfigError  # noqa: E402
from igds_ray.generation.base import FeatureSteer, Intervention, SamplingConfig  # noqa: E402

GREEDY = SamplingConfig(max_new_tokens=24)
N_PROMPTS = 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    return [r["prompt"] for r in make_rows(N_PROMPTS, seed=1)]


@pytest.fixture(scope="module")
def adapter_dir(world, tmp_path_factory):
    """A rank-8 LoRA on every linear layer of the tiny model, with seeded non-zero B (PEFT inits B to 0)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(world.model_dir), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    g = torch.Generator().manual_seed(0)
    n = 0
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
                n += 1
    assert n == 2 * len(TARGETS)  # 2 layers
    out = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(out)
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    return out


@pytest.fixture(scope="module")
def backends(world, adapter_dir):
    """(HF base, HF with the adapter merged, vLLM serving the adapter as a LoRA), all with the JumpReLU SAE."""
    from igds_ray.generation.hf import HFBackend
    from igds_ray.generation.vllm import VLLMBackend

    sae_cfg = SAEConfig(path=str(world.saes["jumprelu"]))
    base_cfg = ModelConfig(name_or_path=str(world.model_dir), dtype="float32", device="cpu")
    arm_cfg = ModelConfig(name_or_path=str(world.model_dir), dtype="float32", device="cpu", adapter=str(adapter_dir))
    hf_base = HFBackend(base_cfg, sae_cfg, device="cpu")
    hf_arm = HFBackend(arm_cfg, sae_cfg, device="cpu")
    vl = VLLMBackend(arm_cfg, sae_cfg, dtype="float32", block_size=32, kv_cache_memory_bytes=64 << 20)
    yield hf_base, hf_arm, vl
    vl.close()
    hf_arm.close()
    hf_base.close()


def firing_feature(hf, prompts: list[str]) -> int:
    """The feature active at the most prompt positions (layer-L output of this HF model)."""
    enc = hf.tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        hs = hf.model(**enc, output_hidden_states=True).hidden_states[hf.sae_layer + 1]
    steer = FeatureSteer.from_sae(hf.sae, hf.sae_layer, range(int(hf.sae.cfg.d_sae)), torch.device("cpu"),
                                  torch.float32)
    fires = (steer.acts(hs)[enc["attention_mask"].bool()] > 0).sum(0)
    return int(fires.argmax())


def test_engine_serves_the_adapter_as_lora(backends) -> None:
    _, _, vl = backends
    cfg = vl.llm.llm_engine.vllm_config
    assert cfg.lora_config is not None and cfg.lora_config.max_lora_rank == 8
    assert vl.lora is not None and vl.lora.lora_int_id in vl.llm.llm_engine.list_loras()
    # Only the adapter's modules are wrapped (not the logits processor: see test_lm_head_lora_wrapper_...).
    assert sorted(cfg.lora_config.target_modules) == sorted(TARGETS)
    assert vl._lora_logits is False  # noqa: SLF001


def test_greedy_matches_merged_hf_and_differs_from_base(backends, prompts) -> None:
    hf_base, hf_arm, vl = backends
    base, arm = hf_base.generate(prompts, GREEDY), hf_arm.generate(prompts, GREEDY)
    assert sum(a != b for a, b in zip(arm, base)) >= N_PROMPTS // 2, "the adapter changes almost nothing"
    assert vl.generate(prompts, GREEDY) == arm


def test_interventions_with_adapter_match_hf(backends, prompts) -> None:
    _, hf_arm, vl = backends
    f = firing_feature(hf_arm, prompts)
    arm = hf_arm.generate(prompts, GREEDY)
    for iv in (Intervention(0, (f,), 0.0), Intervention(0, (f,), 8.0)):
        ref = hf_arm.generate(prompts, GREEDY, iv)
        assert sum(a != b for a, b in zip(ref, arm)) >= 2, f"{iv} changes almost nothing: a vacuous check"
        before = vl.hook_calls
        assert vl.generate(prompts, GREEDY, iv) == ref, iv
        assert vl.hook_calls - before >= GREEDY.max_new_tokens
    # LoRA wrapped the linear submodules, not the decoder layers: layer 0 is still the patched one.
    from igds_ray.models.loading import decoder_layers

    (names,) = vl.llm.apply_model(lambda model: [type(m).__name__ for m in decoder_layers(model)])
    assert names == ["IgdsSteeredLlamaDecoderLayer", "LlamaDecoderLayer"], names
    (qkv,) = vl.llm.apply_model(lambda model: type(decoder_layers(model)[0].self_attn.qkv_proj).__name__)
    assert "LoRA" in qkv, qkv


def test_loglik_matches_merged_hf(backends, prompts) -> None:
    hf_base, hf_arm, vl = backends
    refs = [r["response"] for r in make_rows(N_PROMPTS, seed=1)]
    want = torch.tensor(hf_arm.loglik(prompts, refs), dtype=torch.float64)
    got = torch.tensor(vl.loglik(prompts, refs), dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert not torch.allclose(got, torch.tensor(hf_base.loglik(prompts, refs), dtype=torch.float64), atol=1e-3)


def test_lora_rank_rounding(tmp_path) -> None:
    from igds_ray.generation.vllm import adapter_max_rank, vllm_lora_rank

    assert [vllm_lora_rank(r) for r in (1, 2, 8, 9, 64, 300, 512)] == [1, 8, 8, 16, 64, 320, 512]
    with pytest.raises(ConfigError, match="rank"):
        vllm_lora_rank(513)
    cfg = {"peft_type": "LORA", "r": 4, "rank_pattern": {"q_proj": 24}}
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    assert adapter_max_rank(tmp_path) == 24
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(ConfigError, match="LoRA"):
        adapter_max_rank(tmp_path)


def test_adapter_modules_from_weights(adapter_dir) -> None:
    from igds_ray.generation.vllm import adapter_modules

    assert adapter_modules(adapter_dir) == sorted(TARGETS)


def test_lm_head_lora_wrapper_refuses_loglik(backends, world, adapter_dir, prompts) -> None:
    """Negative control for the target-module restriction: unrestricted, vLLM 0.32 also wraps the logits
    processor, whose LoRA is applied per request, not per prompt position; generation is still right
    (zero LM-head LoRA), but prompt logprobs break, so loglik refuses instead."""
    from igds_ray.generation.vllm import VLLMBackend

    _, hf_arm, _ = backends
    cfg = ModelConfig(name_or_path=str(world.model_dir), dtype="float32", device="cpu", adapter=str(adapter_dir))
    vl = VLLMBackend(cfg, dtype="float32", block_size=32, kv_cache_memory_bytes=64 << 20, lora_target_modules=None)
    try:
        assert vl._lora_logits is True  # noqa: SLF001
        assert vl.generate(prompts, GREEDY) == hf_arm.generate(prompts, GREEDY)
        with pytest.raises(NotImplementedError, match="loglik"):
            vl.loglik(prompts[:2], ["a", "b"])
    finally:
        vl.close()


def test_refuses_a_missing_adapter_before_building(world, tmp_path) -> None:
    from igds_ray.generation.vllm import VLLMBackend

    with pytest.raises(ConfigError, match="adapter_config.json"):
        VLLMBackend(ModelConfig(name_or_path=str(world.model_dir), adapter=str(tmp_path)))
