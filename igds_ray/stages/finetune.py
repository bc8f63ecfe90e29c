"""Fine-tune the base model on one arm's selection: Ray Train (V2) `TorchTrainer` + transformers + peft.

Data: every worker reads the arm's whole selection (`<run>/selection/<arm>.parquet/`, committed with
`_SUCCESS`; its files as listed when the run started) with pyarrow, local or object store; each
worker sorts the rows by id and takes its part of every global batch from one seeded permutation per
epoch (the DistributedSampler pattern). The order therefore depends only on (rows, seed, epoch,
batch geometry), never on block or worker timing, and a resumed run continues at exactly the batch it stopped at.

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

import contextlib
import dataclasses
import json
import logging
import math
import os
import posixpath
import resource
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np
import torch

from igds_ray import schema as S
from igds_ray.config import ModelConfig, _help, from_dict, to_dict
from igds_ray.errors import ConfigError, PoolError, StageOutputError
from igds_ray.storage import StageDir, filesystem, join, read_json, write_json_atomic

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
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


# ---------------------------------------------------------------------------------------------
# pure functions: tokenisation, batching, budget, order


@dataclass(frozen=True)
class TrainExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens

    @property
    def n_targets(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def tokenize_pairs(
    tokenizer: Any, prompts: Sequence[str], responses: Sequence[str], max_tokens: int, chat_template: bool = False
) -> list[TrainExample]:
    """BOS + prompt (or its chat-template form) + response + EOS, with the loss masked on the prompt.

    Prompt and response are tokenized separately (as scoring does), so the boundary is exact. Over
    `max_tokens` the start is kept; an example whose prompt fills the window has no target tokens.
    """
    if chat_template:
        p_texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True) for p in prompts]
    else:
        p_texts = list(prompts)
    p_ids = tokenizer(p_texts, add_special_tokens=not chat_template, return_attention_mask=False)["input_ids"]
    r_ids = tokenizer(list(responses), add_special_tokens=False, return_attention_mask=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = []
    for p, r in zip(p_ids, r_ids):
        ids = (list(p) + list(r) + eos)[:max_tokens]
        labels = ([IGNORE_INDEX] * len(p) + list(r) + eos)[:max_tokens]
        out.append(TrainExample(ids, labels))
    return out


def collate(examples: Sequence[TrainExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask`, `labels` (IGNORE_INDEX on padding)."""
    T = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@dataclass(frozen=True)
class Plan:
    n_rows: int
    rows_per_step: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int

    @property
    def epochs(self) -> float:
        return self.total_steps / self.steps_per_epoch


def plan_budget(cfg: FinetuneConfig, n_rows: int) -> Plan:
    """Steps per epoch and in total; refuses an arm too small for one optimizer step."""
    per_step = cfg.rows_per_step
    spe = n_rows // per_step
    if spe == 0:
        raise ConfigError(
            f"arm {cfg.arm!r}: the selection {cfg.data} has {n_rows} row{'s' if n_rows != 1 else ''}, fewer than "
            f"one optimizer step needs (batch_size {cfg.batch_size} x grad_accum {cfg.grad_accum} x num_workers "
            f"{cfg.num_workers} = {per_step}); lower batch_size/grad_accum or select more rows"
        )
    total = cfg.epochs * spe if cfg.budget == "epochs" else int(cfg.max_steps or 0)
    return Plan(n_rows, per_step, spe, total, int(round(cfg.warmup_ratio * total)))


def epoch_order(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of rows (in id order) used in `epoch`: a function of (seed, epoch) only."""
    return np.random.default_rng([seed, epoch]).permutation(n_rows)


def worker_rows(order: np.ndarray, step_in_epoch: int, rank: int, world: int, batch_size: int,
                grad_accum: int) -> list[list[int]]:
    """This worker's micro-batches (row indices) of one optimizer step."""
    per_worker = batch_size * grad_accum
    start = step_in_epoch * per_worker * world + rank * per_worker
    mine = order[start : start + per_worker].tolist()
    return [mine[m * batch_size : (m + 1) * batch_size] for m in range(grad_accum)]


def lr_lambda(schedule: str, warmup: int, total: int):  # noqa: ANN201
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant" or total <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def fingerprint(cfg: FinetuneConfig, n_rows: int, data_version: Any) -> dict[str, Any]:
    d = {k: v for k, v in to_dict(cfg).items() if k not in _NOT_FINGERPRINTED}
    d["_n_rows"] = n_rows
    d["_data_version"] = data_version
    return d


# ---------------------------------------------------------------------------------------------
# model, tokenizer


def training_tokenizer(model: ModelConfig) -> Any:
    """The tokenizer, with a pad token: pad = eos (with a warning) if it has none; no eos is an error."""
    from transformers import AutoTokenizer

    src = model.tokenizer or model.name_or_path
    try:
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=model.trust_remote_code, revision=model.revision)
    except Exception as e:
        raise ConfigError(f"tokenizer {src!r}: cannot load it ({type(e).__name__}: {e})") from None
    if tok.eos_token_id is None:
        raise ConfigError(
            f"tokenizer {src!r} has no EOS token: training appends EOS to every response so the model learns to "
            "stop; give model.tokenizer a tokenizer with an eos_token"
        )
    if tok.pad_token_id is None:
        # Padding is masked out of attention and loss, so the pad id only has to be a valid token.
        warnings.warn(f"tokenizer {src!r} has no pad token; using its EOS token {tok.eos_token!r} for padding",
                      stacklevel=2)
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def _model_dtype(cfg: FinetuneConfig, device: torch.device) -> ModelConfig:
    # Full fine-tuning keeps float32 master weights (bf16 AdamW updates lose small steps); LoRA trains
    # float32 adapters (peft's autocast_adapter_dtype) on a bf16 base on GPUs.
    if cfg.method == "full" and cfg.model.dtype == "auto":
        return dataclasses.replace(cfg.model, dtype="float32")
    return cfg.model


def lora_config(cfg: FinetuneConfig) -> Any:
    from peft import LoraConfig

    targets: Any = "all-linear" if tuple(cfg.target_modules) == ("all-linear",) else list(cfg.target_modules)
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")


def build_model(cfg: FinetuneConfig, device: torch.device, resume_dir: str | None = None) -> torch.nn.Module:
    """The trainable model in train mode: base + fresh LoRA (seeded), or + the checkpointed adapter;
    for `full`, the base (or the checkpointed) weights."""
    from igds_ray.models.loading import load_model

    mcfg = _model_dtype(cfg, device)
    if cfg.method == "full":
        model = load_model(dataclasses.replace(mcfg, name_or_path=resume_dir) if resume_dir else mcfg, device)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        return model.train()
    from peft import PeftModel, get_peft_model

    base = load_model(mcfg, device)
    if cfg.gradient_checkpointing:
        base.gradient_checkpointing_enable()
        base.enable_input_require_grads()
    if resume_dir:
        model = PeftModel.from_pretrained(base, resume_dir, is_trainable=True)
    else:
        torch.manual_seed(cfg.seed)
        model = get_peft_model(base, lora_config(cfg))
    return model.to(device).train()


def check_targets(cfg: FinetuneConfig) -> None:
    """Refuse LoRA target modules the model does not have (on the meta device: no weights loaded)."""
    if cfg.method != "lora" or tuple(cfg.target_modules) == ("all-linear",):
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        hf = AutoConfig.from_pretrained(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code,
                                        revision=cfg.model.revision)
    except Exception as e:
        raise ConfigError(f"model {cfg.model.name_or_path!r}: cannot read its config ({type(e).__name__}: {e})") from None
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(hf, trust_remote_code=cfg.model.trust_remote_code)
    linear = sorted({n.rsplit(".", 1)[-1] for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)})
    missing = [t for t in cfg.target_modules if t not in linear]
    if len(missing) == len(cfg.target_modules):
        raise ConfigError(
            f"target_modules {list(cfg.target_modules)}: none is a linear layer of {type(m).__name__} "
            f"(its linear layers: {', '.join(linear)}); or use [all-linear]"
        )
    if missing:
        log.warning("target_modules %s are not in %s; LoRA adapts %s", missing, type(m).__name__,
                    [t for t in cfg.target_modules if t not in missing])


# ---------------------------------------------------------------------------------------------
# selection


@dataclass(frozen=True)
class Selection:
    files: list[str]  # paths inside `fs` (scheme stripped)
    fs: Any
    n_rows: int
    columns: list[str]
    version: Any  # what identifies this committed selection (its commit time)


def read_selection(cfg: FinetuneConfig) -> Selection:
    import pyarrow.parquet as pq

    sel = StageDir(cfg.data)
    try:
        manifest = sel.manifest()
    except StageOutputError:
        raise StageOutputError(
            f"arm {cfg.arm!r}: {cfg.data} is not a finished selection (no {S.SUCCESS}); run the select stage first"
        ) from None
    files = [f.split("://", 1)[-1] if "://" in f else filesystem(f)[1] for f in sel.files()]
    n_rows, columns = 0, []
    for f in files:
        with sel.fs.open_input_file(f) as fh:
            meta = pq.ParquetFile(fh).metadata
            n_rows += meta.num_rows
            columns = columns or list(meta.schema.to_arrow_schema().names)
    if n_rows:
        missing = [c for c in (cfg.prompt_column, cfg.response_column) if c not in columns]
        if missing:
            raise PoolError(
                f"arm {cfg.arm!r}: the selection {cfg.data} has no column{'s' if len(missing) > 1 else ''} "
                f"{', '.join(map(repr, missing))} (columns: {', '.join(columns)}); select with write_rows=true, "
                "or set prompt_column/response_column"
            )
    return Selection(files, sel.fs, n_rows, columns, manifest.get("committed_at"))


# ---------------------------------------------------------------------------------------------
# the training loop (runs in every Ray Train worker)


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    tokens: int = 0  # non-padding input tokens, all workers
    target_tokens: int = 0  # tokens with a loss, all workers
    rows_without_targets: int = 0
    losses: list[float] = dataclasses.field(default_factory=list)  # per optimizer step, token-weighted
    train_s: float = 0.0  # time in the loop, summed over attempts (checkpoints included)
    compute_s: float = 0.0  # forward + backward + optimizer only, summed over attempts
    peak_rss_mb: float = 0.0  # rank 0 worker process, max over attempts
    peak_gpu_mb: float = 0.0  # rank 0 torch.cuda.max_memory_allocated, max over attempts
    resumes: list[int] = dataclasses.field(default_factory=list)  # the step each resumed attempt started from


def _rows_in_id_order(cfg: FinetuneConfig, files: list[str], fs: Any, columns: list[str]
                      ) -> tuple[list[str], list[str]]:
    """Every row of the selection (each worker takes its part of every global batch itself), by id."""
    import pyarrow.dataset as pads

    t = pads.dataset(files, format="parquet", filesystem=fs).to_table(columns=columns) if files else None
    if t is None or t.num_rows == 0:
        raise StageOutputError(f"arm {cfg.arm!r}: the training dataset is empty")
    if S.ID in t.column_names:
        t = t.sort_by([(S.ID, "ascending")])
    prompts = [p or "" for p in t.column(cfg.prompt_column).to_pylist()]
    responses = [r or "" for r in t.column(cfg.response_column).to_pylist()]
    return prompts, responses


def _save_checkpoint(path: str, model: torch.nn.Module, tok: Any, opt: Any, sched: Any, state: TrainState) -> None:
    unwrapped = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    unwrapped.save_pretrained(os.path.join(path, "model"))
    tok.save_pretrained(os.path.join(path, "model"))
    torch.save(opt.state_dict(), os.path.join(path, "optimizer.pt"))
    torch.save(sched.state_dict(), os.path.join(path, "scheduler.pt"))
    with open(os.path.join(path, "state.json"), "w") as f:
        json.dump(dataclasses.asdict(state), f)


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def train_loop(config: dict[str, Any]) -> dict[str, Any]:
    import ray.train
    import ray.train.torch

    t_start = time.time()
    cfg = from_dict(FinetuneConfig, config["cfg"])
    plan = Plan(**config["plan"])
    fail_after_steps = config.get("fail_after_steps")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    tok = training_tokenizer(cfg.model)
    prompts, responses = _rows_in_id_order(cfg, config["files"], config["fs"], config["columns"])
    if len(prompts) != plan.n_rows:
        raise StageOutputError(f"arm {cfg.arm!r}: the selection has {len(prompts)} rows now, {plan.n_rows} at start")

    state = TrainState()
    ckpt = ray.train.get_checkpoint()
    opt_state = sched_state = None
    with contextlib.ExitStack() as stack:
        ckpt_dir = stack.enter_context(ckpt.as_directory()) if ckpt else None
        if ckpt_dir:
            with open(os.path.join(ckpt_dir, "state.json")) as f:
                state = TrainState(**json.load(f))
            opt_state = torch.load(os.path.join(ckpt_dir, "optimizer.pt"), map_location=device, weights_only=True)
            sched_state = torch.load(os.path.join(ckpt_dir, "scheduler.pt"), weights_only=True)
            state.resumes.append(state.step)
            log.info("arm %s: resuming from step %d (%s)", cfg.arm, state.step, ckpt_dir)
        model = build_model(cfg, device, os.path.join(ckpt_dir, "model") if ckpt_dir else None)
    start_step = state.step
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in trainable if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.schedule, plan.warmup_steps, plan.total_steps))
    if opt_state is not None:
        opt.load_state_dict(opt_state)
        sched.load_state_dict(sched_state)
    model = ray.train.torch.prepare_model(model, move_to_device=False)
    # Full fine-tuning on a GPU with dtype=auto: float32 master weights, bf16 matmuls. LoRA needs no
    # autocast: peft casts the input to the float32 adapter and the result back to the base's dtype.
    use_autocast = device.type == "cuda" and cfg.method == "full" and cfg.model.dtype == "auto"

    def checkpoint_due(step: int) -> bool:
        if step >= plan.total_steps:
            return True
        if cfg.checkpoint_every:
            return step % cfg.checkpoint_every == 0
        return step % plan.steps_per_epoch == 0

    attempt_t0 = time.time()
    while state.step < plan.total_steps:
        t_step = time.time()
        epoch, in_epoch = divmod(state.step, plan.steps_per_epoch)
        state.epoch = epoch
        micro = worker_rows(epoch_order(plan.n_rows, cfg.seed, epoch), in_epoch, rank, world, cfg.batch_size,
                            cfg.grad_accum)
        # Dropout masks depend on (seed, rank, step) only: a resumed run draws the same ones.
        torch.manual_seed(cfg.seed * 1_000_003 + rank * 7_919 + state.step)
        batches = [tokenize_pairs(tok, [prompts[i] for i in mb], [responses[i] for i in mb], cfg.max_tokens,
                                  cfg.chat_template) for mb in micro]
        n_targets = sum(e.n_targets for b in batches for e in b)
        loss_sum = 0.0
        n_tokens = 0
        for m, exs in enumerate(batches):
            batch = {k: v.to(device) for k, v in collate(exs, tok.pad_token_id).items()}
            n_tokens += int(batch["attention_mask"].sum())
            # Gradients are all-reduced once per optimizer step, on its last micro-batch.
            ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
            sync = model.no_sync() if ddp and m < len(batches) - 1 else contextlib.nullcontext()
            amp = torch.autocast("cuda", dtype=torch.bfloat16) if use_autocast else contextlib.nullcontext()
            with sync, amp:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                tgt = batch["labels"][:, 1:]
                keep = tgt != IGNORE_INDEX
                # Only target positions reach the float32 cross-entropy (the vocab can be 256k wide).
                loss = torch.nn.functional.cross_entropy(logits[:, :-1][keep].float(), tgt[keep], reduction="sum")
                (loss / max(n_targets, 1)).backward()
            loss_sum += float(loss.detach())
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for _, p in trainable], cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        g_loss, g_targets, g_tokens, g_empty = _all_reduce(
            [loss_sum, n_targets, n_tokens, sum(1 for b in batches for e in b if e.n_targets == 0)], device)
        state.step += 1
        state.compute_s += time.time() - t_step
        state.losses.append(g_loss / g_targets if g_targets else float("nan"))
        state.target_tokens += int(g_targets)
        state.tokens += int(g_tokens)
        state.rows_without_targets += int(g_empty)
        if rank == 0 and state.step % cfg.log_every == 0:
            log.info("arm %s step %d/%d loss %.4f lr %.2e", cfg.arm, state.step, plan.total_steps, state.losses[-1],
                     sched.get_last_lr()[0])
        if checkpoint_due(state.step):
            state.epoch = (state.step - 1) // plan.steps_per_epoch
            state.train_s += time.time() - attempt_t0
            state.peak_rss_mb = max(state.peak_rss_mb, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
            if device.type == "cuda":
                state.peak_gpu_mb = max(state.peak_gpu_mb, torch.cuda.max_memory_allocated(device) / 2**20)
            attempt_t0 = time.time()
            metrics = {"step": state.step, "epoch": state.epoch, "loss": state.losses[-1]}
            name = f"checkpoint_{state.step:08d}"
            if rank == 0:
                with tempfile.TemporaryDirectory() as d:
                    _save_checkpoint(d, model, tok, opt, sched, state)
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                                     checkpoint_dir_name=name)
            else:
                ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
        if fail_after_steps is not None and start_step == 0 and state.step >= fail_after_steps:
            # Test hook: die like a killed process once the last checkpoint is registered.
            ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
            log.warning("arm %s: fail_after_steps=%d reached; exiting hard (test hook)", cfg.arm, fail_after_steps)
            os._exit(1)
    log.info("arm %s: finished %d steps in %.1fs (this attempt)", cfg.arm, state.step - start_step,
             time.time() - t_start)
    return dataclasses.asdict(state)


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
    cfg = _absolute_paths(cfg)
    out = StageDir(cfg.out)
    if out.done() and not cfg.overwrite:
        log.info("%s is finished; skipping (overwrite=true retrains)", cfg.out)
        return out.manifest()
    t0 = time.time()
    sel = read_selection(cfg)
    plan = plan_budget(cfg, sel.n_rows)
    training_tokenizer(cfg.model)
    check_targets(cfg)
    # Claimed before training: an output directory that igds may not clear fails now, not after hours.
    staging = out.begin(overwrite=True)
    assert staging is not None
    run_uri = _prepare_run_dir(cfg, fingerprint(cfg, sel.n_rows, sel.version))

    init_ray()
    cols = [c for c in (S.ID, cfg.prompt_column, cfg.response_column) if c in sel.columns]
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = cfg.gpus_per_worker
    trainer = TorchTrainer(
        train_loop,
        # Every worker reads the whole selection itself (pyarrow, from the committed files): it needs
        # every row anyway, and a Ray Data read per arm cost 15-30 s of start-up on the driver and in
        # each worker for what is one small Parquet read (BENCHMARKS.md, fine-tuning).
        train_loop_config={"cfg": to_dict(cfg), "plan": dataclasses.asdict(plan), "fail_after_steps": fail_after_steps,
                           "files": sel.files, "fs": sel.fs, "columns": cols},
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
