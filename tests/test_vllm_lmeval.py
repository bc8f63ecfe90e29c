"""lm-eval's vLLM model (`evaluate.lm_eval_model: vllm`) on the run's test set as a local task, against igds's
HF backend: the same generations and metric for the base model, a PEFT LoRA served as a vLLM LoRA
(`lora_local_path`), and the same adapter merged into the weights.

Needs vLLM and lm-eval (the CPU build in .venv-vllm: `bash scripts/make_vllm_venv.sh`, then
`.venv-vllm/bin/pip install lm_eval==0.4.13`); skipped elsewhere.
Run: HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv-vllm/bin/python -m pytest -q -p no:cacheprovider \
    tests/test_vllm_lmeval.py
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("vllm")
pytest.importorskip("lm_eval")
pytest.importorskip("peft")

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from igds_ray.config import ModelConfig  # noqa: E402
from igds_ray.stages.evaluate_lmeval import run_lm_eval  # noqa: E402
from igds_ray.stages.lmeval_task import IGDS_FILTER, write_local_task  # noqa: E402
from igds_ray.tasks import MathTask  # noqa: E402
from tests.test_lm_eval import (  # noqa: E402
    MAX_NEW,
    N_TEST,
    TEMPLATE,
    arithmetic,
    build_adapter,
    build_trained_math_model,
    builtin,
)

# Eager mode: no torch.compile of the tiny model (seconds instead of tens of seconds per engine).
ENGINE = {"max_model_len": 256, "enforce_eager": True}



@pytest.fixture(scope="module", autouse=True)
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def math_model(tmp_path_factory):
    return build_trained_math_model(tmp_path_factory.mktemp("vllm_lmeval_model"))  # head_dim 32: vLLM-CPU accepts it


@pytest.fixture(scope="module")
def adapter(math_model, tmp_path_factory):
    return build_adapter(math_model, tmp_path_factory.mktemp("vllm_lmeval_adapter"))


@pytest.fixture(scope="module")
def local_task(tmp_path_factory):
    examples = arithmetic(N_TEST, seed=7)
    include, name = write_local_task(MathTask(), examples, TEMPLATE, tmp_path_factory.mktemp("vllm_lmeval_task"),
                                     MAX_NEW)
    return examples, include, name


@pytest.mark.parametrize("variant", ["base", "lora", "merged"])
def test_vllm_matches_builtin(variant, math_model, adapter, local_task):
    examples, include, name = local_task
    task = MathTask()
    model = ModelConfig(str(math_model), adapter=None if variant == "base" else str(adapter))
    expected = builtin(model, task, examples)
    res = run_lm_eval(model, [name], include, "vllm", adapter_mode="merged" if variant == "merged" else "peft",
                      vllm_options=ENGINE)
    rows = res["samples"][name]
    assert [r["prompt"] for r in rows] == [task.build_prompt(x, TEMPLATE) for x in examples]
    preds = [r["prediction"] for r in rows]
    assert sum(a != b for a, b in zip(preds, expected)) <= 1
    ours = task.corpus_metric(expected, examples)["metric"]
    assert res["tasks"][name][f"exact_match,{IGDS_FILTER}"] == pytest.approx(ours, abs=1.0 / N_TEST + 1e-9)
    if variant == "lora":
        assert res["model_args"]["lora_local_path"] == str(adapter.resolve())
        assert expected != builtin(ModelConfig(str(math_model)), task, examples)  # the adapter matters
    if variant == "merged":
        assert res["model_args"]["pretrained"].endswith("merged") and "lora_local_path" not in res["model_args"]


def test_evaluate_arm_with_lm_eval_vllm(math_model, adapter, tmp_path):
    """`_evaluate_arm` with backend lm_eval on lm-eval's vLLM model (engine sized by igds's memory plan, closed
    before the HF copy that reads the activations loads): same table as backend hf."""
    from igds_ray.config import SAEConfig, to_dict
    from igds_ray.demo.tiny import build_sae
    from igds_ray.stages.evaluate import EvalConfig, _evaluate_arm

    build_sae(64, 32, "blocks.0.hook_resid_post", "standard", seed=3).save_model(tmp_path / "sae")
    arm = to_dict(ModelConfig(str(math_model), adapter=str(adapter)))
    sae = to_dict(SAEConfig(path=str(tmp_path / "sae")))
    exs = [x.to_dict() for x in arithmetic(N_TEST, seed=7)]
    common = dict(max_new_tokens=MAX_NEW, batch_size=8, num_cpus=0.5, template=TEMPLATE)
    t_hf, i_hf = _evaluate_arm("lora", arm, sae, ["l0_p3"], MathTask(), exs, to_dict(EvalConfig(**common)))
    t_lm, i_lm = _evaluate_arm("lora", arm, sae, ["l0_p3"], MathTask(), exs,
                               to_dict(EvalConfig(backend="lm_eval", lm_eval_model="vllm", **common)))
    assert t_lm.column_names == t_hf.column_names
    assert sum(a != b for a, b in zip(t_lm.column("prediction").to_pylist(),
                                      t_hf.column("prediction").to_pylist())) <= 1
    assert t_lm.column("acts").to_pylist() == t_hf.column("acts").to_pylist()
    lm = i_lm["lm_eval"]
    assert lm["model_type"] == "vllm" and lm["model_args"]["lora_local_path"] == str(adapter.resolve())
    assert lm["model_args"]["max_model_len"] < 256  # igds's plan: the longest test prompt + max_new_tokens
    assert lm["metric"] == pytest.approx(i_hf["metrics"]["metric"], abs=1.0 / N_TEST + 1e-9)
