"""Fine-tune the base model on one arm's selection: Ray Train (V2) `TorchTrainer` + transformers + peft.

Data (`finetune_tokens`): the arm's selection (`<run>/selection/<arm>.parquet/`, committed with
`_SUCCESS`) is tokenised once per training run, in (id, src_file, src_row) order, into memory-mappable
shards under `<storage_path>/<run_name>/tokens/` (in the driver for a small selection, by a Ray Data CPU
stage for a large one). Every worker maps them and reads only the rows of its own part of each global
batch, taken from one seeded permutation per epoch (the DistributedSampler pattern). The order therefore
depends only on (rows, seed, epoch, batch geometry), never on block or worker timing, and a resumed run
continues at exactly the batch it stopped at.

Loss: next-token cross-entropy on the response tokens (+ EOS) only; prompt tokens and padding are
labelled -100. The loss of an optimizer step is the sum over its target tokens divided by their
number (per worker, over its grad-accumulation micro-batches); DDP averages the workers.

Budget: `epochs` (every arm sees its data the same number of times) or `steps` (every arm takes the
same number of optimizer steps on the same batch geometry). One optimizer step consumes
batch_size x grad_accum x num_workers rows; a partial last batch of an epoch is not used (counted in
`rows_unused_per_epoch`).

Checkpoints (`<storage_path>/<run_name>/checkpoint_<step>/`): `model/` (the adapter or full model,
saved with `save_pretrained`, + tokenizer), `optimizer.pt`, `scheduler.pt`, `state.json` (step, epoch,
loss history, token counts). Resuming = rerunning with the same storage_path and run_name (Train V2
restores its latest checkpoint; `Trainer.restore` no longer exists). `<storage>/<run>/igds_finetune.json`
holds the training fingerprint: resuming with a different training config is refused.

Output `<out>/` (committed with `_SUCCESS`): adapter_config.json + adapter_model.safetensors (LoRA;
vLLM: `--enable-lora --lora-modules <arm>=<out>`) or the full model (`full`), the tokenizer, and
`train_metrics.json`. A finished `<out>` is kept on rerun unless `overwrite`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import posixpath
import shutil
import time
from dataclasses import dataclass
from typing import Any, Literal

from igds_ray import schema as S
from igds_ray.config import ModelConfig, _help, to_dict
from igds_ray.errors import ConfigError, StageOutputError
from igds_ray.storage import StageDir, filesystem, join, read_json, write_json_atomic
from igds_ray.stages import finetune_tokens
from igds_ray.stages.finetune_data import (  # the data path, re-exported
    IGNORE_INDEX, Plan, Selection, TrainExample, collate, epoch_order, plan_budget, read_selection, tokenize_pairs,
    worker_rows,
)
from igds_ray.stages.finetune_train import (  # the training loop, re-exported
    TrainState, build_model, check_targets, lora_config, lr_lambda, train_loop, training_tokenizer,
)

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_TARGETS", "FINGERPRINT_FILE", "IGNORE_INDEX", "METRICS_FILE", "FinetuneConfig", "Plan", "Selection",
           "TrainExample", "TrainState", "build_model", "check_targets", "collate", "epoch_order", "fingerprint",
           "lora_config", "lr_lambda", "plan_budget", "read_selection", "run", "tokenize_pairs", "train_loop",
           "training_tokenizer", "worker_rows"]


FINGERPRINT_FILE = "igds_finetune.json"
METRICS_FILE = "train_metrics.json"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class FinetuneConfig:
    model: ModelConfig = _help("the base model (hub id or local directory)")
    data: str = _help("a finished selection directory, e.g. <run>/selection/<arm>.parquet")
    out: str = _help("final adapter/model directory, e.g. <run>/models/<arm> (local, s3://, gs://)")
    arm: str = _help("arm name (used in messages and the default run name)", default="igds")
    prompt_column: str = _help("prompt column of the selection", default=S.DEFAULT_PROMPT)
    response_column: str = _help("response column of the selection", default=S.DEFAULT_RESPONSE)
    chat_template: bool = _help("wrap the prompt in the tokenizer's chat template (as scoring did)", default=False)
    method: Literal["lora", "full"] = _help("lora = train a PEFT LoRA adapter; full = train every weight",
                                            default="lora")
    init_adapter: str | None = _help(
        "lora: train on from this PEFT adapter (e.g. the previous round's <run>/models/<arm>) instead of a fresh "
        "one; its rank, alpha and target modules are kept", default=None)
    lora_r: int = _help("LoRA rank", default=16)
    lora_alpha: float = _help("LoRA alpha (scale = alpha / r)", default=32.0)
    lora_dropout: float = _help("dropout on the LoRA input", default=0.05)
    target_modules: tuple[str, ...] = _help(
        "module names LoRA adapts (all attention + MLP projections by default); [all-linear] = every linear layer",
        default=DEFAULT_TARGETS,
    )
    lr: float = _help("peak learning rate (AdamW)", default=2e-4)
    weight_decay: float = _help("AdamW weight decay (matrices only)", default=0.0)
    warmup_ratio: float = _help("fraction of the steps with linear warmup", default=0.03)
    schedule: Literal["linear", "cosine", "constant"] = _help("learning-rate decay after warmup", default="linear")
    max_grad_norm: float = _help("gradient clipping norm (0 = off)", default=1.0)
    batch_size: int = _help("rows per micro-batch per worker", default=8)
    grad_accum: int = _help("micro-batches per optimizer step", default=1)
    max_tokens: int = _help("tokens per example (prompt + response + EOS); the start is kept", default=1024)
    budget: Literal["epochs", "steps"] = _help(
        "equal budgets across arms: the same number of epochs, or the same number of optimizer steps",
        default="epochs",
    )
    epochs: int = _help("passes over the selection (budget=epochs)", default=1)
    max_steps: int | None = _help("optimizer steps (budget=steps)", default=None)
    seed: int = _help("seed for LoRA init, data order and dropout", default=0)
    num_workers: int = _help("Ray Train workers (data parallel)", default=1)
    use_gpu: bool = _help("one GPU (or gpus_per_worker) per worker", default=False)
    cpus_per_worker: float = _help("CPUs reserved per worker", default=1.0)
    gpus_per_worker: float = _help("GPUs per worker when use_gpu", default=1.0)
    gradient_checkpointing: bool = _help("recompute activations in backward (less memory, ~30% slower)",
                                         default=False)
    storage_path: str | None = _help(
        "Ray Train storage (absolute path or s3:// / gs://); default: <dir of out>/_train", default=None
    )
    run_name: str | None = _help("Ray Train run name; same storage_path + run_name resumes; default finetune-<arm>",
                                 default=None)
    checkpoint_every: int = _help("checkpoint every N optimizer steps (0 = at the end of every epoch); "
                                  "always at the end", default=0)
    keep_checkpoints: int = _help("checkpoints kept in storage (the newest)", default=2)
    max_failures: int = _help("worker failures retried from the last checkpoint (Ray Train FailureConfig)",
                              default=2)
    log_every: int = _help("log the loss every N steps (worker log)", default=10)
    overwrite: bool = _help("retrain from scratch even if <out> or a checkpointed run exists", default=False)

    def __post_init__(self) -> None:
        if not self.arm or "/" in self.arm:
            raise ConfigError(f"arm must be a plain name, got {self.arm!r}")
        if self.prompt_column == self.response_column:
            raise ConfigError("prompt_column and response_column must differ")
        for key in ("lora_r", "batch_size", "grad_accum", "epochs", "num_workers", "log_every", "keep_checkpoints"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.max_tokens < 2:
            raise ConfigError(f"max_tokens must be >= 2, got {self.max_tokens}")
        if self.lr <= 0 or self.weight_decay < 0 or self.max_grad_norm < 0 or self.lora_alpha <= 0:
            raise ConfigError("lr and lora_alpha must be > 0; weight_decay and max_grad_norm >= 0")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.budget == "steps" and (self.max_steps is None or self.max_steps < 1):
            raise ConfigError("budget=steps needs max_steps >= 1")
        if self.checkpoint_every < 0 or self.max_failures < -1:
            raise ConfigError("checkpoint_every must be >= 0 and max_failures >= -1 (-1 = retry forever)")
        if self.method == "lora" and not self.target_modules:
            raise ConfigError("target_modules: at least one module name for LoRA")
        if self.use_gpu and self.gpus_per_worker <= 0:
            raise ConfigError("use_gpu needs gpus_per_worker > 0")
        if self.cpus_per_worker < 0:
            raise ConfigError("cpus_per_worker must be >= 0")
        if self.run_name is not None and (not self.run_name or "/" in self.run_name):
            raise ConfigError(f"run_name must be a plain name, got {self.run_name!r}")
        if self.init_adapter and self.method != "lora":
            raise ConfigError("init_adapter is a LoRA adapter: with method=full, start from a model directory "
                              "(model.name_or_path) instead")
        if getattr(self.model, "adapter", None):
            raise ConfigError("model.adapter is set: fine-tuning starts from a base model; merge the adapter into "
                              "a model directory first or train from the base")

    @property
    def resolved_run_name(self) -> str:
        return self.run_name or f"finetune-{self.arm}"

    @property
    def resolved_storage_path(self) -> str:
        if self.storage_path:
            return self.storage_path if "://" in self.storage_path else os.path.abspath(
                os.path.expanduser(self.storage_path))
        out = self.out.rstrip("/")
        if "://" in out:
            return posixpath.join(posixpath.dirname(out), "_train")
        return os.path.join(os.path.dirname(os.path.abspath(os.path.expanduser(out))), "_train")

    @property
    def rows_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.num_workers


# Keys that do not change what is trained: a run may resume with other values for them.
_NOT_FINGERPRINTED = ("out", "overwrite", "max_failures", "checkpoint_every", "keep_checkpoints", "storage_path",
                      "run_name", "use_gpu", "cpus_per_worker", "gpus_per_worker", "log_every")


def fingerprint(cfg: FinetuneConfig, n_rows: int, data_version: Any) -> dict[str, Any]:
    d = {k: v for k, v in to_dict(cfg).items() if k not in _NOT_FINGERPRINTED}
    d["_n_rows"] = n_rows
    d["_data_version"] = data_version
    return d


# ---------------------------------------------------------------------------------------------
# driver


def _put_dir(local_dir: str, uri: str) -> None:
    """Copy a local directory's files to `uri` (local or remote)."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        shutil.copytree(local_dir, path, dirs_exist_ok=True)
    else:
        pafs.copy_files(local_dir, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def _prepare_run_dir(cfg: FinetuneConfig, fp: dict[str, Any]) -> str:
    """`<storage>/<run_name>`: cleared on overwrite; a fingerprint that differs from the stored one is refused."""
    import pyarrow.fs as pafs

    run_uri = join(cfg.resolved_storage_path, cfg.resolved_run_name)
    fs, path = filesystem(run_uri)
    fp_uri = join(run_uri, FINGERPRINT_FILE)
    if cfg.overwrite and fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)
    if fs.get_file_info(filesystem(fp_uri)[1]).type == pafs.FileType.File:
        old = read_json(fp_uri)
        diff = sorted(k for k in set(old) | set(fp) if old.get(k) != json.loads(json.dumps(fp.get(k))))
        if diff:
            raise ConfigError(
                f"arm {cfg.arm!r}: the Ray Train run {run_uri} was started with another training config "
                f"(differs in: {', '.join(diff)}); resuming it would mix two runs. Set overwrite=true to retrain, "
                "or choose another run_name"
            )
    else:
        write_json_atomic(fp_uri, fp)
    return run_uri


def _absolute_paths(cfg: FinetuneConfig) -> FinetuneConfig:
    """Local paths made absolute: Ray workers run in other directories, and the adapter records its base."""

    def absolute(p: str | None) -> str | None:
        return os.path.abspath(os.path.expanduser(p)) if p and "://" not in p and os.path.exists(
            os.path.expanduser(p)) else p

    model = dataclasses.replace(cfg.model, name_or_path=absolute(cfg.model.name_or_path),
                                tokenizer=absolute(cfg.model.tokenizer))
    return dataclasses.replace(cfg, model=model, data=absolute(cfg.data) or cfg.data,
                               init_adapter=absolute(cfg.init_adapter),
                               out=cfg.out if "://" in cfg.out else os.path.abspath(os.path.expanduser(cfg.out)))


def run(cfg: FinetuneConfig, fail_after_steps: int | None = None) -> dict[str, Any]:
    """Fine-tune on the arm's selection and commit the adapter (or model) to `cfg.out`.

    Returns the `_SUCCESS` manifest (its `metrics` are those of `train_metrics.json`). A finished
    `out` is returned as is unless `overwrite`; an interrupted run resumes from its last checkpoint.
    `fail_after_steps` (tests only): the workers exit hard after that many steps of a fresh attempt.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from igds_ray.stages.score import init_ray

    from igds_ray.preflight import model_reachable, reachable

    reachable("data", cfg.data)
    reachable("out", cfg.out)
    model_reachable("model.name_or_path", cfg.model.name_or_path, cfg.model.revision)
    if cfg.init_adapter:
        reachable("init_adapter", cfg.init_adapter)
        if "://" not in cfg.init_adapter and not os.path.isfile(os.path.join(cfg.init_adapter, "adapter_config.json")):
            raise ConfigError(f"arm {cfg.arm!r}: init_adapter {cfg.init_adapter!r} has no adapter_config.json "
                              "(expected a PEFT adapter directory, e.g. a previous round's <run>/models/<arm>)")
    cfg = _absolute_paths(cfg)
    out = StageDir(cfg.out)
    if out.done() and not cfg.overwrite:
        log.info("%s is finished; skipping (overwrite=true retrains)", cfg.out)
        return out.manifest()
    t0 = time.time()
    sel = read_selection(cfg)
    plan = plan_budget(cfg, sel.n_rows)
    tok = training_tokenizer(cfg.model)
    check_targets(cfg)
    # Claimed before training: an output directory that igds may not clear fails now, not after hours.
    staging = out.begin(overwrite=True)
    assert staging is not None
    run_uri = _prepare_run_dir(cfg, fingerprint(cfg, sel.n_rows, sel.version))

    # Tokenised once per run, in id order, into memory-mappable shards the workers share (a resumed run
    # reuses them): no worker holds the selection (`finetune_tokens`).
    tokens = finetune_tokens.build(cfg, sel, run_uri, tok)
    init_ray()
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = cfg.gpus_per_worker
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": to_dict(cfg), "plan": dataclasses.asdict(plan), "fail_after_steps": fail_after_steps,
                           "tokens": join(run_uri, finetune_tokens.TOKENS_DIR)},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            storage_path=cfg.resolved_storage_path,
            name=cfg.resolved_run_name,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise StageOutputError(f"arm {cfg.arm!r}: the Ray Train run {run_uri} finished without a checkpoint")

    with result.checkpoint.as_directory() as d:
        with open(os.path.join(d, "state.json")) as f:
            state = TrainState(**json.load(f))
        if state.step < plan.total_steps:
            raise StageOutputError(f"arm {cfg.arm!r}: the last checkpoint is at step {state.step} of "
                                   f"{plan.total_steps}")
        _put_dir(os.path.join(d, "model"), staging)
    first = next((x for x in state.losses if x == x), None)
    metrics = {
        "arm": cfg.arm,
        "method": cfg.method,
        "budget": cfg.budget,
        "steps": state.step,
        "epochs": round(state.step / plan.steps_per_epoch, 6),
        "steps_per_epoch": plan.steps_per_epoch,
        "rows": plan.n_rows,
        "rows_per_step": plan.rows_per_step,
        "rows_unused_per_epoch": plan.n_rows - plan.steps_per_epoch * plan.rows_per_step,
        "rows_without_targets": state.rows_without_targets,
        "tokenized_in": tokens.get("tokenized_in"),
        "tokens": state.tokens,
        "target_tokens": state.target_tokens,
        "first_loss": first,
        "final_loss": state.losses[-1] if state.losses else None,
        "losses": state.losses,
        "train_s": round(state.train_s, 3),
        "compute_s": round(state.compute_s, 3),
        "tokens_per_s": round(state.tokens / state.compute_s, 1) if state.compute_s else None,
        "peak_rss_mb": round(state.peak_rss_mb, 1),
        "peak_gpu_mb": round(state.peak_gpu_mb, 1),
        "wall_s": round(time.time() - t0, 3),
        "resumed_from_step": state.resumes[-1] if state.resumes else None,
        "resumes": state.resumes,
        "num_workers": cfg.num_workers,
        "cpus": cfg.num_workers * cfg.cpus_per_worker,
        "gpus": cfg.num_workers * cfg.gpus_per_worker if cfg.use_gpu else 0.0,
        "checkpoint": result.checkpoint.path,
        "train_run": run_uri,
    }
    write_json_atomic(join(staging, METRICS_FILE), metrics)
    manifest = {"stage": "finetune", "config": to_dict(cfg), "data": cfg.data, "metrics": metrics}
    return out.commit(staging, manifest, suffix="")
