"""SAE-feature interventions on the HF backend: scale and clamp modes, their validation, and the
activation quantiles that put clamp values on each latent's own scale. Tiny real models and sae-lens
SAEs built in code (igds_ray/demo/tiny.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sae_lens import SAE

from igds_ray.config import ModelConfig, SAEConfig
from igds_ray.demo.tiny import PLANTED_TARGET, build_planted_world, make_rows
from igds_ray.generation import Intervention, SamplingConfig
from igds_ray.generation.base import FeatureSteer
from igds_ray.generation.hf import HFBackend
from igds_ray.models.loading import decoder_layers
from igds_ray.models.runner import capture_block_output

GREEDY = SamplingConfig(max_new_tokens=6)
PLANTED = 9  # the planted world's latent that writes the unembedding of PLANTED_TARGET


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    return [r["prompt"] for r in make_rows(12, seed=1)]


@pytest.fixture(scope="module")
def hf(world):
    b = HFBackend(ModelConfig(str(world.model_dir), device="cpu"), SAEConfig(path=str(world.saes["standard"])),
                  device="cpu", batch_size=5)
    yield b
    b.close()


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return build_planted_world(tmp_path_factory.mktemp("planted"), planted=PLANTED)


def stream_into_next_block(backend: HFBackend, layer: int) -> tuple[list[torch.Tensor], object]:
    """Record the residual stream entering block layer+1, i.e. block `layer`'s output after every
    forward hook on it (the intervention's included), on each forward call (prefill and decode)."""
    store: list[torch.Tensor] = []

    def pre(_m, args, kwargs):
        store.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    handle = decoder_layers(backend.model)[layer + 1].register_forward_pre_hook(pre, with_kwargs=True)
    return store, handle


def firing_feature(backend: HFBackend, prompts: list[str]) -> int:
    """The latent active at the most prompt positions (block-L output)."""
    enc = backend.tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad(), capture_block_output(backend.model, backend.sae_layer) as store:
        backend.model(**enc)
    acts = backend.sae.encode(store[0])[enc["attention_mask"].bool()]
    return int((acts > 0).sum(0).argmax())


# -- the dataclass ------------------------------------------------------------------------------


def test_intervention_fields_and_compatibility() -> None:
    iv = Intervention(1, (9,), 2.0)  # positional, as before the clamp mode existed
    assert (iv.mode, iv.value) == ("scale", None)
    assert iv.coefficients() == (1.0, 0.0)
    clamp = Intervention(1, (9,), 4.0, mode="clamp", value=0.25)
    assert clamp.coefficients() == (-1.0, 0.25)
    # Frozen and hashable (trial grids and caches key on it); mode and value are part of the identity.
    assert len({iv, Intervention(1, (9,), 2.0), clamp, Intervention(1, (9,), 4.0, mode="clamp", value=0.5)}) == 3
    with pytest.raises(AttributeError):
        clamp.value = 1.0  # type: ignore[misc]
    keys = {Intervention(1, (9,), 4.0, mode="clamp", value=v).cache_key() for v in (0.25, 0.5)}
    keys |= {Intervention(1, (9,), 4.0).cache_key(), Intervention(1, (9,), 0.0, mode="clamp", value=0.0).cache_key(),
             Intervention(1, (9,), 0.0).cache_key()}
    assert len(keys) == 5  # the prefix-cache salt tells every mode/value apart


@pytest.mark.parametrize("kwargs, field", [
    (dict(mode="clamp"), "value"),  # clamp without a value
    (dict(mode="clamp", value=-0.5), "value"),
    (dict(mode="clamp", value=math.nan), "value"),
    (dict(mode="clamp", value=math.inf), "value"),
    (dict(mode="clamp", value="1"), "value"),
    (dict(value=1.0), "value"),  # a value with scale mode
    (dict(mode="steer"), "mode"),
    (dict(factor=-1.0), "factor"),
    (dict(factor=math.nan), "factor"),
    (dict(features=()), "features"),
    (dict(features=(3, 3)), "features"),
])
def test_bad_interventions_name_the_field(kwargs: dict, field: str) -> None:
    args = dict(layer=0, features=(3,), factor=1.0) | kwargs
    with pytest.raises(ValueError, match=rf"intervention {field}\b"):
        Intervention(**args)


# -- the math -----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["standard", "jumprelu"])
def test_both_modes_equal_reconstruction_plus_error(world, arch: str) -> None:
    """Scale and clamp are decode(z') + (h - decode(z)) with the chosen latents scaled / set, under
    the SAE's own encode and decode."""
    sae = SAE.load_from_disk(str(world.saes[arch]))
    feats = [5, 17, 40]
    steer = FeatureSteer.from_sae(sae, 0, feats, torch.device("cpu"), torch.float32)
    h = torch.randn(4, 9, int(sae.cfg.d_in), generator=torch.Generator().manual_seed(0)) * 0.2
    with torch.no_grad():
        z = sae.encode(h)
        assert (z[..., feats] > 0).any() and (z[..., feats] == 0).any()  # active and inactive positions
        for mode, x in (("scale", 0.0), ("scale", 6.0), ("clamp", 0.0), ("clamp", 0.3)):
            z2 = z.clone()
            if mode == "scale":
                z2[..., feats] *= x
                got = steer.apply(h, x)
            else:
                z2[..., feats] = x
                got = steer.apply(h, value=x)
            want = sae.decode(z2) + (h - sae.decode(z))
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            iv = Intervention(0, tuple(feats), x) if mode == "scale" else Intervention(0, tuple(feats), 1.0, mode, x)
            torch.testing.assert_close(steer.apply_affine(h, *steer.coefficient_tensors(iv)), got, rtol=0, atol=0)


def test_clamp_re_encodes_to_its_value_at_every_position(world, hf, prompts, tmp_path) -> None:
    """Through the HF hook (prefill and every decode step): the stream leaving block L re-encodes to
    the clamp value at every position, for a latent the encoder reads with gain 1 (W_enc[:, f] =
    W_dec[f], unit norm: how the tiny SAEs are built) that is active everywhere (its bias lifted).
    For the unmodified latent, the re-encoded pre-activation is pre + (value - a) * gain, everywhere."""
    f, value = firing_feature(hf, prompts), 0.37
    sae = SAE.load_from_disk(str(world.saes["standard"]))
    torch.testing.assert_close(sae.W_enc[:, f] @ sae.W_dec[f], torch.tensor(1.0), rtol=0, atol=1e-6)
    iv = Intervention(0, (f,), 1.0, mode="clamp", value=value)

    # The unmodified latent, active at some positions only. capture_block_output is registered before
    # generate adds the clamp hook, so it sees the stream before the clamp; the next block's input, after.
    after, handle = stream_into_next_block(hf, 0)
    try:
        with capture_block_output(hf.model, 0) as before:
            clamped_texts = hf.generate(prompts, GREEDY, iv)
    finally:
        handle.remove()
    # Per batch of 5 prompts: one prefill, then one step per further token.
    assert len(after) == len(before) == math.ceil(len(prompts) / 5) * GREEDY.max_new_tokens
    seen = []
    for h0, h1 in zip(before, after):
        with torch.no_grad():
            pre = (h0 - sae.b_dec) @ sae.W_enc[:, f] + sae.b_enc[f]
            a = torch.relu(pre)
            pre_after = (h1 - sae.b_dec) @ sae.W_enc[:, f] + sae.b_enc[f]
        torch.testing.assert_close(pre_after, pre + (value - a), rtol=0, atol=1e-5)
        seen.append(a.flatten())
    seen = torch.cat(seen)
    assert (seen > 0).any() and (seen == 0).any()  # both kinds of position were checked
    assert clamped_texts != hf.generate(prompts, GREEDY)

    # Lift the latent's bias so it is active at every position: then re-encoding gives the value.
    with torch.no_grad():
        sae.b_enc[f] = 1.0  # pre-activations of this world's latents stay within about +-0.2
    sae.save_model(tmp_path / "sae")
    lifted = HFBackend(ModelConfig(str(world.model_dir), device="cpu"), SAEConfig(path=str(tmp_path / "sae")),
                       device="cpu", batch_size=5)
    store, handle = stream_into_next_block(lifted, 0)
    try:
        lifted.generate(prompts, GREEDY, iv)
    finally:
        handle.remove()
    assert len(store) == math.ceil(len(prompts) / 5) * GREEDY.max_new_tokens
    for after in store:
        with torch.no_grad():
            re = sae.encode(after)[..., f]
        torch.testing.assert_close(re, torch.full_like(re, value), rtol=0, atol=1e-5)
    lifted.close()


def test_clamp_to_zero_is_ablation_exactly(hf, prompts) -> None:
    prompts = prompts[:8]
    f = firing_feature(hf, prompts)
    ablate, clamp0 = Intervention(0, (f,), 0.0), Intervention(0, (f,), 1.0, mode="clamp", value=0.0)
    h = torch.randn(3, 7, 128, generator=torch.Generator().manual_seed(1)) * 0.2
    steer = hf.steer(ablate)
    assert torch.equal(steer.apply(h, value=0.0), steer.apply(h, 0.0))
    streams = {}
    for name, iv in (("ablate", ablate), ("clamp0", clamp0)):
        store, handle = stream_into_next_block(hf, 0)
        try:
            texts = hf.generate(prompts, GREEDY, iv)
        finally:
            handle.remove()
        streams[name] = (texts, store)
    (ta, sa), (tc, sc) = streams["ablate"], streams["clamp0"]
    assert ta == tc
    assert len(sa) == len(sc) and all(torch.equal(x, y) for x, y in zip(sa, sc))
    refs = [r["response"] for r in make_rows(len(prompts), seed=1)]
    assert hf.loglik(prompts, refs, ablate) == hf.loglik(prompts, refs, clamp0)
    # Not vacuous: ablating this latent changes the model.
    assert hf.loglik(prompts, refs, ablate) != hf.loglik(prompts, refs)


# -- the planted world: clamping a weak latent makes the model say the target -------------------


def test_clamp_makes_the_planted_world_say_the_target(planted, tmp_path) -> None:
    b = HFBackend(ModelConfig(str(planted / "model"), device="cpu"), SAEConfig(path=str(planted / "sae")),
                  device="cpu")
    ps = ["Tom has 3 apples.", "the cat sat", "Tell me about the river"]
    word = PLANTED_TARGET.strip()
    base = b.generate(ps, GREEDY)
    assert not any(word in t for t in base)
    (p99,) = b.activation_quantile(ps, 1, [PLANTED])
    torch.testing.assert_close(p99, 0.002, rtol=1e-6, atol=0)  # built weak and constant: W_enc 0, b_enc 0.002
    clamp = Intervention(1, (PLANTED,), 30.0, mode="clamp", value=30.0 * p99)
    said = b.generate(ps, GREEDY, clamp)
    assert all(word in t for t in said), said
    ll0 = np.mean(b.loglik(ps, [PLANTED_TARGET] * len(ps)))
    ll1 = np.mean(b.loglik(ps, [PLANTED_TARGET] * len(ps), clamp))
    assert ll1 > ll0 + 1.0
    # Clamped to 0 it is ablated: the target is not said.
    assert not any(word in t for t in b.generate(ps, GREEDY, Intervention(1, (PLANTED,), 0.0, mode="clamp", value=0.0)))
    b.close()

    # The same latent switched off (never active): no factor can scale it up, a clamp still steers.
    sae = SAE.load_from_disk(str(planted / "sae"))
    with torch.no_grad():
        sae.b_enc[PLANTED] = 0.0
    sae.save_model(tmp_path / "sae")
    off = HFBackend(ModelConfig(str(planted / "model"), device="cpu"), SAEConfig(path=str(tmp_path / "sae")),
                    device="cpu")
    assert off.activation_quantile(ps, 1, [PLANTED]) == [0.0]
    assert off.generate(ps, GREEDY, Intervention(1, (PLANTED,), 1000.0)) == base
    assert all(word in t for t in off.generate(ps, GREEDY, clamp))
    off.close()


# -- activation quantiles -----------------------------------------------------------------------


def direct_acts(backend: HFBackend, sae, prompts: list[str], feats: list[int]) -> np.ndarray:
    """[tokens, k]: each prompt alone (no padding) through the model, the full SAE encode, special tokens dropped."""
    special = set(backend.tok.all_special_ids)
    rows = []
    for p in prompts:
        ids = backend.tok(p, return_tensors="pt")["input_ids"]
        with torch.no_grad(), capture_block_output(backend.model, backend.sae_layer) as store:
            backend.model(ids)
        keep = torch.tensor([int(t) not in special for t in ids[0]])
        with torch.no_grad():
            rows.append(sae.encode(store[0][0][keep])[:, feats].double().numpy())
    return np.concatenate(rows)


def test_activation_quantile_equals_direct_encode(world, hf, prompts, tmp_path) -> None:
    sae = SAE.load_from_disk(str(world.saes["standard"]))
    dead = 11
    with torch.no_grad():
        sae.b_enc[dead] = -100.0  # never active
    sae.save_model(tmp_path / "sae")
    b = HFBackend(ModelConfig(str(world.model_dir), device="cpu"), SAEConfig(path=str(tmp_path / "sae")),
                  device="cpu", batch_size=5)  # 12 prompts of mixed length: padded batches, a short last one
    ps = prompts + ["<|user|>\nTell me about the cat<|assistant|>\n"]  # special tokens inside the text too
    feats = [firing_feature(b, prompts), 3, dead, 40, 3]
    acts = direct_acts(b, sae, ps, feats)
    for q in (0.99, 0.5, 1.0):
        got = b.activation_quantile(ps, 0, feats, q)
        want = [float(np.quantile(c[c > 0], q)) if (c > 0).any() else 0.0 for c in acts.T]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert got[2] == 0.0 and all(x > 0 for i, x in enumerate(got) if i != 2)
    assert got[1] == got[4]
    with pytest.raises(ValueError, match="q must be in"):
        b.activation_quantile(ps, 0, feats, 99)
    with pytest.raises(ValueError, match="SAE reads layer 0"):
        b.activation_quantile(ps, 1, feats, 0.99)
    with pytest.raises(ValueError, match="out of range"):
        b.activation_quantile(ps, 0, [64], 0.99)
    with pytest.raises(ValueError, match="at least one prompt"):
        b.activation_quantile([], 0, feats, 0.99)
    b.close()


def test_activation_quantile_skips_special_tokens(world, hf, prompts, tmp_path) -> None:
    """A latent built to fire on the BOS position only reads 0.0: special tokens are not counted."""
    bos = hf.tok.bos_token_id
    hs, is_bos = [], []
    for p in prompts:
        ids = hf.tok(p, return_tensors="pt")["input_ids"]
        with torch.no_grad(), capture_block_output(hf.model, 0) as store:
            hf.model(ids)
        hs.append(store[0][0])
        is_bos.append(ids[0] == bos)
    h, is_bos = torch.cat(hs), torch.cat(is_bos)
    u = h[is_bos][0] / h[is_bos][0].norm()
    proj = h @ u
    assert is_bos.sum() == len(prompts) and proj[is_bos].min() > proj[~is_bos].max()  # the construction holds
    g = 7
    sae = SAE.load_from_disk(str(world.saes["standard"]))
    with torch.no_grad():
        sae.W_enc[:, g] = u
        sae.b_enc[g] = -(proj[is_bos].min() + proj[~is_bos].max()) / 2 + u @ sae.b_dec
    sae.save_model(tmp_path / "sae")
    b = HFBackend(ModelConfig(str(world.model_dir), device="cpu"), SAEConfig(path=str(tmp_path / "sae")),
                  device="cpu", batch_size=5)
    with torch.no_grad():
        fires = sae.encode(h)[:, g] > 0
    assert torch.equal(fires, is_bos)
    assert b.activation_quantile(prompts, 0, [g, 3])[0] == 0.0
    b.close()
