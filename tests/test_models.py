"""Loaders, hook-name parsing, compatibility checks, the truncated forward pass and the k-feature encoder."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from sae_lens import SAE
from transformers import AutoModelForCausalLM, AutoTokenizer

from igds_ray.config import ModelConfig, SAEConfig
from igds_ray.errors import ConfigError, ModelSAEMismatch
from igds_ray.models.loading import (
    ModelInfo,
    SAEInfo,
    check_compatible,
    decoder_layers,
    layer_from_hook_name,
    load_model,
    load_sae,
    load_tokenizer,
    model_info,
    sae_info,
)
from igds_ray.models.runner import FeatureEncoder, LayerRunner
from igds_ray.schema import FeatureId


@pytest.mark.parametrize(
    "name, layer",
    [("blocks.12.hook_resid_post", 12), ("model.layers.3", 3), ("layers.0", 0), ("blocks.5.hook_resid_pre", 4)],
)
def test_hook_names(name, layer):
    assert layer_from_hook_name(name) == layer


@pytest.mark.parametrize("name", ["blocks.3.hook_mlp_out", "blocks.0.hook_resid_pre", "blocks.2.attn.hook_z", ""])
def test_unsupported_hook_names(name):
    with pytest.raises(ModelSAEMismatch):
        layer_from_hook_name(name)


def test_compatibility_checks():
    m = ModelInfo(hidden_size=128, num_layers=2, model_type="llama")
    ok = SAEInfo(128, 64, "blocks.1.hook_resid_post", "jumprelu", 1)
    check_compatible(m, ok, (FeatureId(1, 63),))
    with pytest.raises(ModelSAEMismatch, match="d_in=64 differs from the model's hidden size 128"):
        check_compatible(m, SAEInfo(64, 64, "blocks.1.hook_resid_post", "standard", 1))
    with pytest.raises(ModelSAEMismatch, match="reads layer 2, but the model has 2 layers"):
        check_compatible(m, SAEInfo(128, 64, "blocks.2.hook_resid_post", "standard", 2))
    with pytest.raises(ModelSAEMismatch, match="index 64 is out of range"):
        check_compatible(m, ok, (FeatureId(1, 64),))
    with pytest.raises(ModelSAEMismatch, match="on layer 0, but the SAE reads layer 1"):
        check_compatible(m, ok, (FeatureId(0, 1),))


def test_infos_from_saved_dirs(world):
    mi = model_info(ModelConfig(str(world.model_dir)))
    si = sae_info(SAEConfig(path=str(world.saes["jumprelu"])))
    assert (mi.hidden_size, mi.num_layers) == (128, 2)
    assert (si.d_in, si.d_sae, si.layer, si.architecture) == (128, 64, 0, "jumprelu")
    with pytest.raises(ConfigError, match="no cfg.json"):
        sae_info(SAEConfig(path=str(world.root)))
    with pytest.raises(ConfigError, match="cannot read its config"):
        model_info(ModelConfig(str(world.root / "nope")))


def test_reload_is_identical(world):
    tok = load_tokenizer(ModelConfig(str(world.model_dir)))
    assert tok("12 apples").input_ids[0] == tok.bos_token_id
    m1 = load_model(ModelConfig(str(world.model_dir)), torch.device("cpu"))
    m2 = AutoModelForCausalLM.from_pretrained(world.model_dir)
    for (n1, p1), (_, p2) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(p1, p2), n1
    s1 = load_sae(SAEConfig(path=str(world.saes["jumprelu"])), torch.device("cpu"))
    s2 = SAE.load_from_disk(world.saes["jumprelu"])
    assert torch.equal(s1.W_enc, s2.W_enc) and torch.equal(s1.threshold, s2.threshold)


def test_pickle_weights_refused_unless_allowed(world, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(world.model_dir)
    d = tmp_path / "pickled"
    d.mkdir()
    # A checkpoint with pickle-based weights only, as older hub repos ship them.
    model.config.save_pretrained(d)
    AutoTokenizer.from_pretrained(world.model_dir).save_pretrained(d)
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="allow_pickle"):
        load_model(ModelConfig(str(d)), torch.device("cpu"))
    assert load_model(ModelConfig(str(d), allow_pickle=True), torch.device("cpu")) is not None


def test_layer_runner_equals_hidden_states_and_stops_early(world):
    model = AutoModelForCausalLM.from_pretrained(world.model_dir).eval()
    tok = AutoTokenizer.from_pretrained(world.model_dir)
    enc = tok(["Tom has 3 apples and buys 4 more.", "the cat"], return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = model(**enc, output_hidden_states=True).hidden_states[1]
    calls = {"later": 0, "head": 0}
    decoder_layers(model)[1].register_forward_hook(lambda *a: calls.__setitem__("later", calls["later"] + 1))
    model.lm_head.register_forward_hook(lambda *a: calls.__setitem__("head", calls["head"] + 1))
    got = LayerRunner(model, 0, prune=False)(enc["input_ids"], enc["attention_mask"])
    mask = enc["attention_mask"].bool()
    torch.testing.assert_close(got[mask], ref[mask], rtol=0, atol=1e-6)
    assert calls == {"later": 0, "head": 0}
    LayerRunner(model, 0, prune=True)
    assert len(decoder_layers(model)) == 1  # later blocks freed


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk"])
def test_feature_encoder_equals_full_encode(world, arch):
    sae = SAE.load_from_disk(world.saes[arch])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 128, generator=g) * 0.2
    idx = [5, 0, 63, 17]
    enc = FeatureEncoder(sae, idx)
    assert enc.sliced == (arch != "topk")
    with torch.no_grad():
        full = sae.encode(x)[..., idx]
    got = enc(x)
    # Stated tolerance: slicing is exact in math; float32 kernels may differ by rounding only.
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-6)
    assert (full > 0).any(), "the fixture SAE should have active features"
    with pytest.raises(ValueError, match="out of range"):
        FeatureEncoder(sae, [64])


def test_a_truncated_load_builds_only_the_first_blocks_and_reads_the_same_stream(world):
    """Issue 11: the scorer loads blocks 0..L only (`load_model(layers=L+1)`), and its right-padded, mask-free
    forward gives every real position the full model's `hidden_states[L+1]`."""
    cfg = ModelConfig(name_or_path=str(world.model_dir), dtype="float32", device="cpu")
    full = load_model(cfg, torch.device("cpu"))
    short = load_model(cfg, torch.device("cpu"), layers=1)
    assert len(decoder_layers(full)) == 2 and len(decoder_layers(short)) == 1
    n_block = sum(p.numel() for p in decoder_layers(full)[1].parameters())
    assert sum(p.numel() for p in short.parameters()) == sum(p.numel() for p in full.parameters()) - n_block
    tok = load_tokenizer(cfg)
    enc = tok(["Tom has 3 apples and buys 4 more.", "the cat", "x"], return_tensors="pt", padding=True)
    assert tok.padding_side == "right"
    with torch.no_grad():
        ref = full(**enc, output_hidden_states=True).hidden_states[1]
    got = LayerRunner(short, 0)(enc["input_ids"], None)  # no padding mask: causal attention hides the padding
    mask = enc["attention_mask"].bool()
    assert (~mask).any(), "the batch should hold padding"
    torch.testing.assert_close(got[mask], ref[mask], rtol=0, atol=1e-6)
    # an adapter may adapt any block: then the whole model is loaded
    assert load_model(cfg, torch.device("cpu"), layers=5) is not None  # more layers than the model has: all


@pytest.mark.parametrize("arch", ["standard", "jumprelu"])
def test_a_compact_encoder_keeps_only_the_chosen_columns(world, arch):
    sae = SAE.load_from_disk(world.saes[arch])
    x = torch.randn(200, sae.cfg.d_in, generator=torch.Generator().manual_seed(1)) * 0.2
    idx = [5, 0, 63, 17]
    ref = FeatureEncoder(sae, idx)(x)
    small = SAE.load_from_disk(world.saes[arch])
    enc = FeatureEncoder(small, idx, compact=True)
    assert small.W_enc.numel() == 0 and small.W_dec.numel() == 0
    kept = sum(t.numel() for t in enc.state_dict().values())
    assert kept < sae.W_enc.numel() // 2  # 16 columns + the d_in/d_sae vectors, not the matrices
    torch.testing.assert_close(enc(x), ref, rtol=0, atol=0)


def test_soft_capped_attention_runs_eager_and_sdpa_is_refused(tmp_path):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=300, hidden_size=64, num_hidden_layers=3, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=32, intermediate_size=128, attn_logit_softcapping=50.0,
                       final_logit_softcapping=30.0, sliding_window=16)
    Gemma2ForCausalLM(cfg).save_pretrained(tmp_path)
    mcfg = ModelConfig(name_or_path=str(tmp_path), dtype="float32", device="cpu")
    model = load_model(mcfg, torch.device("cpu"), layers=2)
    assert model.config._attn_implementation == "eager" and len(decoder_layers(model)) == 2
    assert len(model.config.layer_types) == 2  # per-layer lists cut with the layer count
    ids = torch.randint(3, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    full = load_model(mcfg, torch.device("cpu"))
    with torch.no_grad():
        ref = full(input_ids=ids, output_hidden_states=True).hidden_states[2]
    torch.testing.assert_close(LayerRunner(model, 1)(ids, None), ref, rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="sdpa ignores .*soft-capping"):
        load_model(ModelConfig(name_or_path=str(tmp_path), attn_implementation="sdpa", device="cpu"),
                   torch.device("cpu"))


def test_mask_free_bf16_scoring_matches_the_masked_eager_path(world):
    """Parity of the fast path (SDPA, no padding mask, bf16) with the eager, masked one: pooled activations
    within 1e-2 relative (issue 11)."""
    from igds_ray.stages.score import PooledFeatureActs
    from igds_ray.tokenize import ExampleBuilder

    fast = load_model(ModelConfig(name_or_path=str(world.model_dir), dtype="bfloat16", device="cpu"),
                      torch.device("cpu"), layers=1)
    slow = load_model(ModelConfig(name_or_path=str(world.model_dir), dtype="bfloat16", device="cpu",
                                  attn_implementation="eager"), torch.device("cpu"))
    assert fast.config._attn_implementation == "sdpa"
    tok = load_tokenizer(ModelConfig(name_or_path=str(world.model_dir)))
    # A ReLU SAE: JumpReLU's step turns a 2e-8 difference at a threshold into a jump of the threshold's size
    # (measured here: one such flip moved a pooled activation by 1e-3 even in float32).
    sae = SAE.load_from_disk(world.saes["standard"])
    idx = list(range(64))
    prompts = [f"Tom has {i} apples and buys {i % 7 + 1} more. How many apples?" * (1 + i % 3) for i in range(24)]
    examples = ExampleBuilder(tok, "mean", 256).build_text(prompts)
    got = PooledFeatureActs(LayerRunner(fast, 0), FeatureEncoder(sae, idx), tok.pad_token_id, "mean", 512)(examples)
    ref = np.zeros_like(got)
    with torch.no_grad():  # the eager model, with the padding mask, one row at a time
        for r, e in enumerate(examples):
            h = LayerRunner(slow, 0, prune=False)(torch.tensor([e.input_ids]),
                                                  torch.ones(1, len(e.input_ids), dtype=torch.long))
            ref[r] = FeatureEncoder(sae, idx)(h[0, e.positions].float()).float().mean(0).numpy()
    assert np.abs(ref).max() > 0
    assert np.abs(got - ref).max() <= 1e-2 * np.abs(ref).max()
