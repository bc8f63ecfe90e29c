"""The scorer's hot path: the LM run up to block L, the k-feature SAE encode, pooled per row.

`PooledFeatureActs` turns tokenized examples into pooled k-feature activations (also used by recall,
evaluation and the baselines' checks); `FeatureScorer` is the Ray Data callable class that holds one
model + SAE copy per actor and turns a block of pool rows into a block of scores.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import torch

from igds_ray import schema as S
from igds_ray.config import ScoreConfig, from_dict
from igds_ray.models.loading import load_model, load_sae, load_tokenizer, resolve_device
from igds_ray.models.runner import FeatureEncoder, LayerRunner
from igds_ray.tokenize import (
    Example,
    ExampleBuilder,
    PromptRenderer,
    build_task,
    PROMPT_POOLINGS,
    prompt_mode,
    split_built,
)

log = logging.getLogger(__name__)
# index_reduce_ is exact for amax/mean; torch flags the API itself as beta.
warnings.filterwarnings("ignore", message="index_reduce", category=UserWarning)


def micro_batches(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Group example indices (longest first) so that rows × longest ≤ token_budget (padding included)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, cur, cur_max = [], [], 0
    for i in order:
        new_max = max(cur_max, lengths[i])
        if cur and new_max * (len(cur) + 1) > token_budget:
            batches.append(cur)
            cur, new_max = [], lengths[i]
        cur.append(i)
        cur_max = new_max
    if cur:
        batches.append(cur)
    return batches


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`; to a GPU from pinned memory without blocking the host."""
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


class PooledFeatureActs:
    """The model + SAE half of scoring: examples in, pooled k-feature activations out."""

    def __init__(self, runner: LayerRunner, encoder: FeatureEncoder, pad_id: int, pooling: str, token_budget: int):
        self.runner, self.encoder = runner, encoder
        self.pad_id, self.pooling, self.token_budget = pad_id, pooling, token_budget
        self.tokens_forwarded = 0  # padded tokens through the model, for throughput figures
        self.rows_forwarded = 0  # examples run through the model

    @torch.inference_mode()
    def __call__(self, examples: Sequence[Example]) -> np.ndarray:
        """acts: [n_examples, k] float32.

        Micro-batches are right-padded and run without a padding mask (`LayerRunner`: the positions read are
        never padding, and causal attention keeps padding out of them). Results stay on the device until the
        end of the call: one device-to-host copy per call, not one per micro-batch."""
        dev = self.runner_device
        out = torch.zeros((len(examples), self.encoder.k), dtype=torch.float32, device=dev)
        for mb in micro_batches([len(e.input_ids) for e in examples], self.token_budget):
            T = max(len(examples[i].input_ids) for i in mb)
            ids = torch.full((len(mb), T), self.pad_id, dtype=torch.long)
            for r, i in enumerate(mb):
                ids[r, :len(examples[i].input_ids)] = torch.tensor(examples[i].input_ids)
            rows = torch.tensor([r for r, i in enumerate(mb) for _ in examples[i].positions])
            cols = torch.tensor([p for i in mb for p in examples[i].positions])
            hidden = self.runner(_to(ids, dev), None)  # [b, T, d]
            self.tokens_forwarded += len(mb) * T
            self.rows_forwarded += len(mb)
            rows, cols = _to(rows, dev), _to(cols, dev)
            acts = self.encoder(hidden[rows, cols]).float()  # [n_positions, k]
            if self.pooling == "last":
                pooled = acts  # one position per row, in row order
            else:
                pooled = torch.zeros((len(mb), acts.shape[1]), dtype=acts.dtype, device=acts.device)
                reduce = "amax" if self.pooling in ("max", "prompt_max") else "mean"
                pooled.index_reduce_(0, rows, acts, reduce, include_self=False)
            out[_to(torch.tensor(mb), dev)] = pooled
        return out.cpu().numpy()

    @property
    def runner_device(self) -> torch.device:
        return next(self.runner.model.parameters()).device


def scored_schema(id_type: pa.DataType) -> pa.Schema:
    """An igds scores part: the shared scores schema plus whether the prompt was put into the task template."""
    return S.scores_schema(id_type).append(pa.field(S.RENDERED, pa.bool_()))


# Columns the CPU stage adds for the scorer actors (dropped before anything is written).
PREP_IDS, PREP_POS, PREP_TRUNC, PREP_ERR, PREP_RENDERED = "_input_ids", "_positions", "_truncated", "_error", "_rendered"


class ScorePrep:
    """The CPU half of scoring: a block of pool rows checked, rendered into the task template when asked,
    and tokenised into the positions the scorer reads. Runs in a CPU stage before the scorer actors
    (`prepare_batch`), so a GPU actor's time goes to the model; `FeatureScorer` also runs it in process on
    a table that has not been through that stage."""

    def __init__(self, cfg: ScoreConfig, task: Any = None) -> None:
        c = self.cfg = cfg
        mode = prompt_mode(c)
        self.renderer = (PromptRenderer(task if task is not None else build_task(c), c.pool.template_index, mode)
                         if mode in ("auto", "task") else None)
        self.builder = ExampleBuilder(load_tokenizer(c.model), c.pooling, c.max_tokens, c.pool.chat_template)

    def __call__(self, table: pa.Table) -> pa.Table:
        c = self.cfg
        n = table.num_rows
        errors: list[str | None] = table.column(S.INPUT_ERROR).to_pylist()
        cols = {name: table.column(name).to_pylist() for name in c.pool.text_columns}
        for i in range(n):
            if errors[i] is None:
                for name in c.pool.text_columns:
                    if name == c.pool.response_column and c.pooling in PROMPT_POOLINGS and not c.pool.text_column:
                        continue  # the response is not read by `last`/`prompt_*`; an empty one is allowed
                    if not cols[name][i].strip():
                        errors[i] = f"{name} is empty or whitespace only"
                        break
        ok = [i for i in range(n) if errors[i] is None]
        rendered = [False] * n
        if c.pool.text_column:
            built = self.builder.build_text([cols[c.pool.text_column][i] for i in ok])
        else:
            prompts = [cols[c.pool.prompt_column][i] for i in ok]
            if self.renderer is not None:
                prompts, flags = self.renderer.render(prompts)
                for i, f in zip(ok, flags):
                    rendered[i] = f
            built = self.builder.build_pairs(prompts, [cols[c.pool.response_column][i] for i in ok])
        rows, examples = split_built(ok, built, errors)
        ids: list[list[int] | None] = [None] * n
        pos: list[list[int] | None] = [None] * n
        trunc = [False] * n
        for i, e in zip(rows, examples):
            ids[i], pos[i], trunc[i] = e.input_ids, e.positions, e.truncated
        return pa.table({
            S.ID: table.column(S.ID), S.SRC_FILE: table.column(S.SRC_FILE), S.SRC_ROW: table.column(S.SRC_ROW),
            PREP_IDS: pa.array(ids, pa.list_(pa.int32())), PREP_POS: pa.array(pos, pa.list_(pa.int32())),
            PREP_TRUNC: pa.array(trunc, pa.bool_()), PREP_ERR: pa.array(errors, pa.string()),
            PREP_RENDERED: pa.array(rendered, pa.bool_()),
        })


_PREP: dict[str, ScorePrep] = {}  # per worker process: the tokenizer is loaded once, not once per block


def prepare_batch(table: pa.Table, cfg: dict[str, Any], task: Any = None) -> pa.Table:  # noqa: ANN401
    """`ScorePrep` as a Ray Data task function: a CPU stage before the scorer actors (Ray Data may fuse it into the
    pool's read tasks)."""
    key = json.dumps(cfg, sort_keys=True, default=str)
    prep = _PREP.get(key)
    if prep is None:
        if len(_PREP) >= 4:
            _PREP.clear()
        prep = _PREP[key] = ScorePrep(from_dict(ScoreConfig, cfg), task)
    return prep(table)


class FeatureScorer:
    """Ray Data callable class: one model + SAE per actor, loaded once in `__init__`."""

    def __init__(self, cfg: dict[str, Any] | ScoreConfig, fail_after_batches: int | None = None,
                 hooks: dict[str, Any] | None = None, task: Any = None) -> None:
        self.cfg = cfg if isinstance(cfg, ScoreConfig) else from_dict(ScoreConfig, cfg)
        c = self.cfg
        # The driver passes the task it built (a task registered only in the driver process still
        # reaches the actor, pickled); in process it is built here (`ScorePrep`, only for a table that did
        # not come through the CPU stage).
        self._task = task
        self._prep: ScorePrep | None = None
        device = resolve_device(c.model.device)
        if device.type == "cpu" and c.num_cpus >= 1:
            torch.set_num_threads(max(1, int(c.num_cpus)))
        feats = c.feature_ids
        self.tokenizer = load_tokenizer(c.model)
        self.layer = feats[0].layer
        # Only blocks 0..L are built and loaded; the SAE is read on the CPU and only its k columns (and the
        # input preprocessing's vectors) go to the device.
        model = load_model(c.model, device, layers=self.layer + 1)
        sae = load_sae(c.sae, torch.device("cpu"))
        self.acts = PooledFeatureActs(
            LayerRunner(model, self.layer, prune=True),
            FeatureEncoder(sae, [f.index for f in feats], compact=True).to(device),
            self.tokenizer.pad_token_id,
            c.pooling,
            c.token_budget,
        )
        # Test hooks for crash-recovery tests: the actor process exits after `fail_after_batches`
        # batches (Ray restarts it), raises after `raise_after_batches` (the job fails), or stops
        # making progress (blocks) after `stall_after_batches`; each batch waits
        # `batch_delay_s`; `forward_log` (a directory) receives one line per batch with the rows handed
        # to this actor and the rows it ran through the model.
        hooks = hooks or {}
        self._fail_after = fail_after_batches if fail_after_batches is not None else hooks.get("fail_after_batches")
        self._stall_after = hooks.get("stall_after_batches")
        self._raise_after = hooks.get("raise_after_batches")
        self._delay = float(hooks.get("batch_delay_s") or 0.0)
        self._forward_log = hooks.get("forward_log")
        self._batches = 0

    def __call__(self, table: pa.Table) -> pa.Table:
        self._batches += 1
        if self._fail_after is not None and self._batches > self._fail_after:
            os._exit(1)
        if self._delay:
            time.sleep(self._delay)
        if self._raise_after is not None and self._batches > self._raise_after:
            raise RuntimeError(f"test hook: scorer fails on batch {self._batches}")
        if self._stall_after is not None and self._batches > self._stall_after:
            time.sleep(24 * 3600)
        before = self.acts.rows_forwarded
        prepared = PREP_IDS in table.column_names  # tokenised by the CPU stage, not here
        out = self.score_table(table)
        if self._forward_log:
            _log_forward(self._forward_log, table.num_rows, self.acts.rows_forwarded - before, prepared)
        return out

    def score_table(self, table: pa.Table) -> pa.Table:
        """A block of pool rows (or of `ScorePrep`'s output) scored."""
        if PREP_IDS not in table.column_names:
            if self._prep is None:
                self._prep = ScorePrep(self.cfg, self._task)
            table = self._prep(table)
        n = table.num_rows
        errors: list[str | None] = table.column(PREP_ERR).to_pylist()
        rendered = table.column(PREP_RENDERED).to_pylist()
        rows = [i for i in range(n) if errors[i] is None]
        ids, pos = table.column(PREP_IDS).to_pylist(), table.column(PREP_POS).to_pylist()
        trunc = table.column(PREP_TRUNC).to_pylist()
        examples = [Example(ids[i], pos[i], trunc[i]) for i in rows]
        score = [None] * n
        acts: list[list[float] | None] = [None] * n
        n_tokens = [0] * n
        truncated = [False] * n
        if examples:
            pooled = self.acts(examples)
            for j, i in enumerate(rows):
                a = pooled[j]
                if not np.all(np.isfinite(a)):
                    errors[i] = "non-finite activation"
                    continue
                acts[i] = a.tolist()
                score[i] = float(a.astype(np.float64).sum())
                n_tokens[i] = len(examples[j].input_ids)
                truncated[i] = examples[j].truncated
        id_col = table.column(S.ID)
        return pa.table(
            {
                S.ID: id_col,
                S.SCORE: pa.array(score, pa.float64()),
                S.ACTS: pa.array(acts, pa.list_(pa.float32())),
                S.N_TOKENS: pa.array(n_tokens, pa.int32()),
                S.TRUNCATED: pa.array(truncated, pa.bool_()),
                S.ERROR: pa.array(errors, pa.string()),
                S.SRC_FILE: table.column(S.SRC_FILE),
                S.SRC_ROW: table.column(S.SRC_ROW),
                S.RENDERED: pa.array(rendered, pa.bool_()),
            },
            schema=scored_schema(id_col.type),
        )


HOOKS_ENV = "IGDS_TEST_HOOKS"  # JSON test hooks for a scoring job run from the CLI (read on the driver)


def _log_forward(log_dir: str, rows: int, forwarded: int, prepared: bool = False) -> None:
    os.makedirs(log_dir, exist_ok=True)
    fd = os.open(os.path.join(log_dir, f"{os.getpid()}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, f"{rows} {forwarded} {int(prepared)}\n".encode())  # one small O_APPEND write: never interleaved
    finally:
        os.close(fd)


def read_forward_log(log_dir: str) -> tuple[int, int]:
    """(rows handed to scorers, rows run through the model) summed over a `forward_log` directory."""
    rows = fwd = 0
    if os.path.isdir(log_dir):
        for name in os.listdir(log_dir):
            with open(os.path.join(log_dir, name)) as f:
                for line in f:
                    a, b = line.split()[:2]
                    rows, fwd = rows + int(a), fwd + int(b)
    return rows, fwd


def forward_log_prepared(log_dir: str) -> set[bool]:
    """Whether the batches in a `forward_log` directory reached the scorers tokenised (by the CPU stage)."""
    out = set()
    for name in os.listdir(log_dir):
        with open(os.path.join(log_dir, name)) as f:
            out |= {line.split()[2] == "1" for line in f if len(line.split()) > 2}
    return out


def resolve_hooks(hooks: dict[str, Any] | None = None) -> dict[str, Any]:
    """Explicit hooks, over those of `$IGDS_TEST_HOOKS` (a JSON object)."""
    merged = json.loads(os.environ.get(HOOKS_ENV) or "{}")
    merged.update(hooks or {})
    return merged
