"""lm-evaluation-harness as the evaluation backend (`evaluate.backend: lm_eval`), against the built-in evaluator.

A tiny Llama is trained in a few seconds on GSM8K-style arithmetic so that its greedy outputs look like the
real thing (a worked line, "#### N", then a new "Question:" that the stop sequence cuts) and some answers
are right; a LoRA adapter with seeded non-zero weights changes them. lm-eval must see igds's prompts byte
for byte and give the same generations, answers and metric as igds's HF backend (at most one example may
differ: the two batch and pad differently, which can flip a near-tie in float32).
"""

from __future__ import annotations

import json
import random

import pytest
import torch

pytest.importorskip("lm_eval")

from igds_ray.config import ModelConfig, SAEConfig, from_dict, to_dict  # noqa: E402
from igds_ray.errors import ConfigError  # noqa: E402
from igds_ray.stages.evaluate import EvalConfig, _evaluate_arm  # noqa: E402
from igds_ray.stages.evaluate_lmeval import check_task_names, run_lm_eval, task_manager  # noqa: E402
from igds_ray.stages.lmeval_task import IGDS_FILTER, REGEX_FILTER, headline, write_local_task  # noqa: E402
from igds_ray.tasks import MathTask, SummarizationTask, TaskExample, TranslationTask  # noqa: E402

MAX_NEW = 40
N_TEST = 24
TEMPLATE = 1  # "Question: ...\nAnswer:\n": the model's next "\nQuestion:" is a stop sequence


def arithmetic(n: int, seed: int) -> list[TaskExample]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        out.append(TaskExample(id=f"s{seed}-{i}", source=f"Tom has {a} apples and buys {b} more. How many apples?",
                               reference=f"{a} + {b} = {a + b}\n#### {a + b}"))
    return out


def build_trained_math_model(out, steps: int = 300, hidden_size: int = 64, seed: int = 0):
    """A tiny Llama (head_dim 32) trained on math prompts (template TEMPLATE) + answers; saved with its tokenizer."""
    from igds_ray.demo.pretrain import pretrain
    from igds_ray.demo.tiny import build_llama, build_tokenizer, corpus

    task = MathTask()
    docs = [task.build_prompt(x, TEMPLATE) + task.reference_answer(x) + "\n\n" for x in arithmetic(400, seed)]
    tok = build_tokenizer(corpus() + docs)
    model = build_llama(len(tok), hidden_size=hidden_size, num_heads=2, num_kv_heads=1,
                        intermediate_size=2 * hidden_size, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, seed=seed)

    def stream():
        rng = random.Random(seed + 1)
        while True:
            yield "".join(rng.choice(docs) for _ in range(2))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pretrain(model, tok, stream(), steps=steps, batch=16, seq_len=96, progress=False, seed=seed)
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def build_adapter(model_dir, out, scale: float = 0.05):
    """A rank-4 LoRA on attention and MLP projections with seeded non-zero B (peft initialises B to 0)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def math_model(tmp_path_factory):
    return build_trained_math_model(tmp_path_factory.mktemp("lmeval_model"))


@pytest.fixture(scope="module")
def adapter(math_model, tmp_path_factory):
    return build_adapter(math_model, tmp_path_factory.mktemp("lmeval_adapter"))


@pytest.fixture(scope="module")
def examples():
    return arithmetic(N_TEST, seed=7)


def builtin(model: ModelConfig, task, examples, max_new: int = MAX_NEW, stop: bool = True) -> list[str]:
    """igds's built-in generation (HFBackend: the adapter merged at load)."""
    from igds_ray.generation import SamplingConfig
    from igds_ray.generation.hf import HFBackend

    backend = HFBackend(model, None, batch_size=8)
    prompts = [task.build_prompt(x, TEMPLATE) for x in examples]
    return backend.generate(prompts, SamplingConfig(max_new_tokens=max_new, stop=task.stop_sequences if stop else ()))


def lm_eval_local(model: ModelConfig, task, examples, tmp_path, max_new: int = MAX_NEW, **kw) -> dict:
    include, name = write_local_task(task, examples, TEMPLATE, tmp_path / "tasks", max_new)
    res = run_lm_eval(model, [name], include, "hf", batch_size=8, **kw)
    res["name"] = name
    return res


def assert_parity(task, examples, preds_builtin: list[str], res: dict) -> None:
    rows = res["samples"][res["name"]]
    assert [r["id"] for r in rows] == [x.id for x in examples]
    assert [r["prompt"] for r in rows] == [task.build_prompt(x, TEMPLATE) for x in examples]  # byte-identical
    preds = [r["prediction"] for r in rows]
    differ = [i for i, (a, b) in enumerate(zip(preds, preds_builtin)) if a != b]
    assert len(differ) <= 1, [(preds[i], preds_builtin[i]) for i in differ]
    key, scale = headline(task)
    ours = task.corpus_metric(preds_builtin, examples)["metric"]
    theirs = res["tasks"][res["name"]][key] * scale
    assert theirs == pytest.approx(ours, abs=1.0 / len(examples) + 1e-9)
    if not differ:
        assert theirs == pytest.approx(ours, abs=1e-9)


def test_local_task_yaml_is_the_builtin_setup(math_model, examples, tmp_path):
    import yaml

    task = MathTask()
    include, name = write_local_task(task, examples, TEMPLATE, tmp_path, MAX_NEW)
    rows = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [task.build_prompt(x, TEMPLATE) for x in examples]
    assert [r["target"] for r in rows] == [task.gold_answer(x) for x in examples]
    text = (tmp_path / f"{name}.yaml").read_text()
    assert "!function 'igds_ray.stages.lmeval_task.math_answers'" in text
    cfg = yaml.load(text.replace("!function", ""), Loader=yaml.SafeLoader)
    gen = cfg["generation_kwargs"]
    assert gen["until"] == list(task.stop_sequences) and gen["do_sample"] is False and gen["max_gen_toks"] == MAX_NEW
    assert cfg["num_fewshot"] == 0 and cfg["doc_to_text"] == "prompt" and cfg["output_type"] == "generate_until"
    # lm-eval itself loads it: one task, our examples, the prompt exactly as stored
    tm = task_manager(include, defaults=False)
    assert tm.all_tasks == [name]
    loaded = tm.load([name])["tasks"][name]
    docs = list(loaded.test_docs())
    assert [loaded.doc_to_text(d) for d in docs] == [r["prompt"] for r in rows]


@pytest.mark.parametrize("text, same", [
    ("3 + 4 = 7\n#### 7\n", True),
    ("She pays $1,250.50 in total.\n#### $1,250.50", True),
    ("so the answer is -3.", True),
    ("#### 12\nThen 5 more.", True),  # the number after "####" wins over a later one
    ("He had 4 apples, ate 2, so 2 are left", True),
    ("no number here", True),
    ("\\boxed{3/4}", False),  # igds reads the whole fraction; the regex its last number
])
def test_regex_filter_against_igds_extraction(text, same):
    """lm-eval's own regex filter + exact_match normalisation vs igds's extraction, on GSM8K-style outputs."""
    import re

    from lm_eval.filters.extraction import RegexFilter

    from igds_ray.stages.lmeval_task import INVALID, MATH_IGNORE, MATH_REGEX, math_answers

    def norm(x: str) -> str:
        for pattern in MATH_IGNORE:
            x = re.sub(pattern, "", x)
        return x

    regex = RegexFilter(regex_pattern=MATH_REGEX, group_select=0, fallback=INVALID).apply([[text]], [{}])[0][0]
    igds = math_answers([[text]], [{}])[0][0]
    assert igds == (MathTask().extract(text) or INVALID)
    assert (norm(regex) == norm(igds)) is same, (regex, igds)


def test_base_model_parity(math_model, examples, tmp_path):
    task = MathTask()
    preds = builtin(ModelConfig(str(math_model)), task, examples)
    res = lm_eval_local(ModelConfig(str(math_model)), task, examples, tmp_path)
    assert_parity(task, examples, preds, res)
    acc = task.corpus_metric(preds, examples)["metric"]
    assert 0 < acc < 1  # the model is right on some examples: the comparison can fail
    # the stop sequence matters: uncut, the model goes on with a new question; both backends cut there
    uncut = builtin(ModelConfig(str(math_model)), task, examples, stop=False)
    assert sum("\nQuestion:" in p for p in uncut) > N_TEST // 2
    assert not any("Question:" in r["prediction"] for r in res["samples"][res["name"]])
    rows = res["samples"][res["name"]]
    # the igds filter is igds's answer extraction, example by example
    assert [r["filtered"][IGDS_FILTER] for r in rows] == [task.extract(p) or "[invalid]" for p in preds]
    # lm-eval's own regex filter (no igds code) agrees on these GSM8K-style answers
    assert res["tasks"][res["name"]][f"exact_match,{REGEX_FILTER}"] == pytest.approx(acc, abs=1.0 / N_TEST)
    assert res["model_args"]["pretrained"] == str(math_model) and res["adapter"] is None


def test_lora_adapter_parity_peft_and_merged(math_model, adapter, examples, tmp_path):
    task = MathTask()
    arm = ModelConfig(str(math_model), adapter=str(adapter))
    preds = builtin(arm, task, examples)
    assert preds != builtin(ModelConfig(str(math_model)), task, examples)  # the adapter changes the outputs
    peft = lm_eval_local(arm, task, examples, tmp_path / "peft")
    assert peft["model_args"]["peft"] == str(adapter) and peft["adapter_mode"] == "peft"
    assert_parity(task, examples, preds, peft)
    merged = lm_eval_local(arm, task, examples, tmp_path / "merged", adapter_mode="merged")
    assert "(merged)" in merged["model_args"]["pretrained"]
    assert_parity(task, examples, preds, merged)


def test_translation_and_summarization_metrics(math_model, tmp_path):
    """chrF/BLEU (lm-eval's sacrebleu aggregations) and ROUGE (rouge-score) on the same generations."""
    exs = [TaskExample(id=f"t{i}", source=f"Der Hund {i} schläft.", reference=f"The dog {i} sleeps.")
           for i in range(8)]
    m = ModelConfig(str(math_model))
    tr = TranslationTask()
    res = lm_eval_local(m, tr, exs, tmp_path / "tr", max_new=12)
    preds = builtin(m, tr, exs, max_new=12)
    assert_parity(tr, exs, preds, res)
    ours = tr.corpus_metric(preds, exs)
    if [r["prediction"] for r in res["samples"][res["name"]]] == preds:
        assert res["tasks"][res["name"]][f"bleu,{IGDS_FILTER}"] == pytest.approx(ours["bleu"], abs=1e-9)
    su = SummarizationTask()
    docs = [TaskExample(id=f"d{i}", source=f"Tom has {i} apples. He buys {i + 2} more apples at the market.",
                        reference=f"Tom buys {i + 2} apples.") for i in range(8)]
    res = lm_eval_local(m, su, docs, tmp_path / "su", max_new=16)
    assert_parity(su, docs, builtin(m, su, docs, max_new=16), res)


@pytest.fixture(scope="module")
def registry():
    """lm-eval's task registry (indexing its ~15k built-in tasks takes a few seconds: once per module)."""
    return task_manager()


def test_unknown_task_names_the_key(registry):
    with pytest.raises(ConfigError, match=r"evaluate\.lm_eval_tasks: unknown lm-eval task 'gsm8kk'.*gsm8k"):
        check_task_names(["gsm8k", "gsm8kk"], registry)
    with pytest.raises(ConfigError, match=r"evaluate\.lm_eval_tasks: a task is listed twice"):
        from_dict(EvalConfig, {"lm_eval_tasks": ["gsm8k", "gsm8k"]})
    with pytest.raises(ConfigError, match=r"evaluate\.backend: expected one of"):
        from_dict(EvalConfig, {"backend": "lmeval"}, prefix="evaluate.")
    with pytest.raises(ConfigError, match=r"model\.adapter '/nonexistent/adapter': no adapter_config\.json"):
        run_lm_eval(ModelConfig("/nonexistent/model", adapter="/nonexistent/adapter"), ["gsm8k"])
    cfg = from_dict(EvalConfig, {"backend": "lm_eval", "lm_eval_tasks": "gsm8k,wmt16-de-en"})
    assert cfg.lm_eval_tasks == ("gsm8k", "wmt16-de-en") and from_dict(EvalConfig, to_dict(cfg)) == cfg


@pytest.fixture(scope="module")
def sae_dir(math_model, tmp_path_factory):
    from igds_ray.demo.tiny import build_sae

    d = tmp_path_factory.mktemp("lmeval_sae")
    build_sae(64, 32, "blocks.0.hook_resid_post", "standard", seed=3).save_model(d)
    return d


def test_evaluate_arm_through_lm_eval(math_model, adapter, sae_dir, examples):
    """`_evaluate_arm` with backend lm_eval: same parquet columns, predictions and activations as backend hf,
    lm-eval's metric under info["lm_eval"]."""
    task = MathTask()
    arm = to_dict(ModelConfig(str(math_model), adapter=str(adapter)))
    feats = ["l0_p3", "l0_p5"]
    exs = [x.to_dict() for x in examples]
    common = dict(max_new_tokens=MAX_NEW, batch_size=8, num_cpus=0.5, template=TEMPLATE)
    t_hf, i_hf = _evaluate_arm("lora", arm, to_dict(SAEConfig(path=str(sae_dir))), feats, task, exs,
                               to_dict(EvalConfig(**common)))
    t_lm, i_lm = _evaluate_arm("lora", arm, to_dict(SAEConfig(path=str(sae_dir))), feats, task, exs,
                               to_dict(EvalConfig(backend="lm_eval", **common)))
    assert t_lm.column_names == t_hf.column_names
    assert t_lm.column("id").to_pylist() == t_hf.column("id").to_pylist()
    assert t_lm.column("prompt").to_pylist() == t_hf.column("prompt").to_pylist()
    differ = sum(a != b for a, b in zip(t_lm.column("prediction").to_pylist(), t_hf.column("prediction").to_pylist()))
    assert differ <= 1
    assert t_lm.column("acts").to_pylist() == t_hf.column("acts").to_pylist()  # same merged weights, same prompts
    lm = i_lm["lm_eval"]
    assert "lm_eval" not in i_hf
    assert lm["metric_key"] == "exact_match,igds" and lm["local_task"] == "igds_local_math"
    assert lm["metric"] == pytest.approx(i_lm["metrics"]["metric"], abs=1e-9)  # both on lm-eval's generations
    assert lm["metric"] == pytest.approx(i_hf["metrics"]["metric"], abs=1.0 / N_TEST + 1e-9)
    assert lm["adapter_mode"] == "peft" and lm["n"] == {"igds_local_math": N_TEST}
    json.dumps(i_lm)  # metrics.json-ready


def test_configs_name_real_lm_eval_tasks(registry):
    """The real-scale configs' evaluate.lm_eval_tasks exist in the installed lm-eval's registry."""
    from pathlib import Path

    from igds_ray import pipeline
    from igds_ray.config import load_yaml

    named = {}
    for path in sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")):
        cfg = from_dict(pipeline.RunConfig, load_yaml(path))
        check_task_names(cfg.evaluate.lm_eval_tasks, registry)
        named[path.stem] = cfg.evaluate.lm_eval_tasks
    assert named["gemma2_2b_math"] == ("gsm8k",) and named["gemma2_2b_translation"] == ("wmt16-de-en",)
    assert named["gemma2_2b_summarization"] == ("xsum",)


def test_real_tasks_limit_and_failure_do_not_touch_the_test_set(math_model, examples, tmp_path):
    """Tasks outside the local prefix run under `limit`; one that cannot load is recorded, the test set stands."""
    import yaml

    task = MathTask()
    include, name = write_local_task(task, examples, TEMPLATE, tmp_path, MAX_NEW)
    base = yaml.load((tmp_path / f"{name}.yaml").read_text().replace("!function", ""), Loader=yaml.SafeLoader)
    real = {k: v for k, v in base.items() if k not in ("filter_list", "metadata")}
    (tmp_path / "other.yaml").write_text(yaml.safe_dump({**real, "task": "igdstest_other"}))
    missing = {"data_files": {"test": str(tmp_path / "none.jsonl")}}
    broken = {**real, "task": "igdstest_broken", "dataset_kwargs": missing}
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(broken))
    res = run_lm_eval(ModelConfig(str(math_model)), [name, "igdstest_broken", "igdstest_other"], include,
                      batch_size=8, limit=3)
    assert res["n"] == {name: N_TEST, "igdstest_other": 3} and set(res["failed"]) == {"igdstest_broken"}
    assert "exact_match,none" in res["tasks"]["igdstest_other"] and list(res["samples"]) == [name]
    assert res["tasks"][name][f"exact_match,{IGDS_FILTER}"] > 0
