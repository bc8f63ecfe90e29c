"""Scoring reads the positions recall measured: raw pool prompts are rendered through the task
template recall used (`pool.prompt_template`), so the same example gives the same activations in
recall and in the scorer (a tiny real Llama + SAE, real Ray for both stages)."""

from __future__ import annotations

import random

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from igds_ray import schema as S
from igds_ray.config import IdentifyConfig, PoolConfig, ScoreConfig, from_dict, to_dict
from igds_ray.errors import ConfigError
from igds_ray.stages import recall, score
from igds_ray.stages.score import FeatureScorer
from igds_ray.tasks import get_task
from igds_ray.tasks.math import MATH_TEMPLATES
from igds_ray.tokenize import PromptRenderer

TEMPLATE = 1  # "Question: {source}\nAnswer:\n"
ARCH = "jumprelu"


def questions(n: int = 12, seed: int = 5) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        out.append((f"Tom has {a} apples and buys {b} more. How many apples?", f"{a} + {b} = {a + b} #### {a + b}"))
    return out


@pytest.fixture(scope="module")
def setup(world, tmp_path_factory):
    """A math task file and a pool holding the same questions twice: raw (ids raw-i) and already in
    the task template (ids tpl-i), with their worked answers as responses."""
    root = tmp_path_factory.mktemp("positions")
    qa = questions()
    pq.write_table(pa.table({"question": [q for q, _ in qa], "answer": [a for _, a in qa]}), root / "task.parquet")
    pool = root / "pool"
    pool.mkdir()
    pq.write_table(pa.table({"id": [f"raw-{i}" for i in range(len(qa))], "prompt": [q for q, _ in qa],
                             "response": [a for _, a in qa]}), pool / "raw.parquet")
    pq.write_table(pa.table({"id": [f"tpl-{i}" for i in range(len(qa))],
                             "prompt": [MATH_TEMPLATES[TEMPLATE].format(source=q) for q, _ in qa],
                             "response": [a for _, a in qa]}), pool / "templated.parquet")
    # The templated prompts as one text column, for max over every prompt token.
    text_pool = root / "text_pool"
    text_pool.mkdir()
    pq.write_table(pa.table({"id": [f"txt-{i}" for i in range(len(qa))],
                             "text": [MATH_TEMPLATES[TEMPLATE].format(source=q) for q, _ in qa]}),
                   text_pool / "t.parquet")
    return root, pool, text_pool, len(qa)


def recall_stats(world, root, run_dir, positions: str) -> pd.DataFrame:
    cfg = from_dict(IdentifyConfig, dict(
        model=str(world.model_dir), sae=str(world.saes[ARCH]), run_dir=str(run_dir),
        task=dict(name="math", source=str(root / "task.parquet"), split=None),
        recall=dict(limit=None, templates=[TEMPLATE], positions=positions, min_frequency=0.0, top_n=64,
                    batch_size=4),
    ))
    return recall.run(cfg).to_pandas().set_index("index")


def score_cfg(world, pool_path, out, **kw) -> ScoreConfig:
    pool_kw = kw.pop("pool", {})
    return from_dict(ScoreConfig, dict(
        model=str(world.model_dir), sae=str(world.saes[ARCH]), features=[f"l0_p{i}" for i in range(world.d_sae)],
        pool={"path": str(pool_path), **pool_kw}, out=str(out), batch_size=8, **kw))


def per_latent(acts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What recall keeps per latent: units active, and the mean activation when active."""
    active = acts > 0
    count = active.sum(0)
    mean = np.where(count > 0, np.where(active, acts, 0).astype(np.float64).sum(0) / np.maximum(count, 1), 0)
    return count, mean


def assert_same_as_recall(table: pd.DataFrame, acts: np.ndarray, n: int) -> None:
    count, mean = per_latent(acts)
    assert set(table.index) == set(np.nonzero(count)[0])  # the same latents fire
    assert (table["n_units"] == n).all()
    for j, row in table.iterrows():
        assert row["n_active"] == count[j], j
        np.testing.assert_allclose(row["mean_act"], mean[j], rtol=1e-5, atol=1e-6)


def test_last_token_of_a_raw_prompt_is_read_where_recall_read(world, ray_local, setup, tmp_path):
    root, pool, _, n = setup
    table = recall_stats(world, root, tmp_path / "run", "last")
    m = score.run(score_cfg(world, pool, tmp_path / "auto", pooling="last", task="math",
                            pool={"template_index": TEMPLATE}))
    df = pd.read_parquet(tmp_path / "auto").set_index(S.ID)
    assert df[S.ERROR].isna().all()
    raw = np.stack(df.loc[[f"raw-{i}" for i in range(n)], S.ACTS].to_list())
    tpl = np.stack(df.loc[[f"tpl-{i}" for i in range(n)], S.ACTS].to_list())
    assert_same_as_recall(table, raw, n)
    assert_same_as_recall(table, tpl, n)
    # `auto` rendered exactly the raw prompts and left the templated ones alone.
    assert df.loc[[f"raw-{i}" for i in range(n)], S.RENDERED].all()
    assert not df.loc[[f"tpl-{i}" for i in range(n)], S.RENDERED].any()
    assert m["prompts"] == {"prompt_template": "auto", "applied": "auto", "task": "math",
                            "template_index": TEMPLATE, "rendered_rows": n}

    # Scored as stored, the raw prompts are read at another token and the activations differ.
    none = score.run(score_cfg(world, pool, tmp_path / "none", pooling="last", task="math",
                               pool={"prompt_template": "none", "template_index": TEMPLATE}))
    dn = pd.read_parquet(tmp_path / "none").set_index(S.ID)
    raw_none = np.stack(dn.loc[[f"raw-{i}" for i in range(n)], S.ACTS].to_list())
    assert np.abs(raw_none - raw).max() > 1e-2
    np.testing.assert_allclose(np.stack(dn.loc[[f"tpl-{i}" for i in range(n)], S.ACTS].to_list()), tpl, rtol=1e-5,
                               atol=1e-6)
    assert none["prompts"]["rendered_rows"] == 0 and not dn[S.RENDERED].any()


@pytest.mark.slow  # 40 s; the last-token test above gives recall and the scorer one example in CI
def test_every_prompt_token_matches_a_text_column_max(world, ray_local, setup, tmp_path):
    """recall positions=all = max over the prompt's tokens: a text column holding the templated
    prompt, pooled by max, reads the same tokens (text columns are never rendered); so does
    `prompt_max` on prompt + response rows, raw prompts rendered, whatever the response."""
    root, pool, text_pool, n = setup
    table = recall_stats(world, root, tmp_path / "run", "all")
    pm = score.run(score_cfg(world, pool, tmp_path / "pmax", pooling="prompt_max", task="math",
                             pool={"template_index": TEMPLATE}))
    dp = pd.read_parquet(tmp_path / "pmax").set_index(S.ID)
    for prefix in ("raw", "tpl"):
        assert_same_as_recall(table, np.stack(dp.loc[[f"{prefix}-{i}" for i in range(n)], S.ACTS].to_list()), n)
    assert pm["prompts"]["rendered_rows"] == n
    # Only the prompt is run: n_tokens is BOS + the templated prompt, the response's tokens not counted.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world.model_dir)
    qa = questions()
    for i in range(n):
        assert dp.loc[f"tpl-{i}", S.N_TOKENS] == len(tok(MATH_TEMPLATES[TEMPLATE].format(source=qa[i][0])).input_ids)
    with pytest.raises(ConfigError, match="prompt_max reads the prompt"):
        score_cfg(world, text_pool, tmp_path / "x", pooling="prompt_max", pool={"text_column": "text"})
    m = score.run(score_cfg(world, text_pool, tmp_path / "text", pooling="max", task="math",
                            pool={"text_column": "text", "template_index": TEMPLATE}))
    df = pd.read_parquet(tmp_path / "text").set_index(S.ID)
    assert_same_as_recall(table, np.stack(df.loc[[f"txt-{i}" for i in range(n)], S.ACTS].to_list()), n)
    assert m["prompts"]["applied"] == "none" and m["prompts"]["rendered_rows"] == 0
    assert "never rendered" in m["prompts"]["note"]


def test_auto_renders_raw_prompts_and_leaves_templated_ones(world):
    math = get_task("math")
    r = PromptRenderer(math, TEMPLATE, "auto")
    q = "Tom has 3 apples and buys 4 more. How many apples?"
    prompts = [
        q,  # raw
        MATH_TEMPLATES[TEMPLATE].format(source=q),  # in the template used
        MATH_TEMPLATES[TEMPLATE].format(source=q).rstrip(),  # ... without its final newline
        MATH_TEMPLATES[0].format(source=q),  # in another of the task's templates
        f"Answer: {q} Question:",  # the template's words, out of order: raw
    ]
    out, rendered = r.render(prompts)
    assert rendered == [True, False, False, False, True]
    assert out[0] == f"Question: {q}\nAnswer:\n" and out[1:4] == prompts[1:4]
    assert out[4] == f"Question: Answer: {q} Question:\nAnswer:\n"
    # `task` renders every row, whatever it holds.
    out_t, rendered_t = PromptRenderer(math, TEMPLATE, "task").render(prompts[:2])
    assert rendered_t == [True, True] and out_t[1] == f"Question: {prompts[1]}\nAnswer:\n"
    # Translation's other template fields come from the task options.
    tr = PromptRenderer(get_task("translation", src_lang="en", tgt_lang="fr"), 1, "auto")
    assert tr.render(["Hello there.", "English: Hello there.\nFrench:\n"]) == (
        ["English: Hello there.\nFrench:\n", "English: Hello there.\nFrench:\n"], [True, False])


def test_scorer_renders_in_process_and_counts_per_row(world):
    q = "Ann had 9 stones and gave 4 away. How many are left?"
    t = pa.table({S.ID: ["a", "b", "c"], S.SRC_FILE: ["f"] * 3, S.SRC_ROW: pa.array([0, 1, 2], pa.int64()),
                  "prompt": pa.array([q, MATH_TEMPLATES[TEMPLATE].format(source=q), ""], pa.large_string()),
                  "response": pa.array(["9 - 4 = 5 #### 5"] * 3, pa.large_string()),
                  S.INPUT_ERROR: pa.array([None] * 3, pa.string())})
    cfg = score_cfg(world, world.pool_dir, "unused", pooling="last", task="math", pool={"template_index": TEMPLATE})
    out = FeatureScorer(cfg).score_table(t).to_pylist()
    assert [r[S.RENDERED] for r in out] == [True, False, False]  # an empty prompt is an error, never rendered
    np.testing.assert_allclose(out[0][S.ACTS], out[1][S.ACTS], rtol=1e-5, atol=1e-6)
    assert out[0][S.N_TOKENS] == out[1][S.N_TOKENS] and out[2][S.ERROR]
    # Without a task, `auto` scores as stored.
    plain = FeatureScorer(score_cfg(world, world.pool_dir, "unused", pooling="last")).score_table(t).to_pylist()
    assert not any(r[S.RENDERED] for r in plain) and plain[0][S.N_TOKENS] < out[0][S.N_TOKENS]


def test_prompt_template_config():
    assert PoolConfig(path="p").prompt_template == "auto"
    # chat_template is kept as an alias of prompt_template: chat, in both directions.
    a, b = PoolConfig(path="p", chat_template=True), PoolConfig(path="p", prompt_template="chat")
    assert a == b and a.prompt_template == "chat" and b.chat_template
    assert from_dict(PoolConfig, to_dict(a)) == a
    with pytest.raises(ConfigError, match="contradicts pool.prompt_template: task"):
        PoolConfig(path="p", chat_template=True, prompt_template="task")
    with pytest.raises(ConfigError, match="pool.prompt_template: task .* not pool.text_column"):
        PoolConfig(path="p", text_column="t", prompt_template="task")
    assert PoolConfig(path="p", text_column="t").prompt_template == "auto"  # auto: never rendered
    with pytest.raises(ConfigError, match="pool.template_index must be >= 0"):
        PoolConfig(path="p", template_index=-1)
    with pytest.raises(ConfigError, match="prompt_template: expected one of"):
        from_dict(PoolConfig, {"path": "p", "prompt_template": "jinja"})


def test_task_is_needed_and_checked_before_compute(world, tmp_path):
    with pytest.raises(ConfigError, match="^task: pool.prompt_template: task"):
        score_cfg(world, world.pool_dir, tmp_path / "o", pool={"prompt_template": "task"})
    with pytest.raises(ConfigError, match="pool.template_index: 3, but task 'math' has 3 template"):
        score.run(score_cfg(world, world.pool_dir, tmp_path / "o1", task="math", pool={"template_index": 3}))
    with pytest.raises(ConfigError, match="task: unknown task 'nosuch'"):
        score.run(score_cfg(world, world.pool_dir, tmp_path / "o2", task="nosuch"))
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_cli_flags_reach_the_configs():
    from igds_ray import cli
    from igds_ray.config import SelectConfig

    p = cli.build_parser()
    args = p.parse_args(["score", "--model", "/m", "--sae", "/s", "--features", "l0_p1", "--pool", "/p", "--out", "/o",
                         "--task", "math", "--prompt-template", "task", "--template-index", "2"])
    cfg = from_dict(ScoreConfig, cli._merge(args, cli.SCORE_FLAGS))
    assert (cfg.task, cfg.pool.prompt_template, cfg.pool.template_index) == ("math", "task", 2)
    args = p.parse_args(["select", "--scores", "/s", "--out", "/o", "--tie-seed", "7"])
    assert from_dict(SelectConfig, cli._merge(args, cli.SELECT_FLAGS)).tie_seed == 7


def _without_bos(model_dir):
    """The session tokenizer, made to add no BOS (as SmolLM2's and Qwen's do)."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    return tok


def test_a_tokenizer_without_bos_never_pools_the_first_token(world):
    """Position 0 of a BOS-less tokenizer is the model's attention sink: never pooled, whatever the pooling,
    and a row with nothing else to read is a per-row error that says why."""
    from transformers import AutoTokenizer

    from igds_ray.demo.sae_train import residual_activations
    from igds_ray.models.loading import load_model
    from igds_ray.config import ModelConfig
    from igds_ray.tokenize import ExampleBuilder, pools_first_token

    bos, nobos = AutoTokenizer.from_pretrained(world.model_dir), _without_bos(world.model_dir)
    assert pools_first_token(bos) and not pools_first_token(nobos)
    prompt, response = "Tom has 3 apples and buys 4 more.", "3 + 4 = 7"
    with_bos = ExampleBuilder(bos, "prompt_max", 64).build_pairs([prompt], [response])[0]
    plain = ExampleBuilder(nobos, "prompt_max", 64).build_pairs([prompt], [response])[0]
    assert plain.input_ids == with_bos.input_ids[1:]  # the same text, one BOS shorter
    assert with_bos.positions == list(range(1, len(with_bos.input_ids)))  # BOS is special: not pooled
    assert plain.positions == list(range(1, len(plain.input_ids)))  # the sink (position 0) is not pooled
    assert ExampleBuilder(nobos, "last", 64).build_pairs([prompt], [response])[0].positions == [len(plain.input_ids) - 1]
    assert ExampleBuilder(nobos, "max", 64).build_text([prompt])[0].positions == plain.positions
    # Response pooling starts after the prompt either way; an empty prompt leaves position 0 out too.
    resp = ExampleBuilder(nobos, "max", 64).build_pairs(["", prompt], [response, response])
    assert resp[0].positions[0] == 1 and resp[1].positions[0] == len(plain.input_ids)
    # One token and no BOS: nothing but the sink to read, and the error names it.
    one = ExampleBuilder(nobos, "prompt_max", 64).build_pairs(["a"], ["b"])[0]
    assert isinstance(one, str) and "attention sink" in one
    assert ExampleBuilder(bos, "prompt_max", 64).build_pairs(["a"], ["b"])[0].positions == [1]
    assert "empty or whitespace only" in ExampleBuilder(nobos, "prompt_max", 64).build_pairs([""], ["b"])[0]

    # The SAE quality stats read the same positions: one token fewer per text without BOS.
    model = load_model(ModelConfig(name_or_path=str(world.model_dir)))
    texts = [prompt, "Ann has 5 pears.", "x y"]
    n_tokens = [len(nobos(t)["input_ids"]) for t in texts]
    assert residual_activations(model, bos, texts, 0, 64).shape[0] == sum(n_tokens)
    assert residual_activations(model, nobos, texts, 0, 64).shape[0] == sum(n_tokens) - len(texts)
