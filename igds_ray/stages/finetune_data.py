"""Fine-tuning's data path: the arm's selection read in id order, tokenised with the loss on the response,
batched, and ordered by one seeded permutation per epoch (see `igds_ray.stages.finetune`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence, TYPE_CHECKING

import numpy as np
import torch

from igds_ray import schema as S
from igds_ray.errors import ConfigError, PoolError, StageOutputError
from igds_ray.storage import StageDir, filesystem

if TYPE_CHECKING:
    from igds_ray.stages.finetune import FinetuneConfig

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


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
