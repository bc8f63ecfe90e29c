"""Fine-tuning's training loop, run in every Ray Train worker: model and LoRA set-up, the optimizer and
schedule, checkpoints and exact resume (see `igds_ray.stages.finetune`)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import resource
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Any, TYPE_CHECKING

import torch

from igds_ray.config import ModelConfig, from_dict
from igds_ray.errors import ConfigError, StageOutputError
from igds_ray.stages.finetune_data import (
    IGNORE_INDEX, Plan, collate, epoch_order, worker_rows,
)
if TYPE_CHECKING:
    from igds_ray.stages.finetune import FinetuneConfig

log = logging.getLogger(__name__)


def lr_lambda(schedule: str, warmup: int, total: int):  # noqa: ANN201
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant" or total <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


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
    if resume_dir or cfg.init_adapter:
        model = PeftModel.from_pretrained(base, resume_dir or cfg.init_adapter, is_trainable=True)
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
    from igds_ray.stages.finetune import FinetuneConfig  # noqa: F811 - at run time (a cycle at import time)

    cfg = from_dict(FinetuneConfig, config["cfg"])
    plan = Plan(**config["plan"])
    fail_after_steps = config.get("fail_after_steps")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    tok = training_tokenizer(cfg.model)
    from igds_ray.stages.finetune_tokens import TokenShards

    shards = TokenShards(config["tokens"])  # memory-mapped: this worker reads only the rows of its batches
    if shards.n_rows != plan.n_rows:
        raise StageOutputError(f"arm {cfg.arm!r}: the tokenised selection has {shards.n_rows} rows, the plan "
                               f"{plan.n_rows}")
    epoch_perm: tuple[int, Any] = (-1, None)  # one seeded permutation per epoch, computed once

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
        if epoch_perm[0] != epoch:
            epoch_perm = (epoch, epoch_order(plan.n_rows, cfg.seed, epoch))
        micro = worker_rows(epoch_perm[1], in_epoch, rank, world, cfg.batch_size, cfg.grad_accum)
        # Dropout masks depend on (seed, rank, step) only: a resumed run draws the same ones.
        torch.manual_seed(cfg.seed * 1_000_003 + rank * 7_919 + state.step)
        batches = [shards.examples(mb) for mb in micro]
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
