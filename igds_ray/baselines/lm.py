"""The `loss` and `ifd` baselines in one Ray Data stage: an actor pool of base models, two batched
forward passes per row, three scores.

For a prompt p and response r (tokenized separately and concatenated, as `ExampleBuilder` does):

- `loss`        = mean over the response tokens of -log P(r_t | BOS, p, r_<t): the SFT loss of the row
                  (its loss mask: response tokens only). The `loss` arm keeps the highest.
- `uncond_loss` = mean over the *same* response tokens of -log P(r_t | BOS, r_<t).
- `ifd`         = exp(loss - uncond_loss) = PPL(r | p) / PPL(r), Instruction-Following Difficulty
                  (Li et al., 2024, "Cherry LLM"). The `ifd` arm keeps the highest and drops rows with
                  IFD > 1 (the prompt does not help predict the response): select with
                  `score_column="ifd", max_score=1.0`.

`score` = `loss`; `n_tokens` = tokens of both sequences. The conditional pass serves both `loss` and
the numerator of IFD, so a row costs exactly two sequences (conditional, unconditional),
micro-batched together by a padded-token budget.
Over `max_tokens` the conditional sequence keeps its start (the whole prompt if it fits, then as much
response as fits); the unconditional one scores the same kept response tokens; `truncated` is set.
A tokenizer without BOS (e.g. Qwen) conditions the unconditional pass on EOS instead, the usual
document separator, so the first response token is scored in both passes.

The LM head runs only on the positions that predict response tokens, in chunks, so a 256k vocabulary
never materialises [batch, seq, vocab] logits. Known post-head transforms (Gemma's final logit
softcapping, Cohere's `logit_scale`, Granite's `logits_scaling`) are applied, and each actor checks
once at start-up that this split path equals the model's own logits on a probe sequence; if not, it
falls back to the model's full forward.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import torch

from igds_ray import schema as S
from igds_ray.baselines.common import baseline_schema, row_errors, run_stage, scores_table
from igds_ray.schema import IFD, LOSS, UNCOND_LOSS
from igds_ray.config import ModelConfig, PoolConfig, _help, from_dict, to_dict
from igds_ray.errors import ConfigError
from igds_ray.models.loading import load_model, load_tokenizer, model_info, resolve_device
from igds_ray.stages.score import micro_batches
from igds_ray.tokenize import ExampleBuilder, split_built

log = logging.getLogger(__name__)

LM_FIELDS = (pa.field(LOSS, pa.float64()), pa.field(UNCOND_LOSS, pa.float64()), pa.field(IFD, pa.float64()))
# Logit elements per head chunk (float32: 256 MiB): bounds memory whatever the vocabulary.
_HEAD_CHUNK_ELEMENTS = 1 << 26


@dataclass(frozen=True)
class LMConfig:
    model: ModelConfig = _help("the base model (the one that will be fine-tuned)")
    pool: PoolConfig = _help("the data pool (prompt + response columns)")
    out: str = _help("output scores directory (local, s3://, gs://)")
    max_tokens: int = _help("truncate prompt + response to this many tokens (recorded in `truncated`)", default=1024)
    token_budget: int = _help("padded tokens per forward micro-batch", default=16384)
    batch_size: int = _help("rows per Ray Data batch handed to a scorer actor", default=256)
    actors: int = _help("scorer actors (each loads the model once)", default=1)
    num_cpus: float = _help("CPUs per scorer actor", default=1.0)
    num_gpus: float = _help("GPUs per scorer actor (fractions allowed)", default=0.0)
    overwrite: bool = _help("recompute even if the output directory holds a finished result", default=False)

    def __post_init__(self) -> None:
        if self.pool.text_column:
            raise ConfigError("loss/ifd score a response given its prompt: set pool.prompt_column and "
                              "pool.response_column, not pool.text_column")
        for key in ("max_tokens", "token_budget", "batch_size", "actors"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.num_gpus < 0 or self.num_cpus < 0:
            raise ConfigError("num_gpus and num_cpus must be >= 0")
        if self.token_budget < self.max_tokens:
            raise ConfigError(f"token_budget ({self.token_budget}) must be >= max_tokens ({self.max_tokens})")


# ---------------------------------------------------------------------------------------------
# tokens


@dataclass(frozen=True)
class PairTokens:
    cond: list[int]  # BOS + prompt + response, truncated to max_tokens
    n_prompt: int  # tokens before the response in `cond`
    uncond: list[int]  # one context token (BOS, else EOS) + the same response tokens
    truncated: bool

    @property
    def n_response(self) -> int:
        return len(self.cond) - self.n_prompt


def pair_tokens(builder: ExampleBuilder, prompts: Sequence[str], responses: Sequence[str]) -> list[PairTokens | str]:
    """Token ids of both passes per row, or why the row has no response tokens left to score."""
    tok = builder.tok
    ctx = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if ctx is None:
        raise ConfigError("the tokenizer has neither a BOS nor an EOS token to condition the response-only pass on")
    # The builder's own encoders: the same character cap, chat template and special-token rules.
    p_ids, p_cut = builder.prompt_ids(prompts)
    r_ids, r_cut = builder.response_ids(responses)
    out: list[PairTokens | str] = []
    for pi, ri, pc, rc in zip(p_ids, r_ids, p_cut, r_cut):
        keep = max(0, builder.max_tokens - len(pi))
        r = ri[:keep]
        if not r:
            out.append(
                f"response truncated away: the prompt alone has {len(pi)} tokens (max_tokens={builder.max_tokens})"
                if ri else "response has no tokens to score (empty or whitespace only)"
            )
            continue
        if not pi:  # nothing to predict the first response token from (a tokenizer without BOS, empty prompt)
            out.append("prompt has no tokens")
            continue
        out.append(PairTokens(pi + r, len(pi), [ctx] + r, bool(pc or rc or len(ri) > keep)))
    return out


# ---------------------------------------------------------------------------------------------
# the forward pass


def _post_head(model: torch.nn.Module) -> Any:
    """The transform some architectures apply to the LM head's output, or None."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    cap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(cfg, "logit_scale", None)  # Cohere multiplies
    div = getattr(cfg, "logits_scaling", None)  # Granite divides

    def post(logits: torch.Tensor) -> torch.Tensor:
        if scale is not None:
            logits = logits * scale
        if div is not None:
            logits = logits / div
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return post if (cap or scale is not None or div is not None) else None


class ResponseNLL:
    """Sequences (ids, n_context) in, mean NLL of the tokens after the context out (float64)."""

    def __init__(self, model: torch.nn.Module, pad_id: int, token_budget: int) -> None:
        self.model, self.pad_id, self.token_budget = model, pad_id, token_budget
        self.device = next(model.parameters()).device
        self.tokens_forwarded = 0
        self.post = _post_head(model)
        self.split = self._split_head_ok()

    @torch.inference_mode()
    def _split_head_ok(self) -> bool:
        try:
            decoder, head = self.model.get_decoder(), self.model.get_output_embeddings()
        except Exception:  # noqa: BLE001 - an architecture without these accessors uses the full forward
            return False
        if decoder is None or head is None or decoder is self.model:
            return False
        self.decoder, self.head = decoder, head
        vocab = head.weight.shape[0]
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (1, 12), generator=g).to(self.device)
        mask = torch.ones_like(ids)
        try:
            ref = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            got = self._head(self.decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state[0])
        except Exception as e:  # noqa: BLE001
            log.warning("split LM head path failed (%s); using the full forward", e)
            return False
        ok = bool(torch.allclose(got, ref[0], rtol=1e-3, atol=1e-3 * max(1.0, ref.abs().max().item())))
        if not ok:
            log.warning("split LM head path differs from the model's logits; using the full forward")
        return ok

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.head(h).float()
        return self.post(logits) if self.post is not None else logits

    def _nll(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(logits, -1) - logits.gather(1, targets[:, None])[:, 0]

    @torch.inference_mode()
    def __call__(self, seqs: Sequence[tuple[list[int], int]]) -> np.ndarray:
        out = np.full(len(seqs), np.nan, dtype=np.float64)
        for mb in micro_batches([len(s[0]) for s in seqs], self.token_budget):
            T = max(len(seqs[i][0]) for i in mb)
            ids = torch.full((len(mb), T), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(mb), T), dtype=torch.long)
            rows, cols = [], []
            for r, i in enumerate(mb):
                s, n_ctx = seqs[i]
                ids[r, : len(s)] = torch.tensor(s)
                mask[r, : len(s)] = 1
                rows += [r] * (len(s) - n_ctx)
                cols += range(n_ctx - 1, len(s) - 1)  # position t-1 predicts token t
            ids, mask = ids.to(self.device), mask.to(self.device)
            self.tokens_forwarded += len(mb) * T
            rows_t = torch.tensor(rows, device=self.device)
            cols_t = torch.tensor(cols, device=self.device)
            targets = ids[rows_t, cols_t + 1]
            if self.split:
                hidden = self.decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
                h = hidden[rows_t, cols_t]  # [n_targets, d]
                step = max(1, _HEAD_CHUNK_ELEMENTS // self.head.weight.shape[0])
                nll = torch.cat([self._nll(self._head(h[a : a + step]), targets[a : a + step])
                                 for a in range(0, len(h), step)])
            else:
                logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                nll = self._nll(logits[rows_t, cols_t].float(), targets)
            sums = torch.zeros(len(mb), dtype=torch.float64, device=self.device).index_add_(0, rows_t, nll.double())
            counts = torch.bincount(rows_t, minlength=len(mb)).double()
            out[mb] = (sums / counts).cpu().numpy()
        return out


# ---------------------------------------------------------------------------------------------
# the Ray Data actor


class LMScorer:
    """Ray Data callable class: one base model per actor, loaded once in `__init__`."""

    def __init__(self, cfg: dict[str, Any] | LMConfig) -> None:
        self.cfg = cfg if isinstance(cfg, LMConfig) else from_dict(LMConfig, cfg)
        c = self.cfg
        device = resolve_device(c.model.device)
        if device.type == "cpu" and c.num_cpus >= 1:
            torch.set_num_threads(max(1, int(c.num_cpus)))
        self.tokenizer = load_tokenizer(c.model)
        model = load_model(c.model, device)
        self.builder = ExampleBuilder(self.tokenizer, "mean", c.max_tokens, c.pool.chat_template)
        self.nll = ResponseNLL(model, self.tokenizer.pad_token_id, c.token_budget)

    def __call__(self, table: pa.Table) -> pa.Table:
        return self.score_table(table)

    def score_table(self, table: pa.Table) -> pa.Table:
        c = self.cfg
        n = table.num_rows
        errors = row_errors(table, c.pool.text_columns)
        ok = [i for i in range(n) if errors[i] is None]
        prompts = table.column(c.pool.prompt_column).to_pylist()
        responses = table.column(c.pool.response_column).to_pylist()
        built = pair_tokens(self.builder, [prompts[i] for i in ok], [responses[i] for i in ok])
        rows, pairs = split_built(ok, built, errors)
        loss: list[float | None] = [None] * n
        uncond: list[float | None] = [None] * n
        ifd: list[float | None] = [None] * n
        n_tokens, truncated = [0] * n, [False] * n
        if pairs:
            m = len(pairs)
            # Both passes of every row in one list: micro-batches mix them by length.
            nll = self.nll([(p.cond, p.n_prompt) for p in pairs] + [(p.uncond, 1) for p in pairs])
            for j, i in enumerate(rows):
                lc, lu = float(nll[j]), float(nll[m + j])
                if not (math.isfinite(lc) and math.isfinite(lu)):
                    errors[i] = "non-finite loss"
                    continue
                loss[i], uncond[i] = lc, lu
                ifd[i] = math.exp(lc - lu)
                n_tokens[i] = len(pairs[j].cond) + len(pairs[j].uncond)
                truncated[i] = pairs[j].truncated
        schema = baseline_schema(table.schema.field(S.ID).type, LM_FIELDS)
        return scores_table(table, schema, loss, errors, n_tokens, truncated,
                            extra={LOSS: loss, UNCOND_LOSS: uncond, IFD: ifd})


def run(cfg: LMConfig) -> dict[str, Any]:
    """Write `cfg.out` with `loss`, `uncond_loss`, `ifd` (and `score` = loss). Returns the manifest."""
    import ray

    model_info(cfg.model)  # an unreadable model config fails here, before any output or actor

    def build(ds, pool):  # noqa: ANN001, ANN202
        return ds.map_batches(
            LMScorer,
            fn_constructor_kwargs={"cfg": to_dict(cfg)},
            batch_size=cfg.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=cfg.actors),
            num_gpus=cfg.num_gpus or None,
            num_cpus=cfg.num_cpus,
        )

    return run_stage("loss+ifd", cfg, cfg.pool, cfg.out, cfg.overwrite, build,
                     actor_pool=(cfg.actors, cfg.num_cpus, "actors × num_cpus"), resumable=True)
