"""Stage configs: frozen dataclasses, YAML in, CLI overrides, validation that names the key at fault.

No value is ever evaluated as code: YAML is read with `safe_load` and every value is checked against
the field's declared type.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, TypeVar, Union

import yaml

from igds_ray.errors import ConfigError
from igds_ray.schema import DEFAULT_PROMPT, DEFAULT_RESPONSE, FeatureId, parse_features

T = TypeVar("T")


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str = _help("hub id (e.g. google/gemma-2-2b) or local directory")
    tokenizer: str | None = _help("tokenizer hub id or directory; default: same as the model", default=None)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _help(
        "weights dtype; auto = bfloat16 on CUDA, float32 on CPU", default="auto"
    )
    device: str = _help("auto, cpu, cuda or cuda:N", default="auto")
    trust_remote_code: bool = _help("run model code shipped with the checkpoint (off unless asked)", default=False)
    revision: str | None = _help("hub revision (branch, tag or commit)", default=None)
    attn_implementation: str | None = _help("sdpa, eager, flash_attention_2; default: transformers' choice", default=None)
    allow_pickle: bool = _help("allow pickle-based (.bin) weights; default: safetensors only", default=False)
    adapter: str | None = _help("PEFT (LoRA) adapter directory applied on top of the model, merged at load",
                                default=None)


@dataclass(frozen=True)
class SAEConfig:
    path: str | None = _help("local directory written by sae-lens `save_model`", default=None)
    release: str | None = _help("sae-lens release, e.g. gemma-scope-2b-pt-res-canonical", default=None)
    sae_id: str | None = _help("SAE id inside the release, e.g. layer_12/width_16k/canonical", default=None)
    dtype: Literal["float32", "bfloat16", "float16"] = _help("dtype the SAE encodes in", default="float32")
    device: str = _help("auto = the model's device", default="auto")

    def __post_init__(self) -> None:
        has_path = self.path is not None
        has_release = self.release is not None or self.sae_id is not None
        if has_path == has_release:
            raise ConfigError("sae: give either sae.path, or both sae.release and sae.sae_id")
        if has_release and not (self.release and self.sae_id):
            raise ConfigError("sae: sae.release and sae.sae_id go together")

    def describe(self) -> str:
        return self.path if self.path is not None else f"{self.release}/{self.sae_id}"


@dataclass(frozen=True)
class PoolConfig:
    path: str = _help("Parquet file or directory: local path, s3:// or gs://")
    text_column: str | None = _help("score one text column (instead of prompt + response)", default=None)
    prompt_column: str = _help("prompt column", default=DEFAULT_PROMPT)
    response_column: str = _help("response column", default=DEFAULT_RESPONSE)
    id_column: str = _help("id column; a pool without it gets stable ids `<file>:<row>`", default="id")
    prompt_template: Literal["auto", "none", "task", "chat"] = _help(
        "how scoring writes each prompt before the model reads it. task: through the task's template "
        "`template_index` (the stored prompt fills {source}), the form recall and causal filtering read; "
        "auto: the same, only for rows not already in one of the task's templates (as none when scoring has "
        "no task); chat: the tokenizer's chat template; none: as stored. Only scoring renders task templates: "
        "fine-tuning trains on the rows as stored (chat excepted, which fine-tuning applies too). "
        "A text-column pool is never rendered",
        default="auto",
    )
    template_index: int = _help("task template for prompt_template task/auto (the pipeline passes causal.template)",
                                default=0)
    chat_template: bool = _help("same as prompt_template: chat (older configs)", default=False)
    rows_per_read_task: int | None = _help(
        "rows per read task (row groups are never split); None: about 64 MiB of the read columns per task, from the "
        "Parquet footers, between 8192 and 131072", default=None)

    @property
    def text_columns(self) -> tuple[str, ...]:
        return (self.text_column,) if self.text_column else (self.prompt_column, self.response_column)

    def __post_init__(self) -> None:
        # `chat_template` and `prompt_template` are kept in step so that readers of either (fine-tuning
        # reads chat_template) agree, and a config round-trips through to_dict/from_dict unchanged.
        if self.chat_template:
            if self.prompt_template not in ("auto", "chat"):
                raise ConfigError(f"pool.chat_template: true contradicts pool.prompt_template: {self.prompt_template}")
            object.__setattr__(self, "prompt_template", "chat")
        elif self.prompt_template == "chat":
            object.__setattr__(self, "chat_template", True)
        if self.text_column and self.prompt_template in ("task", "chat"):
            raise ConfigError(f"pool.prompt_template: {self.prompt_template} (pool.chat_template) needs prompt + "
                              "response columns, not pool.text_column (a text column is never rendered)")
        if self.template_index < 0:
            raise ConfigError(f"pool.template_index must be >= 0, got {self.template_index}")
        if not self.text_column and self.prompt_column == self.response_column:
            raise ConfigError("pool.prompt_column and pool.response_column must differ")
        if self.rows_per_read_task is not None and self.rows_per_read_task < 1:
            raise ConfigError("pool.rows_per_read_task must be >= 1")


@dataclass(frozen=True)
class ScoreConfig:
    model: ModelConfig = _help("the base model")
    sae: SAEConfig = _help("the SAE at the layer the features live on")
    features: tuple[str, ...] = _help("chosen features, e.g. [l12_p3041, l12_p77]; `acts` keeps this order")
    pool: PoolConfig = _help("the data pool")
    out: str = _help("output directory (local, s3://, gs://)")
    pooling: Literal["last", "max", "mean", "prompt_max", "prompt_mean"] = _help(
        "last = last prompt token (text: last token); max/mean over response tokens (text: all tokens); "
        "prompt_max/prompt_mean over every prompt token, what recall.positions=all reads (text pools: refused)",
        default="last",
    )
    max_tokens: int = _help("truncate each example to this many tokens (recorded in `truncated`)", default=1024)
    token_budget: int = _help("padded tokens per forward micro-batch", default=16384)
    batch_size: int = _help("rows per Ray Data batch handed to a scorer actor", default=512)
    min_actors: int = _help("scorer actor pool: minimum size (autoscaling)", default=1)
    max_actors: int = _help("scorer actor pool: maximum size", default=1)
    num_gpus: float = _help("GPUs per scorer actor (fractions allowed)", default=0.0)
    num_cpus: float = _help("CPUs per scorer actor", default=1.0)
    tokenize_in: Literal["auto", "stage", "actor"] = _help(
        "where rows are checked and tokenised: a CPU stage before the scorer actors (stage), inside them "
        "(actor), or auto: the stage when the actors have GPUs (measured on 2 CPUs with CPU actors, the "
        "stage was 20-38% slower)", default="auto")
    overwrite: bool = _help("recompute even if the output directory holds a finished result", default=False)
    incremental: bool = _help("a finished output whose pool has grown or changed gets a new version: only new and "
                              "changed files' rows are scored, earlier parts are reused (stages/increment.py)",
                              default=False)
    task: str | None = _help(
        "task whose template pool prompts are rendered in (pool.prompt_template task/auto): math, summarization, "
        "translation, a registered name or package.module:factory; none: prompts are scored as stored",
        default=None,
    )
    task_options: dict[str, Any] = _help("task options, e.g. {src_lang: de, tgt_lang: en} (the template's other "
                                         "fields)", default_factory=dict)

    def __post_init__(self) -> None:
        if self.pool.prompt_template == "task" and not self.task:
            raise ConfigError("task: pool.prompt_template: task renders prompts through a task's template; "
                              "give task (e.g. math) or set pool.prompt_template to auto or none")
        feats = parse_features(self.features)
        object.__setattr__(self, "features", tuple(str(f) for f in feats))
        for key in ("max_tokens", "token_budget", "batch_size", "min_actors", "max_actors"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.max_actors < self.min_actors:
            raise ConfigError(f"max_actors ({self.max_actors}) < min_actors ({self.min_actors})")
        if self.num_gpus < 0 or self.num_cpus < 0:
            raise ConfigError("num_gpus and num_cpus must be >= 0")
        if self.token_budget < self.max_tokens:
            raise ConfigError(f"token_budget ({self.token_budget}) must be >= max_tokens ({self.max_tokens})")
        if self.pooling.startswith("prompt_") and self.pool.text_column:
            raise ConfigError(f"pooling: {self.pooling} reads the prompt of prompt + response rows; a text-column pool "
                              "(pool.text_column) has no prompt: use max or mean")

    @property
    def feature_ids(self) -> tuple[FeatureId, ...]:
        return parse_features(self.features)


@dataclass(frozen=True)
class SelectConfig:
    scores: str = _help("a finished scores directory")
    out: str = _help("selection directory: <out>/<arm>.parquet (ids) and <out>/<arm>_rows/ (pool rows)")
    fraction: float | None = _help("keep this fraction of the scored rows (top by score)", default=0.5)
    n: int | None = _help("keep exactly this many rows (overrides fraction)", default=None)
    arm: str = _help("name of this selection (igds, random, loss, ...)", default="igds")
    score_column: str = _help("column of the scores directory to rank by (e.g. loss, ifd)", default="score")
    max_score: float | None = _help("exclude rows scoring above this (IFD > 1 is dropped, as Cherry-LLM does)",
                                    default=None)
    write_rows: bool = _help("also write the chosen pool rows, ready for training", default=True)
    overwrite: bool = _help("recompute even if finished", default=False)
    tie_seed: int = _help("rows with equal scores are ordered by a hash of (tie_seed, id), not by id or file order "
                          "(the pipeline passes its seed)", default=0)
    local_max_rows: int = _help(
        "a scores directory of at most this many rows is ranked in this process with pyarrow (same order, same "
        "output; the id and score columns are held in memory: ~50 B a row), a larger one by a distributed Ray "
        "Data sort (0: always Ray Data)", default=200_000)

    def __post_init__(self) -> None:
        if self.n is not None:
            if self.n < 0:
                raise ConfigError(f"n must be >= 0, got {self.n}")
        elif self.fraction is None:
            raise ConfigError("give fraction or n")
        elif not (0.0 < self.fraction <= 1.0):
            raise ConfigError(f"fraction must be in (0, 1], got {self.fraction}")
        if not self.arm or "/" in self.arm:
            raise ConfigError(f"arm must be a plain name, got {self.arm!r}")
        if self.local_max_rows < 0:
            raise ConfigError(f"local_max_rows must be >= 0, got {self.local_max_rows}")


@dataclass(frozen=True)
class TaskConfig:
    source: str = _help("examples for recall: hf://name[:config], a Parquet/JSONL path or directory")
    name: str = _help("task: math, summarization, translation, a registered name, or package.module:factory",
                      default="math")
    split: str | None = _help("split of `source` used for recall", default="train")
    dev_source: str | None = _help("dev set for causal filtering; default: `source`", default=None)
    dev_split: str | None = _help("split of the dev set", default="validation")
    columns: dict[str, str] = _help("column mapping: source, reference, id (and translation)", default_factory=dict)
    options: dict[str, Any] = _help("task options, e.g. {src_lang: de, tgt_lang: en}", default_factory=dict)


@dataclass(frozen=True)
class RecallConfig:
    limit: int | None = _help("task examples used (seeded sample); None = all", default=500)
    templates: tuple[int, ...] = _help("prompt template indices; each example x template is one unit", default=(0, 1, 2))
    positions: Literal["last", "all"] = _help(
        "token positions read: the prompt's last token, or every prompt token (max over them)", default="last"
    )
    min_frequency: float = _help("keep latents active on more than this fraction of units [paper prior code: 0.6]",
                                 default=0.6)
    min_act: float = _help("... and whose mean activation when active exceeds this (SAE-dependent: ~10 Gemma Scope)",
                           default=0.0)
    top_n: int = _help("candidates kept, ranked by mean activation", default=50)
    max_tokens: int = _help("prompt tokens kept (the end is kept)", default=512)
    token_budget: int = _help("padded tokens per forward micro-batch", default=16384)
    batch_size: int = _help("units per Ray Data batch", default=256)
    actors: int = _help("recall actors", default=1)
    num_gpus: float = _help("GPUs per recall actor", default=0.0)
    num_cpus: float = _help("CPUs per recall actor", default=1.0)

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_frequency < 1.0:
            raise ConfigError(f"recall.min_frequency must be in [0, 1), got {self.min_frequency}")
        if self.top_n < 1 or self.actors < 1 or self.batch_size < 1:
            raise ConfigError("recall.top_n, recall.actors and recall.batch_size must be >= 1")
        if not self.templates:
            raise ConfigError("recall.templates: at least one template index")


@dataclass(frozen=True)
class CausalConfig:
    factors: tuple[float, ...] = _help("intervention factors tried per candidate (0 ablates, >1 amplifies)",
                                       default=(0.0, 2.0, 4.0, 8.0))
    k: int = _help("features kept (paper default 1)", default=1)
    dev_limit: int = _help("dev examples per trial (seeded sample)", default=200)
    min_dev: int = _help("refuse to run with fewer usable dev examples than this", default=20)
    template: int = _help("prompt template index used for generation", default=0)
    backend: Literal["hf", "vllm"] = _help("generation backend", default="hf")
    max_new_tokens: int = _help("generation length", default=128)
    repetition_penalty: float = _help("generation repetition penalty [prior code: 1.1]", default=1.0)
    gen_actors: int = _help("long-lived generation actors (one model copy each)", default=1)
    gen_num_cpus: float = _help("CPUs per generation actor", default=1.0)
    gen_num_gpus: float = _help("GPUs per generation actor (fractions allowed)", default=0.0)
    gen_batch_size: int = _help("prompts per generate call", default=32)
    trial_num_cpus: float = _help("CPUs reserved by each Tune trial (the work runs in the actors)", default=0.1)
    loglik: bool = _help("also measure the teacher-forced log-likelihood of the references (cheap pre-screen)",
                         default=True)
    fallback: Literal["none", "top_recall"] = _help(
        "if no feature passes the causal test: stop with an error (none) or keep the top recalled feature",
        default="none",
    )
    mode: Literal["scale", "clamp"] = _help(
        "scale: multiply the latent by each factor (the paper's amplification); clamp: set it to factor x its "
        "p99 activation on the dev prompts at every position (0 ablates)", default="scale")
    rank_by: Literal["metric", "loglik"] = _help(
        "measure tested (Holm) and ranked on: the generation metric, or the teacher-forced log-likelihood of the "
        "references (needs causal.loglik); the metric always confirms [inferred]", default="metric")
    alpha: float = _help("one-sided significance level, after Holm's correction over all trials", default=0.05)
    n_boot: int = _help("bootstrap resamples for the CIs (also the sign-flip permutations)", default=2000)
    stats_seed: int | None = _help("seed of the search/confirm split, bootstrap and permutations; default: the "
                                   "run seed", default=None)
    confirm_fraction: float = _help("share of the dev examples held out to recheck the top latents (0: no "
                                    "recheck)", default=0.3)
    confirm_top: int = _help("latents that pass Holm rechecked on the held-out part (at most this many kept)",
                             default=3)

    def __post_init__(self) -> None:
        if not self.factors or any(f < 0 for f in self.factors):
            raise ConfigError("causal.factors: a non-empty list of numbers >= 0")
        if self.k < 1 or self.dev_limit < 1 or self.gen_actors < 1 or self.max_new_tokens < 1:
            raise ConfigError("causal.k, causal.dev_limit, causal.gen_actors and causal.max_new_tokens must be >= 1")
        if not 0 < self.alpha < 1:
            raise ConfigError(f"causal.alpha: a level in (0, 1), got {self.alpha}")
        if self.n_boot < 100:
            raise ConfigError(f"causal.n_boot: at least 100 resamples, got {self.n_boot}")
        if not 0 <= self.confirm_fraction < 1:
            raise ConfigError(f"causal.confirm_fraction: in [0, 1) (0 disables the recheck), got {self.confirm_fraction}")
        if self.confirm_top < 1:
            raise ConfigError(f"causal.confirm_top: at least 1, got {self.confirm_top}")
        if self.confirm_fraction > 0 and self.confirm_top < self.k:
            raise ConfigError(f"causal.confirm_top ({self.confirm_top}) < causal.k ({self.k}): only rechecked "
                              "latents can be kept")
        if self.rank_by == "loglik" and not self.loglik:
            raise ConfigError("causal.rank_by: loglik needs causal.loglik: true")


@dataclass(frozen=True)
class IdentifyConfig:
    model: ModelConfig = _help("the base model")
    sae: SAEConfig = _help("the SAE whose latents are searched")
    task: TaskConfig = _help("the task")
    run_dir: str = _help("run directory; writes <run_dir>/features/")
    recall: RecallConfig = _help("frequency recall", default_factory=RecallConfig)
    causal: CausalConfig = _help("causal (interventional) filtering", default_factory=CausalConfig)
    seed: int = _help("seed for example sampling", default=0)
    overwrite: bool = _help("recompute finished stages", default=False)


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass with type checks


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: expected one of {list(choices)}, got {value!r}")
        return value
    if tp is dict:
        tp, origin = dict[str, Any], dict
    if origin is dict:
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, val_tp = typing.get_args(tp)
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"{key}: keys must be strings, got {k!r}")
            out[k] = v if val_tp is Any else _coerce(v, val_tp, f"{key}.{k}")
        return out
    if origin is tuple:
        (item_tp, *_rest) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, str) and tp in _STRING_SHORTHANDS:
            value = _STRING_SHORTHANDS[tp](value)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp in (int, float):
        # bool is an int subclass in Python, but `true` is never a valid count or rate.
        what = "an integer" if tp is int else "a number"
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected {what}, got {value!r}")
        out = None
        if isinstance(value, int) or (tp is float and isinstance(value, float)):
            out = tp(value)
        elif isinstance(value, str):
            try:
                out = tp(value)
            except ValueError:
                pass
        if out is None or (tp is float and not math.isfinite(out)):
            raise ConfigError(f"{key}: expected {'a finite number' if out is not None else what}, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported config type {tp}")


def sae_from_string(spec: str) -> dict[str, str]:
    """`--sae DIR` (local directory) or `--sae RELEASE/SAE_ID` (sae-lens release, resolved on the hub)."""
    if os.path.isdir(spec) or spec.startswith(("/", "./", "../", "~")) or "://" in spec:
        return {"path": os.path.expanduser(spec)}
    release, sep, sae_id = spec.partition("/")
    if not sep or not sae_id:
        raise ConfigError(
            f"sae: {spec!r} is neither an existing directory nor RELEASE/SAE_ID "
            "(e.g. gemma-scope-2b-pt-res-canonical/layer_12/width_16k/canonical)"
        )
    return {"release": release, "sae_id": sae_id}


_STRING_SHORTHANDS: dict[type, Any] = {
    ModelConfig: lambda s: {"name_or_path": s},
    SAEConfig: sae_from_string,
    PoolConfig: lambda s: {"path": s},
}


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build a config dataclass from a mapping; unknown keys, wrong types and missing keys name the key."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key{'s' if len(unknown) > 1 else ''} {', '.join(prefix + k for k in unknown)} "
            f"(known: {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], prefix + name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
            raise ConfigError(f"missing config key {prefix + name}: {f.metadata.get('help', '')}")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if prefix and not str(e).startswith(prefix):
            raise ConfigError(f"{prefix.rstrip('.')}: {e}") from None
        raise


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain dict (lists, not tuples) that `from_dict` reads back to an equal config."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level")
    return data


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.c` in a nested dict; a string shorthand at `a` (e.g. `model: path`) is expanded first."""
    parts = dotted.split(".")
    cur = data
    for p in parts[:-1]:
        nxt = cur.get(p)
        if isinstance(nxt, str):
            shorthand = {"model": ModelConfig, "sae": SAEConfig, "pool": PoolConfig}.get(p)
            nxt = dict(_STRING_SHORTHANDS[shorthand](nxt)) if shorthand else {}
        if not isinstance(nxt, dict):
            nxt = {}
        cur[p] = nxt
        cur = nxt
    cur[parts[-1]] = value


def help_text(cls: type) -> str:
    """A config reference: every key with its type, default and help."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = "" if f.default is dataclasses.MISSING else f" = {f.default!r}"
        lines.append(f"  {f.name}: {_type_name(hints[f.name])}{default}  # {f.metadata.get('help', '')}")
    return "\n".join(lines)
