"""`igds_ray.demo.sae_train.train_sae`: a real sae-lens training run on a tiny random Llama."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

LAYER = 1  # not the last block: there HF's hidden_states[-1] is the final-normed output
HIDDEN = 64
D_SAE = 128
TRAIN = dict(d_sae=D_SAE, k=8, training_tokens=100_000, batch_size_tokens=1024, lr=1e-3, seed=0, progress=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from igds_ray.demo.tiny import build_llama, build_tokenizer, corpus

    root = tmp_path_factory.mktemp("sae_train")
    tok = build_tokenizer(corpus(), vocab_size=512)
    model = build_llama(len(tok), hidden_size=HIDDEN, num_layers=4, seed=0, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return {"root": root, "model_dir": root / "model", "texts": corpus(300, seed=1)}


@pytest.fixture(scope="module")
def trained(tiny: dict) -> dict:
    from igds_ray.demo.sae_train import train_sae

    out = tiny["root"] / "sae"
    stats = train_sae(tiny["model_dir"], tiny["texts"], LAYER, out, **TRAIN)
    return {"out": out, "stats": stats}


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "sae_weights.safetensors"))


def test_saved_sae_loads_with_the_package_hook_name(tiny: dict, trained: dict) -> None:
    from sae_lens import SAE, JumpReLUSAE

    sae = SAE.load_from_disk(str(trained["out"]))
    assert sae.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    assert sae.cfg.metadata.hf_hook_name == "model.layers.1"
    assert sae.cfg.d_in == HIDDEN and sae.cfg.d_sae == D_SAE
    # The default, BatchTopK, is saved by sae-lens as a JumpReLU SAE.
    assert isinstance(sae, JumpReLUSAE) and sae.cfg.architecture() == "jumprelu"
    s = trained["stats"]
    assert s["hook_name"] == "blocks.1.hook_resid_post"
    assert s["architecture"] == "batchtopk" and s["saved_architecture"] == "jumprelu"
    assert s["tokens_trained"] >= TRAIN["training_tokens"]
    assert s["wall_s"] > 0 and 0 < s["l0"] < D_SAE and 0 <= s["dead_fraction"] < 1


def test_package_loader_accepts_it_and_slices_it(tiny: dict, trained: dict) -> None:
    from igds_ray.config import ModelConfig, SAEConfig
    from igds_ray.models.loading import check_compatible, load_sae, model_info, sae_info
    from igds_ray.models.runner import FeatureEncoder

    info = sae_info(SAEConfig(path=str(trained["out"])))
    assert (info.layer, info.d_in, info.d_sae, info.architecture) == (LAYER, HIDDEN, D_SAE, "jumprelu")
    check_compatible(model_info(ModelConfig(name_or_path=str(tiny["model_dir"]))), info)
    sae = load_sae(SAEConfig(path=str(trained["out"])), torch.device("cpu"))
    enc = FeatureEncoder(sae, [3, 17, 40])
    assert enc.sliced  # JumpReLU: the fast per-latent path, not a full encode
    x = torch.randn(5, HIDDEN)
    torch.testing.assert_close(enc(x), sae.encode(x)[:, [3, 17, 40]])


def test_reported_quality_matches_an_independent_forward_pass(tiny: dict, trained: dict) -> None:
    from sae_lens import SAE
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = tiny["texts"]
    held_out = texts[-(len(texts) // 10):]  # the last 10%, never trained on
    tok = AutoTokenizer.from_pretrained(tiny["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(tiny["model_dir"]).eval()
    enc = tok(held_out, return_tensors="pt", padding=True, truncation=True, max_length=64)
    with torch.no_grad():
        hidden = model(**enc, output_hidden_states=True).hidden_states[LAYER + 1]
    special = torch.tensor(tok.all_special_ids)
    x = hidden[enc["attention_mask"].bool() & ~torch.isin(enc["input_ids"], special)]
    sae = SAE.load_from_disk(str(trained["out"]))
    with torch.no_grad():
        acts = sae.encode(x)
        recon = sae.decode(acts)
    fve = 1 - (x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    s = trained["stats"]
    assert s["n_eval_texts"] == len(held_out) and s["n_eval_tokens"] == x.shape[0]
    assert s["fve"] > 0
    assert s["fve"] == pytest.approx(float(fve), abs=1e-4)
    assert s["l0"] == pytest.approx(float((acts != 0).float().sum(-1).mean()), abs=1e-3)
    assert s["dead_fraction"] == pytest.approx(float((acts == 0).all(0).float().mean()), abs=1e-6)


def test_weights_moved_from_initialization(trained: dict) -> None:
    w = _weights(trained["out"])
    # sae-lens initializes b_dec at 0, W_enc = W_dec.T (each latent's encoder column parallel to its
    # decoder row; norm folding keeps that) and the BatchTopK threshold at 0.
    assert w["b_dec"].abs().max() > 1e-3
    assert (w["threshold"] > 0).all()
    cos = torch.nn.functional.cosine_similarity(w["W_enc"].T, w["W_dec"], dim=-1)
    assert cos.mean() < 0.95


def test_same_seed_same_weights_and_global_state_kept(tiny: dict, trained: dict) -> None:
    from igds_ray.demo.sae_train import train_sae

    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    out = tiny["root"] / "sae_again"
    stats = train_sae(tiny["model_dir"], tiny["texts"], LAYER, out, **TRAIN)
    assert torch.equal(torch.get_rng_state(), rng) and torch.get_num_threads() == threads
    a, b = _weights(trained["out"]), _weights(out)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert stats["fve"] == trained["stats"]["fve"]


@pytest.mark.parametrize("architecture, saved_as", [("topk", "topk"), ("jumprelu", "jumprelu")])
def test_other_architectures(tiny: dict, architecture: str, saved_as: str) -> None:
    from sae_lens import SAE

    from igds_ray.config import ModelConfig, SAEConfig
    from igds_ray.demo.sae_train import train_sae
    from igds_ray.models.loading import check_compatible, model_info, sae_info

    out = tiny["root"] / f"sae_{architecture}"
    stats = train_sae(tiny["model_dir"], tiny["texts"], 3, out, architecture=architecture,
                      **{**TRAIN, "training_tokens": 8192, "d_sae": 64})
    sae = SAE.load_from_disk(str(out))
    assert sae.cfg.architecture() == saved_as == stats["saved_architecture"]
    assert sae.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    check_compatible(model_info(ModelConfig(name_or_path=str(tiny["model_dir"]))), sae_info(SAEConfig(path=str(out))))
    if architecture == "topk":
        assert stats["l0"] == pytest.approx(8.0)


def test_rejects_bad_arguments(tiny: dict, tmp_path: Path) -> None:
    from igds_ray.demo.sae_train import train_sae

    with pytest.raises(ValueError, match="architecture"):
        train_sae(tiny["model_dir"], tiny["texts"], LAYER, tmp_path / "x", architecture="gated")
    with pytest.raises(ValueError, match="out of range"):
        train_sae(tiny["model_dir"], tiny["texts"], 4, tmp_path / "x")
    with pytest.raises(ValueError, match="too few"):
        train_sae(tiny["model_dir"], ["hi"], LAYER, tmp_path / "x", context_size=64)
