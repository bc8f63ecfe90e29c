"""vLLM on a CUDA GPU: a large-factor SAE intervention changes the model's log-probabilities with CUDA graphs
and torch.compile on (the default engine), exactly as it does in eager mode (issue 11, part 4).

Needs a CUDA GPU and the CUDA vLLM wheel; marked `gpu` (excluded from `make test`) and skipped elsewhere.
Run: HF_HUB_OFFLINE=1 python -m pytest -q -m gpu tests/test_vllm_gpu.py
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

vllm = pytest.importorskip("vllm")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from igds_ray.config import ModelConfig, SAEConfig  # noqa: E402
from igds_ray.demo.tiny import make_rows  # noqa: E402
from igds_ray.generation.base import Intervention  # noqa: E402


@pytest.mark.parametrize("factor", [8.0, 0.0])
def test_an_intervention_changes_logprobs_with_cuda_graphs_as_in_eager_mode(world, factor) -> None:
    from igds_ray.generation.hf import HFBackend
    from igds_ray.generation.vllm import VLLMBackend

    rows = make_rows(16, seed=1)
    prompts, refs = [r["prompt"] for r in rows], [r["response"] for r in rows]
    model = ModelConfig(name_or_path=str(world.model_dir), dtype="float32", device="cuda")
    sae = SAEConfig(path=str(world.saes["jumprelu"]))
    hf = HFBackend(model, sae, device="cuda")
    (f1,) = [int(i) for i in torch.tensor(hf.activation_quantile(prompts, hf.sae_layer, range(64))).argsort()[-1:]]
    iv = Intervention(0, (f1,), factor)
    out = {}
    for eager in (False, True):  # compiled + CUDA graphs first: the default a cluster runs
        vl = VLLMBackend(model, sae, dtype="float32", enforce_eager=eager, gpu_memory_utilization=0.3,
                         max_model_len=256)
        cfg = vl.llm.llm_engine.vllm_config.compilation_config
        assert (cfg.mode.name == "NONE") == eager and (eager or cfg.cudagraph_mode.name != "NONE")
        base = torch.tensor(vl.loglik(prompts, refs), dtype=torch.float64)
        out[eager] = torch.tensor(vl.loglik(prompts, refs, iv), dtype=torch.float64)
        assert (out[eager] - base).abs().max() > 1e-3, f"the intervention did nothing (eager={eager})"
        vl.close()
    torch.testing.assert_close(out[False], out[True], rtol=0, atol=1e-3)
    torch.testing.assert_close(out[True], torch.tensor(hf.loglik(prompts, refs, iv), dtype=torch.float64),
                               rtol=0, atol=1e-3)
