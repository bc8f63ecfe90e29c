"""vLLM backend against the HF backend on a tiny real model: same greedy texts with and without SAE
interventions (scale and clamp modes), on the compiled path (torch.compile/inductor) and the eager one,
and no prefix-cache leaks across interventions.

Needs vLLM (the CPU build in .venv-vllm: `bash scripts/make_vllm_venv.sh`); skipped elsewhere.
Run: HF_HUB_OFFLINE=1 .venv-vllm/bin/python -m pytest -q tests/test_vllm_backend.py
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("vllm")

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from igds_ray.config import ModelConfig, SAEConfig  # noqa: E402
from igds_ray.demo.tiny import corpus, make_rows  # noqa: E402
from igds_ray.generation.base import FeatureSteer, Intervention, SamplingConfig  # noqa: E402

GREEDY = SamplingConfig(max_new_tokens=24)
N_PROMPTS = 16
# Small KV blocks so that the prompts below span several full blocks: vLLM's prefix cache only
# shares full blocks, and the CPU default (128 tokens) would leave it unused in this test.
BLOCK = 32
ENGINES = {  # name -> (SAE architecture, vLLM options)
    "compiled-jumprelu": ("jumprelu", dict(enforce_eager=False)),
    "eager-standard": ("standard", dict(enforce_eager=True)),
}


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    return [r["prompt"] for r in make_rows(N_PROMPTS, seed=1)]


@pytest.fixture(scope="module")
def shared_prefix_prompts(prompts: list[str]) -> list[str]:
    """Prompts with a common few-shot preamble longer than two KV blocks, as task templates have."""
    preamble = "\n".join(corpus(8, seed=3)) + "\n"
    return [preamble + p for p in prompts]


@pytest.fixture(scope="module", params=list(ENGINES))
def pair(request: pytest.FixtureRequest, world):
    """(HF backend, vLLM backend, engine name) for one SAE architecture and engine mode."""
    from igds_ray.generation.hf import HFBackend
    from igds_ray.generation.vllm import VLLMBackend

    arch, opts = ENGINES[request.param]
    model_cfg = ModelConfig(name_or_path=str(world.model_dir), dtype="float32", device="cpu")
    sae_cfg = SAEConfig(path=str(world.saes[arch]))
    hf = HFBackend(model_cfg, sae_cfg, device="cpu")
    vl = VLLMBackend(model_cfg, sae_cfg, dtype="float32", block_size=BLOCK, kv_cache_memory_bytes=64 << 20, **opts)
    yield hf, vl, request.param
    vl.close()
    hf.close()


def firing_features(hf, prompts: list[str], n: int = 2) -> tuple[int, ...]:
    """The n features active at the most prompt positions (block-0 output of the HF model)."""
    enc = hf.tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        hs = hf.model(**enc, output_hidden_states=True).hidden_states[hf.sae_layer + 1]
    steer = FeatureSteer.from_sae(hf.sae, hf.sae_layer, range(int(hf.sae.cfg.d_sae)), torch.device("cpu"), torch.float32)
    fires = (steer.acts(hs)[enc["attention_mask"].bool()] > 0).sum(0)
    return tuple(int(i) for i in fires.argsort(descending=True)[:n])


def clamp_value(hf, prompts: list[str], f: int, multiple: float = 3.0) -> float:
    """A clamp value on the latent's own scale: a multiple of its p99 activation on the prompts."""
    (p99,) = hf.activation_quantile(prompts, hf.sae_layer, [f])
    assert p99 > 0
    return multiple * p99


def test_steer_delta_is_feature_steer_apply(world) -> None:
    """The compile-friendly update (zero-padded slots, per-slot scale and offset) is FeatureSteer's math,
    in both modes."""
    from sae_lens import SAE

    from igds_ray.generation.vllm import steer_delta

    for arch in ("standard", "jumprelu"):
        sae = SAE.load_from_disk(str(world.saes[arch]))
        feats, K = (5, 17, 40), 16
        s = FeatureSteer.from_sae(sae, 0, feats, torch.device("cpu"), torch.float32)
        n = K - len(feats)  # zero-padded slots, as in the patched layer's buffers
        h = torch.randn(50, int(sae.cfg.d_in), generator=torch.Generator().manual_seed(0)) * 3
        thr = F.pad(s.threshold, (0, n)) if s.threshold is not None else None
        for iv, want in ((Intervention(0, feats, 8.0), s.apply(h, 8.0)),
                         (Intervention(0, feats, 1.0, mode="clamp", value=0.7), s.apply(h, value=0.7))):
            mult, offset = iv.coefficients()
            scale = F.pad(torch.full((len(feats),), mult), (0, n))
            off = F.pad(torch.full((len(feats),), offset), (0, n))
            got = h + steer_delta(h, F.pad(s.W_enc, (0, n)), F.pad(s.b_enc, (0, n)), thr,
                                  F.pad(s.W_dec, (0, 0, 0, n)), s.b_dec, s.apply_b_dec_to_input, scale, off)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
            assert not torch.equal(got, h)


def test_greedy_matches_hf(pair, prompts) -> None:
    hf, vl, _ = pair
    assert vl.generate(prompts, GREEDY) == hf.generate(prompts, GREEDY)


def test_interventions_match_hf_and_change_outputs(pair, prompts) -> None:
    hf, vl, _ = pair
    f1, f2 = firing_features(hf, prompts)
    base = hf.generate(prompts, GREEDY)
    v1 = clamp_value(hf, prompts, f1)
    clamps = (Intervention(0, (f1,), 3.0, mode="clamp", value=v1),
              Intervention(0, (f1, f2), 1.0, mode="clamp", value=0.5 * v1))
    for iv in (Intervention(0, (f1,), 0.0), Intervention(0, (f1,), 8.0), Intervention(0, (f1, f2), 4.0), *clamps):
        ref = hf.generate(prompts, GREEDY, iv)
        assert sum(a != b for a, b in zip(ref, base)) >= 2, f"{iv} changes almost nothing: a vacuous check"
        assert vl.generate(prompts, GREEDY, iv) == ref, iv


def test_patched_layer_counter_advances(pair, prompts) -> None:
    """The counter is a tensor bumped inside the (compiled) layer forward: it proves the patch is in the graph."""
    hf, vl, name = pair
    compiled = vl.llm.llm_engine.vllm_config.compilation_config.mode.name
    assert (compiled == "NONE") == name.startswith("eager"), compiled
    f1, _ = firing_features(hf, prompts)
    before = vl.hook_calls
    vl.generate(prompts, GREEDY, Intervention(0, (f1,), 0.0))
    after = vl.hook_calls
    # One prefill step or more, plus one decode step per new token after the first.
    assert after - before >= GREEDY.max_new_tokens
    # Switching mode and value is a buffer write: dynamo traces no new graph.
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    for iv in (Intervention(0, (f1,), 1.0, mode="clamp", value=0.3),
               Intervention(0, (f1,), 1.0, mode="clamp", value=0.6), Intervention(0, (f1,), 4.0)):
        vl.generate(prompts[:4], SamplingConfig(max_new_tokens=3), iv)
    assert counters["stats"]["unique_graphs"] == graphs
    assert graphs > 0 or compiled == "NONE"  # the counter does see vLLM's traces (process-wide)
    after = vl.hook_calls
    vl.generate(prompts[:2], SamplingConfig(max_new_tokens=3))
    assert vl.hook_calls > after
    # Only layer L was swapped.
    from igds_ray.models.loading import decoder_layers

    (names,) = vl.llm.apply_model(lambda model: [type(m).__name__ for m in decoder_layers(model)])
    assert names == ["IgdsSteeredLlamaDecoderLayer" if i == hf.sae_layer else "LlamaDecoderLayer"
                     for i in range(len(names))], names


def test_prefix_cache_does_not_leak_across_interventions(pair, shared_prefix_prompts) -> None:
    from vllm.inputs import TokensPrompt

    hf, vl, _ = pair
    ps = shared_prefix_prompts
    assert min(len(x) for x in hf.tok(ps)["input_ids"]) > 2 * BLOCK
    f1, _ = firing_features(hf, ps)
    iv = Intervention(0, (f1,), 8.0)
    base_ref, iv_ref = hf.generate(ps, GREEDY), hf.generate(ps, GREEDY, iv)
    assert base_ref != iv_ref
    # Clamp interventions that differ only in value (or only in mode) get their own cache blocks too.
    v = clamp_value(hf, ps, f1)
    clamp_a = Intervention(0, (f1,), 8.0, mode="clamp", value=v)
    clamp_b = Intervention(0, (f1,), 8.0, mode="clamp", value=2 * v)
    clamp_refs = [hf.generate(ps, GREEDY, c) for c in (clamp_a, clamp_b)]
    assert len({tuple(base_ref), tuple(iv_ref), *map(tuple, clamp_refs)}) == 4
    vl.llm.reset_prefix_cache()
    for _ in range(2):
        assert vl.generate(ps, GREEDY) == base_ref
        assert vl.generate(ps, GREEDY, iv) == iv_ref
        assert vl.generate(ps, GREEDY, clamp_a) == clamp_refs[0]
        assert vl.generate(ps, GREEDY, clamp_b) == clamp_refs[1]

    # Negative control: the same intervened requests without the cache salt reuse the unintervened
    # KV blocks and come out wrong, so the checks above could fail.
    vl.generate(ps, GREEDY)
    vl._load_state(iv)  # noqa: SLF001
    try:
        outs = vl.llm.generate([TokensPrompt(prompt_token_ids=x) for x in hf.tok(ps)["input_ids"]],
                               [vl._sampling_params(GREEDY, i) for i in range(len(ps))], use_tqdm=False)
    finally:
        vl._load_state(None)  # noqa: SLF001
    unsalted = [hf.tok.decode(list(o.outputs[0].token_ids), skip_special_tokens=True) for o in outs]
    assert unsalted != iv_ref


def test_stop_strings_and_repetition_penalty_match_hf(pair, prompts) -> None:
    hf, vl, _ = pair
    base = hf.generate(prompts, GREEDY)
    # A stop string that occurs in some outputs but not all, so both branches are exercised.
    stop = next(c for c in "aeiost " if 3 <= sum(c in t for t in base) <= len(base) - 3)
    for sampling in (SamplingConfig(max_new_tokens=24, stop=(stop,)), SamplingConfig(max_new_tokens=24, repetition_penalty=1.5)):
        ref = hf.generate(prompts, sampling)
        assert ref != base
        assert vl.generate(prompts, sampling) == ref, sampling


def test_loglik_matches_hf(pair, prompts) -> None:
    hf, vl, _ = pair
    refs = [r["response"] for r in make_rows(N_PROMPTS, seed=1)]
    refs[0] = ""  # no reference tokens: nan in both
    f1, _ = firing_features(hf, prompts)
    base = torch.tensor(hf.loglik(prompts, refs)[1:], dtype=torch.float64)
    clamp = Intervention(0, (f1,), 3.0, mode="clamp", value=clamp_value(hf, prompts, f1))
    for iv in (None, Intervention(0, (f1,), 8.0), clamp):
        want = torch.tensor(hf.loglik(prompts, refs, iv), dtype=torch.float64)
        got = torch.tensor(vl.loglik(prompts, refs, iv), dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5, equal_nan=True)
        if iv is not None:
            assert not torch.allclose(got[1:], base, atol=1e-3), iv


def test_seeded_sampling_is_reproducible(pair, prompts) -> None:
    _, vl, _ = pair
    s0 = SamplingConfig(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=0)
    a, b = vl.generate(prompts[:4] * 2, s0), vl.generate(prompts[:4] * 2, s0)
    assert a == b
    assert a[:4] != a[4:]  # one seed per prompt: repeated prompts get different samples
    assert vl.generate(prompts[:4] * 2, SamplingConfig(max_new_tokens=12, temperature=1.0, seed=1)) != a


def test_refuses_what_it_cannot_do(pair, world) -> None:
    from igds_ray.generation.vllm import VLLMBackend

    _, vl, _ = pair
    with pytest.raises(ValueError, match="TopK"):  # checked before an engine is built
        VLLMBackend(ModelConfig(name_or_path=str(world.model_dir)), SAEConfig(path=str(world.saes["topk"])))
    with pytest.raises(ValueError, match="layer"):
        vl.generate(["x"], GREEDY, Intervention(1, (0,), 0.0))
    with pytest.raises(ValueError, match="out of range"):
        vl.generate(["x"], GREEDY, Intervention(0, (10_000,), 0.0))
    with pytest.raises(ValueError, match="max_features"):
        vl.generate(["x"], GREEDY, Intervention(0, tuple(range(17)), 0.0))
    with pytest.raises(NotImplementedError, match="HFBackend.activation_quantile"):
        vl.activation_quantile(["x"], 0, [0])


def test_evaluation_sizes_the_engine_from_the_prompts_and_closes_it_before_the_hf_copy(world, monkeypatch) -> None:
    """Evaluation with vLLM (issue 11's memory plan): the engine gets `max_model_len` = longest prompt + new
    tokens (+ slack) and a GPU share from `num_gpus`; it is closed before the HF model that reads activations
    loads, and the predictions equal the HF backend's."""
    from igds_ray.config import to_dict
    from igds_ray.generation.vllm import VLLMBackend
    from igds_ray.models.loading import load_tokenizer
    from igds_ray.stages import evaluate
    from igds_ray.tasks import TaskExample, get_task

    task = get_task("math")
    exs = [TaskExample(f"t{i}", f"Tom has {i + 2} apples and buys {i + 1} more. How many?", f"{2 * i + 3}")
           for i in range(6)]
    model = ModelConfig(name_or_path=str(world.model_dir), dtype="float32", device="cpu")
    made: list[tuple[dict, VLLMBackend]] = []
    closed: list[bool] = []
    real_init, real_close = VLLMBackend.__init__, VLLMBackend.close

    def init(self, *a, **kw):
        made.append((dict(kw), self))
        kw.setdefault("kv_cache_memory_bytes", 64 << 20)
        real_init(self, *a, **kw)

    def close(self):
        closed.append(True)
        real_close(self)

    monkeypatch.setattr(VLLMBackend, "__init__", init)
    monkeypatch.setattr(VLLMBackend, "close", close)
    ecfg = to_dict(evaluate.EvalConfig(backend="vllm", max_new_tokens=12, batch_size=4, num_gpus=0.5, template=0))
    run = lambda backend: evaluate._evaluate_arm(  # noqa: E731
        "base", to_dict(model), to_dict(SAEConfig(path=str(world.saes["jumprelu"]))), ["l0_p1", "l0_p3"], task,
        [x.to_dict() for x in exs], {**ecfg, "backend": backend})
    table, info = run("vllm")
    assert info["status"] == "ok" and closed == [True] and len(made) == 1
    tok = load_tokenizer(model)
    longest = max(len(tok(task.build_prompt(x, 0))["input_ids"]) for x in exs)
    assert made[0][0]["max_model_len"] == longest + 12 + 8
    assert made[0][0]["gpu_memory_utilization"] == 0.45
    assert made[0][1].llm is None  # the engine is gone before the activations are read
    hf_table, _ = run("hf")
    assert table.column("prediction").to_pylist() == hf_table.column("prediction").to_pylist()
    assert table.column("acts").to_pylist() == hf_table.column("acts").to_pylist()
