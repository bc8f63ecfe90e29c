"""The run's own test set as a local lm-evaluation-harness task (a JSONL file + a task YAML).

The YAML must not drift from the built-in evaluator (`igds_ray.stages.evaluate`):
- prompts: each JSONL row carries the prompt igds builds (`task.build_prompt(example, template)`) and the
  YAML reads it as a plain field (`doc_to_text: prompt`, no Jinja), zero-shot, no description, so the
  context lm-eval generates from is byte-identical;
- generation: greedy (`do_sample: false`, temperature 0), the same `max_gen_toks` and the task's stop
  sequences as `until` (lm-eval adds EOS itself, as igds's backends stop at EOS);
- answers: a filter named `igds` turns a generation into what the task's `extract` returns: lm-eval has
  already cut the text at the first stop sequence, and cutting then stripping is exactly
  `Task.truncate`, so for math the filter is `extract_math_answer(text.strip())`;
- metrics: lm-eval's own where they exist offline: `exact_match` on the math answer against the gold final
  answer (igds compares with math-verify, so "2.50" vs "2.5" can differ), `bleu`/`chrf` (sacrebleu corpus
  scores, tokenize 13a) for translation; ROUGE has no offline metric in lm-eval (its registry falls back
  to `evaluate.load`, a download), so summarization scores with rouge-score through `process_results`,
  as lm-eval's own CNN/DailyMail task does. Other tasks run predict-only (`bypass`); igds's metric is
  then computed on lm-eval's generations.
Math also gets a pure-lm-eval `regex` filter (no igds code): the number after the last "####", else the
last number, with exact_match ignoring "," "$" and a trailing "."; it agrees with `igds` except on
GSM8K calculator annotations, \\boxed{} answers and some signs/fractions.

Functions referenced from the YAML with `!function` are importable from this module (lm-eval imports
them by dotted path), so the YAML also runs from the command line:
`lm_eval --model hf --model_args pretrained=DIR --include_path DIR --tasks NAME`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from igds_ray.tasks import MathTask, SummarizationTask, Task, TaskExample, TranslationTask, extract_math_answer

LOCAL_PREFIX = "igds_local_"
IGDS_FILTER = "igds"
REGEX_FILTER = "regex"
INVALID = "[invalid]"  # what lm-eval's own filters write for "no answer"
_HERE = __name__  # dotted module path for `!function`

# lm-eval's regex filter takes the first non-empty group of the selected match. Alternative 1 spans up to
# the last "####" (greedy) and captures the number after it; alternative 2 spans up to the last number.
MATH_REGEX = (r"(?s)^.*####\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)"
              r"|(?s:^.*?)(-?\d[\d,]*(?:\.\d+)?)(?=[^\d]*$)")
MATH_IGNORE = [",", "\\$", "\\.$"]


def local_task_name(task: Task) -> str:
    """The lm-eval task name of the run's test set: `igds_local_<task>` (lm-eval names are identifiers)."""
    return LOCAL_PREFIX + re.sub(r"[^A-Za-z0-9_]+", "_", task.name).strip("_").lower()


def headline(task: Task) -> tuple[str, float] | None:
    """(lm-eval result key, scale) of the local task's number comparable to igds's `metric` (in [0, 1])."""
    if isinstance(task, MathTask):
        return f"exact_match,{IGDS_FILTER}", 1.0
    if isinstance(task, TranslationTask):
        return f"chrf,{IGDS_FILTER}", 0.01  # sacrebleu's 0-100 scale; igds's metric is chrF / 100
    if isinstance(task, SummarizationTask):
        return f"rougeL,{IGDS_FILTER}", 1.0
    return None


# ---- functions the YAML names with !function ---------------------------------------------------------
def math_answers(resps: Sequence[Sequence[str]], docs: Sequence[dict]) -> list[list[str]]:
    """Filter: igds's math answer of each generation (already cut at the stop sequences), or [invalid]."""
    return [[extract_math_answer(r.strip()) or INVALID for r in inst] for inst in resps]


def stripped(resps: Sequence[Sequence[str]], docs: Sequence[dict]) -> list[list[str]]:
    """Filter: the generation without surrounding whitespace (igds's `Task.truncate` after the stop cut)."""
    return [[r.strip() for r in inst] for inst in resps]


def rouge_results(doc: dict, results: Sequence[str]) -> dict[str, float]:
    """process_results: ROUGE-1/2/L F1 (stemmed, rouge-score) of one summary; an empty summary scores 0."""
    from igds_ray.tasks.summarization import ROUGE_TYPES, rouge_scorer

    answer = results[0] if results else ""
    if not answer:
        return dict.fromkeys(ROUGE_TYPES, 0.0)
    s = rouge_scorer(bool(doc.get("use_stemmer", True))).score(doc["target"], answer)
    return {k: float(s[k].fmeasure) for k in ROUGE_TYPES}


# ---- the YAML --------------------------------------------------------------------------------------
class _Function(str):
    """A `!function dotted.path` scalar in the written YAML."""


def _dumper() -> type:
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def text(d: Any, v: str) -> Any:  # newlines as "\n" escapes: stop sequences stay readable
        return d.represent_scalar("tag:yaml.org,2002:str", v, style='"' if "\n" in v else None)

    Dumper.add_representer(str, text)
    Dumper.add_representer(_Function, lambda d, v: d.represent_scalar("!function", str(v), style=""))
    return Dumper


def _igds_filter(fn: str) -> dict[str, Any]:
    return {"name": IGDS_FILTER, "filter": [{"function": "custom", "filter_fn": _Function(f"{_HERE}.{fn}")},
                                            {"function": "take_first"}]}


def _scoring(task: Task) -> dict[str, Any]:
    """metric_list / filter_list / process_results of the local task."""
    if isinstance(task, MathTask):
        em = {"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
              "regexes_to_ignore": MATH_IGNORE}
        regex = {"name": REGEX_FILTER, "filter": [
            {"function": "regex", "regex_pattern": MATH_REGEX, "group_select": 0, "fallback": INVALID},
            {"function": "take_first"}]}
        return {"metric_list": [em], "filter_list": [_igds_filter("math_answers"), regex]}
    if isinstance(task, TranslationTask):
        # lm-eval's bleu always tokenizes with 13a (igds: sacrebleu's choice for zh/ja/ko/th targets).
        return {"metric_list": [{"metric": m, "aggregation": m, "higher_is_better": True} for m in ("bleu", "chrf")],
                "filter_list": [_igds_filter("stripped")]}
    if isinstance(task, SummarizationTask):
        return {"process_results": _Function(f"{_HERE}.rouge_results"),
                "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                for m in ("rouge1", "rouge2", "rougeL")],
                "filter_list": [_igds_filter("stripped")]}
    return {"metric_list": [{"metric": "bypass", "aggregation": "bypass", "higher_is_better": True}]}


def _target(task: Task, example: TaskExample) -> str:
    return task.gold_answer(example) if isinstance(task, MathTask) else example.reference


def write_local_task(task: Task, examples: Sequence[TaskExample | dict], template: int, out_dir: str | Path,
                     max_new_tokens: int, stop: Sequence[str] | None = None,
                     repetition_penalty: float = 1.0) -> tuple[str, str]:
    """Write `<out_dir>/<name>.jsonl` (one row per example, in order: id, prompt, reference, target) and
    `<out_dir>/<name>.yaml`; returns (include_dir, task_name) for `TaskManager(include_path=...)`.

    `stop`: default the task's stop sequences. The HF datasets cache of the JSONL goes under out_dir."""
    import yaml

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    exs = [x if isinstance(x, TaskExample) else TaskExample.from_dict(x) for x in examples]
    if not exs:
        raise ValueError(f"task {task.name!r}: no test examples to write")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    name = local_task_name(task)
    data = out / f"{name}.jsonl"
    stem = {"use_stemmer": bool(getattr(task, "use_stemmer", True))} if isinstance(task, SummarizationTask) else {}
    with data.open("w", encoding="utf-8") as f:
        for x in exs:
            row = {"id": x.id, "prompt": task.build_prompt(x, template), "reference": x.reference,
                   "target": _target(task, x), **stem}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    gen: dict[str, Any] = {"until": list(task.stop_sequences if stop is None else stop), "do_sample": False,
                           "temperature": 0.0, "max_gen_toks": int(max_new_tokens)}
    if repetition_penalty != 1.0:
        gen["repetition_penalty"] = float(repetition_penalty)
    cfg: dict[str, Any] = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(out / "hf_datasets_cache")},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "prompt",  # a field name: the text as stored, no template rendering
        "doc_to_target": "target",
        "num_fewshot": 0,
        "generation_kwargs": gen,
        **_scoring(task),
        "metadata": {"version": 1.0, "igds_task": task.name, "template": int(template)},
    }
    (out / f"{name}.yaml").write_text(yaml.dump(cfg, Dumper=_dumper(), sort_keys=False, allow_unicode=True),
                                      encoding="utf-8")
    return str(out), name
