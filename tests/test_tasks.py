"""Tasks: extraction, metrics against the reference libraries, loaders, templates, registry."""

from __future__ import annotations

import json
import os
import pickle
import sys
import textwrap
import threading

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sacrebleu
from rouge_score import rouge_scorer

from igds_ray.tasks import (
    BUILTIN_TASKS,
    FunctionTask,
    MathTask,
    MissingColumnError,
    SummarizationTask,
    Task,
    TaskDataError,
    TaskExample,
    TranslationTask,
    UnknownTaskError,
    get_task,
    list_tasks,
    load_task_examples,
    load_task_set,
    register_task,
    unregister_task,
)

GSM8K_ANSWER = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in May.\n#### 72"
)


def ex(source: str, reference: str, id: str = "e") -> TaskExample:
    return TaskExample(id=id, source=source, reference=reference)


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ---- math ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        (GSM8K_ANSWER, "72"),
        ("So the answer is\n#### 72.", "72"),
        ("#### 1,000", "1000"),
        ("#### $1,234.50", "1234.50"),
        ("The shop lost money: #### -5", "-5"),
        ("She pays $18 in total.", "18"),
        ("first 3, then 7 apples", "7"),
        ("pages 3-4 are missing", "4"),  # a range, not a negative number
        ("the difference is 10 - 5", "5"),
        ("It costs -$5 now", "-5"),
        ("#### 9 \n#### 12", "12"),  # the last marker wins
        ("#### none\nbut it was 40 in the end", "40"),  # marker without a number: last number
        ("We get \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("so \\boxed{1,000} dollars", "1000"),
        ("I do not know.", None),
        ("", None),
    ],
)
def test_math_extract(text: str, expected: str | None) -> None:
    assert MathTask().extract(text) == expected


def test_math_extract_cuts_at_next_question() -> None:
    # A base model that keeps going after its answer must not be scored on the invented one.
    assert MathTask().extract("#### 72\nQuestion: Tom has 5 apples.\nAnswer: #### 5") == "72"


@pytest.mark.parametrize(
    "gold, prediction, score",
    [
        (GSM8K_ANSWER, "24 + 48 = 72 clips.\n#### 72", 1.0),
        (GSM8K_ANSWER, "#### 72.", 1.0),
        (GSM8K_ANSWER, "#### 73", 0.0),
        ("#### 1000", "The answer is 1,000.", 1.0),
        ("#### 2.5", "#### $2.50", 1.0),
        ("#### -3", "#### -3", 1.0),
        ("#### -3", "#### 3", 0.0),
        ("#### 0.75", "\\boxed{\\frac{3}{4}}", 1.0),
        (GSM8K_ANSWER, "I cannot solve this.", 0.0),
        (GSM8K_ANSWER, None, 0.0),
    ],
)
def test_math_score(gold: str, prediction: str | None, score: float) -> None:
    assert MathTask().score(prediction, ex("q", gold)) == score


def test_math_corpus_metric_counts_unparseable() -> None:
    task = MathTask()
    examples = [ex("q", "#### 72"), ex("q", "#### 5"), ex("q", "#### 1000"), ex("q", "#### 3")]
    preds = ["#### 72", "no idea", "It is 1,000.", None]
    m = task.corpus_metric(preds, examples)
    assert m["metric"] == m["accuracy"] == 0.5
    assert m["n"] == 4 and m["n_unparseable"] == 2 and m["n_correct"] == 2
    with pytest.raises(ValueError, match="3 predictions for 4 examples"):
        task.corpus_metric(preds[:3], examples)


def test_math_verify_works_off_the_main_thread() -> None:
    # math-verify's signal-based timeout raises outside the main thread (Ray Tune runs trials in threads).
    out: list[float] = []
    t = threading.Thread(target=lambda: out.append(MathTask().score("#### 72", ex("q", GSM8K_ANSWER))))
    t.start()
    t.join()
    assert out == [1.0]


def test_math_reference_answer_ends_with_marker() -> None:
    task = MathTask()
    assert task.reference_answer(ex("q", GSM8K_ANSWER)) == GSM8K_ANSWER
    assert task.reference_answer(ex("q", "72")) == "#### 72"
    assert task.reference_answer(ex("q", "So x is \\boxed{5}.")) == "So x is \\boxed{5}.\n#### 5"


# ---- summarization and translation against the reference libraries ------------------------------
REFS = ["The cat sat on the mat all day.", "Stocks fell sharply on Monday after the report."]
PREDS = ["A cat was sitting on the mat.", "On Monday stocks dropped after a report was published."]


def test_rouge_matches_rouge_score() -> None:
    task = SummarizationTask()
    examples = [ex("doc", r, str(i)) for i, r in enumerate(REFS)]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    direct = [scorer.score(r, p) for r, p in zip(REFS, PREDS, strict=True)]
    m = task.corpus_metric(PREDS, examples)
    for key in ("rouge1", "rouge2", "rougeL"):
        assert m[key] == pytest.approx(sum(d[key].fmeasure for d in direct) / 2)
    assert m["metric"] == m["rougeL"] and 0 < m["metric"] < 1
    assert task.score(PREDS[0], examples[0]) == pytest.approx(direct[0]["rougeL"].fmeasure)
    # An empty summary is unparseable: counted, scores 0, halves the mean.
    m2 = task.corpus_metric([PREDS[0], "   "], examples)
    assert m2["n_unparseable"] == 1 and m2["rougeL"] == pytest.approx(direct[0]["rougeL"].fmeasure / 2)


def test_summary_extraction_stops_at_blank_line() -> None:
    assert SummarizationTask().extract("\nLine one.\nLine two.\n\nArticle: next one") == "Line one.\nLine two."


def test_chrf_bleu_match_sacrebleu() -> None:
    task = TranslationTask()
    examples = [ex("src", r, str(i)) for i, r in enumerate(REFS)]
    m = task.corpus_metric(PREDS, examples)
    chrf = sacrebleu.corpus_chrf(PREDS, [REFS]).score
    bleu = sacrebleu.corpus_bleu(PREDS, [REFS]).score
    assert m["chrf"] == pytest.approx(chrf) and m["bleu"] == pytest.approx(bleu)
    assert m["metric"] == pytest.approx(chrf / 100) and 0 < m["metric"] < 1
    assert task.score(PREDS[1], examples[1]) == pytest.approx(sacrebleu.sentence_chrf(PREDS[1], [REFS[1]]).score / 100)
    # Only the first line is the translation; an empty output is counted and scored as "".
    m2 = task.corpus_metric([PREDS[0] + "\nGerman: noch ein Satz", ""], examples)
    assert m2["n_unparseable"] == 1
    assert m2["chrf"] == pytest.approx(sacrebleu.corpus_chrf([PREDS[0], ""], [REFS]).score)


def test_translation_bleu_tokenizer_for_chinese() -> None:
    assert TranslationTask(src_lang="en", tgt_lang="zh").tokenize == "zh"
    assert TranslationTask().tokenize == "13a"


# ---- templates ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(BUILTIN_TASKS))
def test_all_templates_format(name: str) -> None:
    task = get_task(name)
    assert task.num_templates >= 3
    source = "Some {braced} source text 42"  # braces in data must not be read as fields
    for i in range(task.num_templates):
        prompt = task.build_prompt(ex(source, "ref"), i)
        assert source in prompt and prompt.endswith("\n")
    with pytest.raises(IndexError, match="template"):
        task.build_prompt(ex(source, "ref"), task.num_templates)


def test_translation_templates_name_languages() -> None:
    prompt = get_task("translation", src_lang="en", tgt_lang="fr").build_prompt(ex("Hello.", "Bonjour."))
    assert "English" in prompt and "French" in prompt and "{" not in prompt


def test_custom_templates_are_checked() -> None:
    task = get_task("math", templates=["Q: {source}\nA:\n"])
    assert task.templates == ("Q: {source}\nA:\n",) and task.build_prompt(ex("1+1?", "#### 2")) == "Q: 1+1?\nA:\n"
    with pytest.raises(ValueError, match="unknown field"):
        MathTask(templates=("{source} in {tgt_lang}",))
    with pytest.raises(ValueError, match="no {source}"):
        SummarizationTask(templates=("Summarize:\n",))


def test_tasks_pickle() -> None:
    for name in BUILTIN_TASKS:
        task = get_task(name)
        assert pickle.loads(pickle.dumps(task)) == task


# ---- loaders ------------------------------------------------------------------------------------
def test_parquet_with_column_mapping_and_id(tmp_path) -> None:
    table = pa.table(
        {
            "uid": ["a", "b", "c", "d"],
            "q": ["1+1?", None, "2+2?", "3+3?"],
            "sol": ["#### 2", "#### 9", "   ", "#### 6"],
        }
    )
    pq.write_table(table, tmp_path / "m.parquet")
    ts = load_task_set("math", str(tmp_path / "m.parquet"), columns={"source": "q", "reference": "sol", "id": "uid"})
    assert [e.id for e in ts.examples] == ["a", "d"]
    assert ts.examples[1].source == "3+3?" and ts.examples[1].reference == "#### 6"
    assert ts.stats.n_rows == 4 and ts.stats.n_usable == 2
    assert ts.stats.skipped == {"null or empty source": 1, "null or empty reference": 1}


def test_jsonl_default_columns_and_row_ids(tmp_path) -> None:
    rows = [
        {"question": "q0", "answer": GSM8K_ANSWER},
        {"question": "q1", "answer": "no final number here"},
        {"question": "q2", "answer": 7},  # numbers become text
    ]
    ts = load_task_set(MathTask(), write_jsonl(tmp_path / "gsm.jsonl", rows), split="test")
    assert [e.id for e in ts.examples] == ["test-0", "test-2"]
    assert ts.examples[1].reference == "7" and ts.stats.skipped == {"reference has no final answer": 1}
    assert ts.examples[0].meta == {"split": "test", "row": 0}


def test_json_array_and_xsum_columns(tmp_path) -> None:
    (tmp_path / "x.json").write_text(json.dumps([{"document": "Long text.", "summary": "Short."}]))
    [e] = load_task_examples("summarization", str(tmp_path / "x.json"))
    assert (e.id, e.source, e.reference) == ("row-0", "Long text.", "Short.")


def test_translation_dict_column(tmp_path) -> None:
    pairs = [{"de": "Hallo Welt.", "en": "Hello world."}, {"de": "Nur Deutsch.", "fr": "x"}, None]
    pq.write_table(pa.table({"translation": pairs}), tmp_path / "wmt.parquet")
    ts = load_task_set("translation", str(tmp_path / "wmt.parquet"), split="validation")
    [e] = ts.examples
    assert (e.source, e.reference, e.id) == ("Hallo Welt.", "Hello world.", "validation-0")
    assert e.meta["src_lang"] == "de" and e.meta["tgt_lang"] == "en"
    # Parquet structs fill absent keys with null; JSON keeps them absent.
    assert ts.stats.skipped == {"null or empty reference": 1, "null 'translation'": 1}
    js = load_task_set("translation", write_jsonl(tmp_path / "wmt.jsonl", [{"translation": p} for p in pairs]))
    assert js.stats.skipped == {"'translation' has no 'en' key": 1, "null 'translation'": 1}
    # The reverse direction reads the same column.
    [r] = load_task_examples(get_task("translation", src_lang="en", tgt_lang="de"), str(tmp_path / "wmt.parquet"))
    assert (r.source, r.reference) == ("Hello world.", "Hallo Welt.")


def test_translation_flat_columns(tmp_path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"de": "Ja.", "en": "Yes."}, {"src": "Nein.", "tgt": "No."}])
    [e] = load_task_examples("translation", path)  # columns named by language code
    assert (e.source, e.reference) == ("Ja.", "Yes.")
    [f] = load_task_examples("translation", path, columns={"source": "src", "reference": "tgt"})
    assert (f.source, f.reference, f.id) == ("Nein.", "No.", "row-1")


def test_missing_column_names_it(tmp_path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "t", "label": "l"}])
    with pytest.raises(MissingColumnError, match=r"'question', 'problem'.*columns present: \['text', 'label'\]"):
        load_task_examples("math", path)
    with pytest.raises(MissingColumnError, match="'body'"):
        load_task_examples("summarization", path, columns={"source": "body", "reference": "label"})
    with pytest.raises(MissingColumnError, match="translation"):
        load_task_examples("translation", path)
    with pytest.raises(TaskDataError, match="unknown column role"):
        load_task_examples("math", path, columns={"question": "text"})


def test_no_usable_examples(tmp_path) -> None:
    path = write_jsonl(
        tmp_path / "empty.jsonl", [{"article": "", "highlights": "h"}, {"article": "a", "highlights": None}]
    )
    with pytest.raises(TaskDataError, match=r"no usable examples in .*empty\.jsonl.*article.*highlights"):
        load_task_examples("summarization", path)
    (tmp_path / "none.jsonl").write_text("")
    with pytest.raises(TaskDataError, match="no usable examples in .*none.jsonl: it has no rows"):
        load_task_examples("summarization", str(tmp_path / "none.jsonl"))
    pq.write_table(
        pa.table({"article": pa.array([], pa.string()), "highlights": pa.array([], pa.string())}),
        tmp_path / "e.parquet",
    )
    with pytest.raises(TaskDataError, match="no usable examples.*0 rows read"):
        load_task_examples("summarization", str(tmp_path / "e.parquet"))


def test_bad_paths(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_task_examples("math", str(tmp_path / "nope.parquet"))
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(TaskDataError, match="expected a .parquet"):
        load_task_examples("math", str(tmp_path / "d.csv"))
    (tmp_path / "bad.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n{oops\n')
    with pytest.raises(TaskDataError, match="line 2"):
        load_task_examples("math", str(tmp_path / "bad.jsonl"))


def test_parquet_directory_with_splits_and_limit(tmp_path) -> None:
    d = tmp_path / "gsm8k"
    d.mkdir()
    for split, n in (("train", 30), ("test", 5)):
        qs = [f"{split} q{i}" for i in range(n)]
        pq.write_table(
            pa.table({"question": qs, "answer": [f"#### {i}" for i in range(n)]}), d / f"{split}-00000-of-00001.parquet"
        )
    test = load_task_examples("math", str(d), split="test")
    assert [e.id for e in test] == [f"test-{i}" for i in range(5)] and test[0].source == "test q0"
    with pytest.raises(TaskDataError, match="splits found"):
        load_task_examples("math", str(d), split="validation")
    a = load_task_examples("math", str(d), split="train", limit=10, seed=1)
    b = load_task_examples("math", str(d), split="train", limit=10, seed=1)
    c = load_task_examples("math", str(d), split="train", limit=10, seed=2)
    assert a == b and a != c and len(a) == 10
    assert [int(e.id.split("-")[1]) for e in a] == sorted(int(e.id.split("-")[1]) for e in a)
    assert [e.id for e in load_task_examples("math", str(d), split="train", limit=3, seed=None)] == [
        "train-0",
        "train-1",
        "train-2",
    ]


def test_duplicate_ids_rejected(tmp_path) -> None:
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"id": 1, "question": "a", "answer": "1"}, {"id": 1, "question": "b", "answer": "2"}]
    )
    with pytest.raises(TaskDataError, match="id '1'.*unique"):
        load_task_examples("math", path, columns={"id": "id"})


def test_hf_source_uses_load_dataset(monkeypatch) -> None:
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"question": ["1+2?"], "answer": ["#### 3"], "extra": [0]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    [e] = load_task_examples("math", "hf://openai/gsm8k:main", split="test")
    assert calls == [("openai/gsm8k", "main", "test")] and e.id == "test-0" and e.reference == "#### 3"

    def failing(*a, **k):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", failing)
    with pytest.raises(TaskDataError, match="could not load Hugging Face dataset 'xsum'"):
        load_task_examples("summarization", "hf://xsum")


# ---- registry -----------------------------------------------------------------------------------
def test_builtins_listed() -> None:
    assert {"math", "summarization", "translation"} <= set(list_tasks())
    t = get_task("translation", src_lang="fr", tgt_lang="en")
    assert isinstance(t, TranslationTask) and t.src_lang == "fr"
    with pytest.raises(UnknownTaskError, match="registered"):
        get_task("no-such-task")
    with pytest.raises(TypeError, match="unknown option"):
        get_task("math", src_lang="de")


def _keyword_score(answer: str, example: TaskExample) -> float:
    return float(example.reference.lower() in answer.lower())


def test_register_functional_task(tmp_path) -> None:
    task = FunctionTask(
        "sentiment",
        lambda e, i: ["Review: {}\nSentiment:\n", "{}\nIs this positive or negative?\n"][i].format(e.source),
        _keyword_score,
        extract_fn=lambda text: text.split()[0],
        num_prompts=2,
    )
    register_task("sentiment", task)
    try:
        got = get_task("sentiment")
        assert got is task and got.num_templates == 2
        e = ex("Great film!", "positive")
        assert got.build_prompt(e, 1) == "Great film!\nIs this positive or negative?\n"
        assert got.score("Positive, clearly", e) == 1.0 and got.score("negative", e) == 0.0
        m = got.corpus_metric(["positive!", "   ", "negative"], [e, e, e])
        assert m["metric"] == pytest.approx(1 / 3) and m["n_unparseable"] == 1 and m["n"] == 3
        register_task("sentiment", task)  # the same object again is a no-op (module reloads)
        with pytest.raises(ValueError, match="already registered"):
            register_task("sentiment", task.replace(num_prompts=1))
        # Loading works for custom tasks too, with its own column names mapped.
        path = write_jsonl(tmp_path / "s.jsonl", [{"text": "Bad.", "label": "negative"}])
        [row] = load_task_examples("sentiment", path, columns={"source": "text", "reference": "label"})
        assert got.build_prompt(row) == "Review: Bad.\nSentiment:\n"
    finally:
        unregister_task("sentiment")
    assert "sentiment" not in list_tasks()


def test_register_decorator_factory_and_subclass() -> None:
    @register_task("echo")
    def make_echo(prefix: str = "Say:") -> Task:
        return FunctionTask("echo", lambda e: f"{prefix} {e.source}\n", lambda a, e: float(a == e.reference))

    try:
        t = get_task("echo", prefix="Repeat:")
        assert t.build_prompt(ex("hi", "hi")) == "Repeat: hi\n" and t.score(" hi ", ex("hi", "hi")) == 1.0
    finally:
        unregister_task("echo")


def test_dotted_path_task(tmp_path, monkeypatch) -> None:
    (tmp_path / "my_tasks_mod.py").write_text(
        textwrap.dedent(
            """
            from dataclasses import dataclass
            from igds_ray.tasks import Task

            @dataclass(frozen=True, kw_only=True)
            class UpperTask(Task):
                name: str = "upper"
                templates: tuple = ("Upper-case: {source}\\n", "{source} in capitals:\\n")

                def reference_answer(self, example):
                    return example.source.upper()

                def score_answer(self, answer, example):
                    return float(answer == example.source.upper())

            def make(**options):
                return UpperTask(**options)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        t = get_task("my_tasks_mod:make")
        assert t.name == "upper" and t.num_templates == 2
        e = ex("abc", "ABC")
        assert t.reference_answer(e) == "ABC" and t.score("ABC", e) == 1.0 and t.score("", e) == 0.0
        assert get_task("my_tasks_mod:UpperTask", name="up2").name == "up2"
        with pytest.raises(UnknownTaskError, match="no attribute"):
            get_task("my_tasks_mod:missing")
        with pytest.raises(UnknownTaskError, match="cannot import"):
            get_task("no_such_module_xyz:make")
    finally:
        sys.modules.pop("my_tasks_mod", None)


def test_function_task_bad_scores_are_errors() -> None:
    t = FunctionTask("bad", None, lambda a, e: 2.0)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        t.score("x", ex("s", "r"))
    assert t.score("", ex("s", "r")) == 0.0  # unparseable never reaches score_fn
