"""Fine-tuning on Ray Train V2: LoRA moves, loss falls, prompts are masked, a killed run resumes from
its checkpoint (and ends where an uninterrupted run ends), budgets are equal across arms, adapters
reload through peft, transformers and the HF backend."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

# The controller polls its workers every 2 s by default: most of a tiny run's wall time.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from igds_ray import schema as S
from igds_ray.config import ModelConfig, from_dict, to_dict
from igds_ray.errors import ConfigError, PoolError, StageOutputError
from igds_ray.stages import finetune as F
from igds_ray.stages.finetune import FinetuneConfig, IGNORE_INDEX
from igds_ray.storage import StageDir

STEPS = 12


def write_selection(path, rows: pd.DataFrame) -> str:
    """A committed selection directory as the select stage writes it."""
    sd = StageDir(str(path))
    staging = sd.begin(overwrite=True)
    table = pa.table({
        S.ID: [f"row-{i}" for i in rows.index], S.SCORE: [1.0] * len(rows), S.RANK: list(range(len(rows))),
        S.SRC_FILE: ["part-000.parquet"] * len(rows), S.SRC_ROW: list(rows.index),
        "prompt": list(rows["prompt"]), "response": list(rows["response"]),
    })
    # Two files, so Ray Data sees more than one block and order has to come from the ids.
    half = len(rows) // 2
    pq.write_table(table.slice(0, half), f"{staging}/part-0.parquet")
    pq.write_table(table.slice(half), f"{staging}/part-1.parquet")
    sd.commit(staging, {"stage": "select", "rows": len(rows)})
    return str(path)


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def ft(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    pool = pd.concat([pd.read_parquet(p) for p in sorted(world.pool_dir.glob("*.parquet"))], ignore_index=True)
    sel = {
        "big": write_selection(root / "selection" / "big.parquet", pool.iloc[:48]),
        "small": write_selection(root / "selection" / "small.parquet", pool.iloc[48:64]),
        "tiny": write_selection(root / "selection" / "tiny.parquet", pool.iloc[64:67]),
    }
    base = dict(model=str(world.model_dir), lr=5e-3, lora_r=8, lora_alpha=16, batch_size=4, budget="steps",
                max_steps=STEPS, checkpoint_every=4, warmup_ratio=0.0, max_failures=0, seed=0)

    def cfg(arm: str, name: str, **kw) -> FinetuneConfig:
        return from_dict(FinetuneConfig, {**base, "data": sel[arm], "out": str(root / "models" / name), "arm": arm,
                                          "run_name": f"ft-{name}", **kw})

    return root, cfg


@pytest.fixture(scope="module")
def main_run(ray_local, world, ft):
    _, cfg = ft
    before = sha(world.model_dir / "model.safetensors")
    c = cfg("big", "big")
    m = F.run(c)
    return c, m, before


# ---------------------------------------------------------------------------------------------
# pure functions, errors (no Ray)


def test_prompt_tokens_are_masked(world):
    tok = F.training_tokenizer(ModelConfig(str(world.model_dir)))
    prompts, responses = ["Tom has 2 apples.", "Hi"], ["2 + 1 = 3", "there are 5 cats"]
    ex = F.tokenize_pairs(tok, prompts, responses, max_tokens=64)
    for e, p, r in zip(ex, prompts, responses):
        p_ids = tok(p)["input_ids"]
        r_ids = tok(r, add_special_tokens=False)["input_ids"]
        assert p_ids[0] == tok.bos_token_id
        assert e.input_ids == p_ids + r_ids + [tok.eos_token_id]
        assert e.labels == [IGNORE_INDEX] * len(p_ids) + r_ids + [tok.eos_token_id]
        assert e.n_targets == len(r_ids) + 1
    # Truncation keeps the start; a prompt that fills the window leaves nothing to learn.
    (cut,) = F.tokenize_pairs(tok, prompts[:1], responses[:1], max_tokens=len(tok(prompts[0])["input_ids"]) + 2)
    assert cut.n_targets == 2 and len(cut.input_ids) == len(cut.labels)
    (none,) = F.tokenize_pairs(tok, prompts[:1], responses[:1], max_tokens=3)
    assert none.n_targets == 0
    # Chat template: the prompt (with its markers) is masked; BOS comes from the template once.
    (chat,) = F.tokenize_pairs(tok, prompts[:1], responses[:1], max_tokens=64, chat_template=True)
    assert chat.input_ids.count(tok.bos_token_id) == 1
    assert tok.decode([t for t, lab in zip(chat.input_ids, chat.labels) if lab != IGNORE_INDEX]) == "2 + 1 = 3</s>"
    batch = F.collate(ex, tok.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    pad = batch["attention_mask"] == 0
    assert pad.any() and (batch["labels"][pad] == IGNORE_INDEX).all()


def test_budget_order_and_sharding():
    cfg = from_dict(FinetuneConfig, dict(model="m", data="d", out="/tmp/o", batch_size=2, grad_accum=2,
                                         num_workers=2, epochs=3))
    p = F.plan_budget(cfg, 21)
    assert (p.steps_per_epoch, p.total_steps, p.rows_per_step) == (2, 6, 8)
    steps = F.plan_budget(dataclasses.replace(cfg, budget="steps", max_steps=5), 21)
    assert steps.total_steps == 5
    order = F.epoch_order(21, 0, 1)
    assert (order == F.epoch_order(21, 0, 1)).all() and not (order == F.epoch_order(21, 0, 2)).all()
    # The two workers' micro-batches of a step are disjoint and together one global batch.
    w0 = F.worker_rows(order, 1, 0, 2, 2, 2)
    w1 = F.worker_rows(order, 1, 1, 2, 2, 2)
    assert [len(m) for m in w0 + w1] == [2, 2, 2, 2]
    assert sorted(sum(w0 + w1, [])) == sorted(order[8:16].tolist())
    with pytest.raises(ConfigError, match="budget=steps needs max_steps"):
        from_dict(FinetuneConfig, dict(model="m", data="d", out="o", budget="steps"))
    with pytest.raises(ConfigError, match="method"):
        from_dict(FinetuneConfig, dict(model="m", data="d", out="o", method="qlora"))
    assert from_dict(FinetuneConfig, to_dict(cfg)) == cfg


def test_too_little_data_and_bad_inputs(world, ft, tmp_path):
    root, cfg = ft
    with pytest.raises(ConfigError, match=r"arm 'tiny'.* has 3 rows, fewer than one optimizer step needs "
                                          r"\(batch_size 4 x grad_accum 1 x num_workers 1 = 4\)"):
        F.run(cfg("tiny", "tiny"))
    assert not (root / "models" / "tiny").exists()
    with pytest.raises(PoolError, match="no column 'answer'"):
        F.run(cfg("big", "nocol", response_column="answer"))
    with pytest.raises(StageOutputError, match="not a finished selection"):
        F.run(dataclasses.replace(cfg("big", "nosel"), data=str(tmp_path / "missing.parquet")))
    with pytest.raises(ConfigError, match="none is a linear layer.*q_proj"):
        F.run(cfg("big", "badtargets", target_modules=["c_attn"]))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(StageOutputError, match="not written by igds"):
        F.run(dataclasses.replace(cfg("big", "foreign"), out=str(foreign)))
    assert (foreign / "notes.txt").read_text() == "mine"
    # Tokenizers without pad (pad = eos, with a warning) and without eos (refused).
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world.model_dir)
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "nopad")
    with pytest.warns(UserWarning, match="no pad token"):
        t = F.training_tokenizer(ModelConfig(str(world.model_dir), tokenizer=str(tmp_path / "nopad")))
    assert t.pad_token_id == t.eos_token_id
    tok.eos_token = None
    tok.save_pretrained(tmp_path / "noeos")
    with pytest.raises(ConfigError, match="has no EOS token"):
        F.run(cfg("big", "noeos", model={"name_or_path": str(world.model_dir), "tokenizer": str(tmp_path / "noeos")}))


# ---------------------------------------------------------------------------------------------
# training runs


def test_lora_moves_loss_falls_base_unchanged(main_run, world):
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    c, m, base_sha = main_run
    out = c.out
    met = json.load(open(os.path.join(out, F.METRICS_FILE)))
    assert met == m["metrics"]
    assert met["steps"] == STEPS and met["epochs"] == 1.0 and met["resumed_from_step"] is None
    assert len(met["losses"]) == STEPS and met["tokens"] > met["target_tokens"] > 0
    assert met["final_loss"] < met["first_loss"] - 0.3
    assert sum(met["losses"][-3:]) < sum(met["losses"][:3])
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", S.SUCCESS):
        assert os.path.isfile(os.path.join(out, name)), name
    trained = load_file(os.path.join(out, "adapter_model.safetensors"))
    init = {k: v.detach() for k, v in get_peft_model_state_dict(F.build_model(c, torch.device("cpu"))).items()}
    assert set(trained) == set(init) and all(".lora_A." in k or ".lora_B." in k for k in trained)
    # 7 projections x 2 layers, each with lora_A and lora_B.
    assert len(trained) == 7 * 2 * 2
    for k, v in trained.items():
        if ".lora_B." in k:
            assert init[k].abs().max() == 0 and v.abs().max() > 0, k
        else:
            assert not torch.equal(v, init[k]), k
    assert sha(world.model_dir / "model.safetensors") == base_sha


def test_init_adapter_starts_from_the_previous_adapter(main_run, ft, tmp_path):
    """A continued round (`init_adapter`): the trainable model starts at the given adapter's weights, not a fresh
    LoRA (whose B is zero), and trains them; a path without adapter_config.json, or method=full, is refused."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    from igds_ray.errors import ConfigError

    c, _, _ = main_run
    _, cfg = ft
    prev = load_file(os.path.join(c.out, "adapter_model.safetensors"))
    c2 = cfg("big", "continued", init_adapter=c.out)
    start = {k: v.detach() for k, v in get_peft_model_state_dict(F.build_model(c2, torch.device("cpu"))).items()}
    assert set(start) == set(prev) and all(torch.equal(start[k], prev[k]) for k in prev)
    m = F.run(c2)
    assert m["config"]["init_adapter"] == os.path.abspath(c.out) and m["metrics"]["steps"] == STEPS
    after = load_file(os.path.join(c2.out, "adapter_model.safetensors"))
    assert any(not torch.equal(after[k], prev[k]) for k in prev)
    # it starts where round N ended: its first loss is round N's last, not a fresh adapter's first
    assert m["metrics"]["first_loss"] < json.load(open(os.path.join(c.out, F.METRICS_FILE)))["first_loss"] - 0.3
    with pytest.raises(ConfigError, match="adapter_config.json"):
        F.run(cfg("big", "bad", init_adapter=str(tmp_path)))
    with pytest.raises(ConfigError, match="init_adapter"):
        cfg("big", "full", init_adapter=c.out, method="full")


def test_adapter_reloads_and_generates(main_run, world):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    c, _, _ = main_run
    tok = AutoTokenizer.from_pretrained(c.out)
    prompt = "Tom has 12 apples and buys 7 more. How many apples?"
    enc = tok([prompt], return_tensors="pt")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(world.model_dir), c.out).eval()
    with torch.no_grad():
        gen = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        unmerged = model(**enc).logits
        base = AutoModelForCausalLM.from_pretrained(world.model_dir).eval()(**enc).logits
        merged = model.merge_and_unload()(**enc).logits
    assert gen.shape[1] > enc["input_ids"].shape[1]
    text = tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert not torch.allclose(unmerged, base, atol=1e-3)  # the adapter does something
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    # transformers alone loads the adapter directory (base from adapter_config's base_model_name_or_path).
    direct = AutoModelForCausalLM.from_pretrained(c.out).eval()
    with torch.no_grad():
        torch.testing.assert_close(direct(**enc).logits, unmerged, atol=1e-5, rtol=1e-5)
    # The HF generation backend with model.adapter gives the same greedy text.
    if "adapter" not in {f.name for f in dataclasses.fields(ModelConfig)}:
        pytest.skip("ModelConfig.adapter is not available")
    from igds_ray.generation.base import SamplingConfig
    from igds_ray.generation.hf import HFBackend

    hf = HFBackend(ModelConfig(str(world.model_dir), adapter=c.out), device="cpu")
    assert hf.generate([prompt], SamplingConfig(max_new_tokens=8)) == [text]


def test_rerun_of_finished_out_skips(main_run):
    c, m, _ = main_run
    ckpts = sorted(os.listdir(os.path.join(c.resolved_storage_path, c.resolved_run_name)))
    assert F.run(c) == m
    assert sorted(os.listdir(os.path.join(c.resolved_storage_path, c.resolved_run_name))) == ckpts
    # Resuming a run under another training config is refused.
    with pytest.raises(ConfigError, match="another training config.*lr"):
        F.run(dataclasses.replace(c, lr=1e-3, out=c.out + "-other"))


def test_killed_run_resumes_from_checkpoint(main_run, ft):
    """The workers die hard after step 6 (last checkpoint: 4); a rerun continues at 4, not 0, and ends
    with exactly the adapter of the uninterrupted run."""
    from ray.train import TrainingFailedError
    from safetensors.torch import load_file

    c_main, _, _ = main_run
    _, cfg = ft
    c = cfg("big", "killed")
    with pytest.raises(TrainingFailedError):
        F.run(c, fail_after_steps=6)
    run_dir = os.path.join(c.resolved_storage_path, c.resolved_run_name)
    assert "checkpoint_00000004" in os.listdir(run_dir) and not StageDir(c.out).done()
    m = F.run(c)["metrics"]
    assert m["resumed_from_step"] == 4 and m["resumes"] == [4]
    assert m["steps"] == STEPS and len(m["losses"]) == STEPS
    main = json.load(open(os.path.join(c_main.out, F.METRICS_FILE)))
    assert m["losses"] == pytest.approx(main["losses"], abs=1e-6)
    a = load_file(os.path.join(c.out, "adapter_model.safetensors"))
    b = load_file(os.path.join(c_main.out, "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


@pytest.fixture(scope="module")
def small_run(ray_local, ft):
    """The 16-row arm, fully fine-tuned; its workers die once after step 6 and FailureConfig(max_failures=1)
    restarts them from the last checkpoint (full weights + optimizer), all inside one `run`."""
    _, cfg = ft
    c = cfg("small", "small", method="full", lr=1e-3, max_failures=1, checkpoint_every=0)  # epoch ends: 4, 8, 12
    return c, F.run(c, fail_after_steps=6)["metrics"]


def test_worker_failure_is_retried_within_one_run(small_run):
    _, m = small_run
    assert m["resumed_from_step"] == 4 and m["resumes"] == [4] and m["steps"] == STEPS
    assert m["final_loss"] < m["first_loss"]


def test_equal_steps_budget_across_arm_sizes(main_run, small_run):
    big, small = main_run[1]["metrics"], small_run[1]
    assert big["rows"] == 48 and small["rows"] == 16
    assert big["steps"] == small["steps"] == STEPS
    assert (big["epochs"], small["epochs"]) == (1.0, 3.0)
    assert big["rows_per_step"] == small["rows_per_step"] == 4


def test_full_finetune_saves_a_model(small_run, world):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    c, m = small_run
    assert m["method"] == "full"
    assert not os.path.exists(os.path.join(c.out, "adapter_config.json"))
    model = AutoModelForCausalLM.from_pretrained(c.out)
    before = load_file(world.model_dir / "model.safetensors")
    after = model.state_dict()
    assert set(after) == set(before)
    assert not torch.equal(after["model.layers.0.self_attn.q_proj.weight"],
                           before["model.layers.0.self_attn.q_proj.weight"])


# ---------------------------------------------------------------------------------------------
# the streaming data path (issue 12, part 4)


@pytest.mark.parametrize("local_max_rows", [10**6, 0], ids=["driver", "ray_data"])
def test_token_shards_hold_exactly_the_examples_in_id_order(ray_local, world, ft, tmp_path, monkeypatch,
                                                           local_max_rows):
    """The shards a worker maps give, row by row, the examples tokenize_pairs makes of the selection
    sorted by id (the in-memory path they replaced): same batches, same training. Several shards (5
    rows each on the driver, 7-row blocks in Ray Data), from a selection written in rank order."""
    from igds_ray.stages import finetune_tokens as T
    from igds_ray.stages.finetune_data import read_selection, tokenize_pairs
    from igds_ray.stages.finetune_train import training_tokenizer

    monkeypatch.setattr(T, "SHARD_ROWS", 5)  # the driver's shards
    monkeypatch.setattr(T, "BLOCK_ROWS", 7)  # Ray Data's tokenised blocks, one shard each
    monkeypatch.setattr(T, "TOKENIZE_ROWS", 3)  # chunks inside a block
    _, cfg = ft
    c = cfg("big", "tok", max_tokens=24)  # short enough that some responses are cut
    sel = read_selection(c)
    tok = training_tokenizer(c.model)
    m = T.build(c, sel, str(tmp_path / "run"), tok, local_max_rows=local_max_rows)
    assert m["rows"] == 48 and m["tokenized_in"] == ("local" if local_max_rows else "ray_data")
    assert len(m["shards"]) >= (10 if local_max_rows else 3)
    rows = pd.read_parquet(sel_path := c.data).sort_values(S.ID)
    want = tokenize_pairs(tok, list(rows["prompt"]), list(rows["response"]), 24)
    shards = T.TokenShards(str(tmp_path / "run" / T.TOKENS_DIR))
    assert shards.n_rows == 48
    order = list(np.random.default_rng(0).permutation(48))
    assert shards.examples(order) == [want[i] for i in order]
    assert any(e.n_targets < len(e.input_ids) - 1 for e in want) and sel_path
    # A committed token directory is reused (a resumed run tokenises nothing).
    again = T.build(c, sel, str(tmp_path / "run"), tok, local_max_rows=local_max_rows)
    assert again["committed_at"] == m["committed_at"]
