"""Train a small SAE on a local causal LM's residual stream with sae-lens's own training runner.

`train_sae` wraps `sae_lens.LanguageModelSAETrainingRunner` (sae-lens 6.x,
`sae_lens/llm_sae_training_runner.py`, config in `sae_lens/config.py`): the model is loaded by the
runner as `AutoModelForCausalLM` from the local directory and hooked at the output of decoder block
`layer` (`model.layers.<layer>`, HF `hidden_states[layer + 1]`); the texts go in as a local,
pre-tokenized `datasets.Dataset` (`override_dataset`), packed into `context_size` windows by
sae-lens's own `concat_and_batch_sequences`, exactly as the runner packs raw text itself.

The saved SAE (`SAE.load_from_disk(out_dir)`) names its hook `blocks.<layer>.hook_resid_post`, the
convention of `igds_ray.models.loading`, and keeps the Hugging Face module name as metadata
`hf_hook_name`.

Architectures:

- `batchtopk` (default): BatchTopK training, which sae-lens saves as a **JumpReLU** SAE (one
  learned global threshold). Training keeps about `k` latents per token on average, and inference
  is per-latent (no top-k coupling), so igds_ray's `FeatureEncoder` can slice the few latents it
  needs instead of encoding all of them.
- `topk`: a TopK SAE with exactly `k` latents per token (inference needs the full encode).
- `jumprelu`: JumpReLU training with the quadratic L0 penalty around `target_l0 = k` and the
  straight-through gradient passed to the encoder (needed for a short run to reach L0 ~ k).

Special tokens (BOS, padding, chat markers) are excluded from training and from the quality stats,
as igds_ray never pools them. Activations are normalized to mean norm sqrt(d_in) during training
(`expected_average_only_in`), and the scale is folded back into the saved weights, so the saved
SAE reads raw residual-stream activations.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

ARCHITECTURES = ("batchtopk", "topk", "jumprelu")
_NORM_ESTIMATE_BATCHES = 8


def tl_hook_name(layer: int) -> str:
    """The hook name the saved SAE carries: the output of decoder block `layer`."""
    return f"blocks.{layer}.hook_resid_post"


def split_texts(texts: Sequence[str]) -> tuple[list[str], list[str]]:
    """(train, held-out): the last 10% of `texts` (at least one) are held out for the stats.

    With a single text there is nothing to hold out: it is used for both.
    """
    texts = list(texts)
    if len(texts) < 2:
        return texts, texts
    n_eval = max(1, len(texts) // 10)
    return texts[:-n_eval], texts[-n_eval:]


def _sae_training_config(architecture: str, d_in: int, d_sae: int, k: int) -> Any:
    from sae_lens import BatchTopKTrainingSAEConfig, JumpReLUTrainingSAEConfig, TopKTrainingSAEConfig

    common = dict(d_in=d_in, d_sae=d_sae, dtype="float32", device="cpu",
                  normalize_activations="expected_average_only_in")
    if architecture == "batchtopk":
        # The saved JumpReLU threshold is an EMA of each batch's smallest kept activation. At the
        # stock rate (0.01, a ~100-step window) it lags the still-growing activations of a run of a
        # few hundred steps and lands too low: L0 14 instead of 8 on the tiny model. 0.05 (~20 steps)
        # tracks them: L0 7.7.
        return BatchTopKTrainingSAEConfig(k=float(k), topk_threshold_lr=0.05, **common)
    if architecture == "topk":
        return TopKTrainingSAEConfig(k=int(k), **common)
    if architecture == "jumprelu":
        # Quadratic L0 penalty around k (Gemma Scope 2), with the straight-through gradient reaching
        # the encoder too: with it going to the threshold alone (the stock setting), Adam moves the
        # threshold ~lr per step and a short run ends at L0 ~425 of 512.
        return JumpReLUTrainingSAEConfig(jumprelu_sparsity_loss_mode="quadratic", target_l0=float(k),
                                         l0_coefficient=1.0, jumprelu_ste_to_input=True, **common)
    raise ValueError(f"architecture {architecture!r} is not one of {', '.join(ARCHITECTURES)}")


def _packed_dataset(tokenizer: Any, texts: Sequence[str], context_size: int) -> "datasets.Dataset":  # noqa: F821
    """`context_size` windows of token ids: BOS first, BOS between texts (sae-lens's own packing)."""
    import datasets
    from sae_lens.tokenization_and_batching import concat_and_batch_sequences

    ids = tokenizer(list(texts), add_special_tokens=False, return_attention_mask=False)["input_ids"]
    bos = tokenizer.bos_token_id
    windows = [
        w.tolist()
        for w in concat_and_batch_sequences(
            tokens_iterator=(torch.tensor(x, dtype=torch.long) for x in ids if len(x) > 0),
            context_size=context_size,
            begin_batch_token_id=bos,
            sequence_separator_token_id=bos,
        )
    ]
    if not windows:
        n = sum(len(x) for x in ids)
        raise ValueError(f"the training texts have {n} tokens: too few for one window of context_size={context_size}")
    return datasets.Dataset.from_dict({"input_ids": windows})


@contextlib.contextmanager
def _quiet(progress: bool) -> Iterator[None]:
    """Mute sae-lens's logger and its known warnings; without `progress`, its progress bars too."""
    import sae_lens.training.activation_scaler as scaler_mod
    import sae_lens.training.sae_trainer as trainer_mod

    from transformers.utils import logging as hf_logging

    sl_logger = logging.getLogger("sae_lens")
    level = sl_logger.level
    hf_bars = hf_logging.is_progress_bar_enabled()
    patched = {}
    with warnings.catch_warnings():
        for msg in (
            r"The training dataset contains fewer samples",  # always true: rows are windows, not tokens
            r"All samples in the training dataset have been exhausted",  # every epoch of a small corpus
            r"pretokenized dataset has context_size",
            r"To copy construct from a tensor",  # torch.tensor(row) in the activations store
        ):
            warnings.filterwarnings("ignore", message=msg)
        sl_logger.setLevel(logging.ERROR)
        if not progress:
            hf_logging.disable_progress_bar()
            for mod in (trainer_mod, scaler_mod):
                patched[mod] = mod.tqdm
                mod.tqdm = functools.partial(mod.tqdm, disable=True)
        try:
            yield
        finally:
            sl_logger.setLevel(level)
            if hf_bars:
                hf_logging.enable_progress_bar()
            for mod, orig in patched.items():
                mod.tqdm = orig


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _runner_class() -> type:
    from sae_lens import LanguageModelSAETrainingRunner

    class _Runner(LanguageModelSAETrainingRunner):
        """The sae-lens runner, with three changes that do not touch training itself.

        - the saved metadata names the hook the igds_ray way (`blocks.L.hook_resid_post`);
        - no process-wide SIGINT/SIGTERM handlers (the stock runner installs them and never restores
          them, and `signal.signal` fails outside the main thread, e.g. in a Ray worker thread);
        - the progress bar moves every few steps (stock: every 100) and the trainer is kept for stats.
        """

        tl_hook: str
        pbar_interval: int = 100
        trainer: Any = None

        def _set_sae_metadata(self) -> None:
            super()._set_sae_metadata()
            meta = self.sae.cfg.metadata
            meta.hf_hook_name = self.cfg.hook_name
            meta.hook_name = self.tl_hook
            # Loading kwargs are a HookedTransformer notion: left in, every SAE load warns about them.
            meta.model_dtype = (self.cfg.model_from_pretrained_kwargs or {}).get("dtype")
            meta.model_from_pretrained_kwargs = None

        def run_trainer_with_interruption_handling(self, trainer: Any) -> Any:
            self.trainer = trainer
            if hasattr(trainer, "_update_pbar"):
                update = type(trainer)._update_pbar
                trainer._update_pbar = lambda out, pbar: update(trainer, out, pbar, update_interval=self.pbar_interval)
            return trainer.fit()

    return _Runner


@torch.no_grad()
def sae_quality(sae: Any, hidden: torch.Tensor) -> dict[str, float]:
    """L0, fraction of variance explained and dead-latent fraction of `sae` on activations [n, d_in].

    FVE = 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the n tokens (sae-lens's
    `metrics/explained_variance`).
    """
    x = hidden.to(sae.W_enc.dtype)
    acts = sae.encode(x)
    recon = sae.decode(acts)
    active = acts != 0
    resid = (x - recon).pow(2).sum()
    total = (x - x.mean(0)).pow(2).sum()
    return {
        "l0": float(active.float().sum(-1).mean()),
        "fve": float(1.0 - resid / total),
        "dead_fraction": float((~active.any(0)).float().mean()),
    }


def residual_activations(model: Any, tokenizer: Any, texts: Sequence[str], layer: int,
                         context_size: int, batch_size: int = 32) -> torch.Tensor:
    """Output of decoder block `layer` at every non-special token of `texts` (each with its BOS, truncated to
    `context_size` tokens), as igds_ray's `LayerRunner` computes it: [n_tokens, d_model]. Where the tokenizer
    adds no BOS, the first token (the attention sink, `tokenize.pools_first_token`) is left out too."""
    from igds_ray.models.runner import LayerRunner
    from igds_ray.tokenize import pooled_mask

    runner = LayerRunner(model, layer, prune=False)
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[i : i + batch_size]), return_tensors="pt", padding=True, truncation=True,
                        max_length=context_size)
        hidden = runner(enc["input_ids"], enc["attention_mask"])
        keep = pooled_mask(enc["input_ids"], enc["attention_mask"], tokenizer)
        out.append(hidden[keep].float())
    return torch.cat(out)


def train_sae(
    model_dir: str | Path,
    texts: Sequence[str],
    layer: int,
    out_dir: str | Path,
    *,
    d_sae: int = 512,
    architecture: str = "batchtopk",
    k: int = 8,
    training_tokens: int = 500_000,
    context_size: int = 64,
    batch_size_tokens: int = 2048,
    lr: float = 4e-4,
    seed: int = 0,
    progress: bool = True,
    threads: int | None = 1,
) -> dict:
    """Train an SAE on the output of decoder block `layer` of the causal LM in `model_dir`, save it to
    `out_dir` (`SAE.load_from_disk(out_dir)`), and return stats.

    The last 10% of `texts` are held out (see `split_texts`) and only used for the stats: `l0`
    (mean active latents per token), `fve` (fraction of variance explained), `dead_fraction`
    (latents never active on the held-out tokens), with `wall_s`, `tokens_trained`, `hook_name`,
    `architecture` (as trained) and `saved_architecture` (as saved: BatchTopK saves as JumpReLU).

    CPU, float32, no hub access: works with HF_HUB_OFFLINE=1. Seeded: two calls with the same
    arguments give bit-identical weights (the global torch RNG is restored afterwards).

    `threads`: torch intra-op threads while this runs (restored afterwards; None: leave torch's
    setting). The matrices are tiny (d_in x d_sae), so one thread is about as fast as several on an
    idle machine and several times faster on a busy one, where OpenMP threads wait on each other;
    a fixed count also keeps float reductions, and so the weights, the same from machine to machine.
    """
    t0 = time.time()
    from sae_lens import SAE, LanguageModelSAERunnerConfig, LoggingConfig
    from transformers import AutoConfig, AutoTokenizer

    from igds_ray.config import ModelConfig, SAEConfig
    from igds_ray.models.loading import check_compatible, model_info, sae_info

    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture {architecture!r} is not one of {', '.join(ARCHITECTURES)}")
    if not texts:
        raise ValueError("no texts to train on")
    if min(d_sae, k, training_tokens, context_size, batch_size_tokens) < 1:
        raise ValueError("d_sae, k, training_tokens, context_size and batch_size_tokens must be >= 1")
    if k > d_sae:
        raise ValueError(f"k={k} exceeds d_sae={d_sae}")
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    hf_cfg = AutoConfig.from_pretrained(model_dir)
    text_cfg = hf_cfg.get_text_config() if hasattr(hf_cfg, "get_text_config") else hf_cfg
    d_in, n_layers = int(text_cfg.hidden_size), int(text_cfg.num_hidden_layers)
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} is out of range for a model of {n_layers} layers")

    train_texts, eval_texts = split_texts(texts)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset = _packed_dataset(tokenizer, train_texts, context_size)

    total_steps = math.ceil(training_tokens / batch_size_tokens)
    cfg = LanguageModelSAERunnerConfig(
        sae=_sae_training_config(architecture, d_in, d_sae, k),
        model_name=str(model_dir),
        model_class_name="AutoModelForCausalLM",
        model_from_pretrained_kwargs={"dtype": "float32"},
        hook_name=f"model.layers.{layer}",
        dataset_path="",
        streaming=False,
        is_dataset_tokenized=True,
        context_size=context_size,
        # The mixing buffer holds n_batches_in_buffer * context_size tokens and must hold at least
        # one training batch (sae-lens raises otherwise): 4 batches, for some shuffling.
        n_batches_in_buffer=max(2, math.ceil(4 * batch_size_tokens / context_size)),
        store_batch_size_prompts=max(1, batch_size_tokens // context_size),
        training_tokens=training_tokens,
        train_batch_size_tokens=batch_size_tokens,
        exclude_special_tokens=True,
        prepend_bos=True,
        lr=lr,
        lr_scheduler_name="constant",
        lr_decay_steps=total_steps // 5,  # linear decay over the last 20%
        # A latent silent for ~1/8 of the run counts as dead (TopK's AuxK loss revives those);
        # the stock 1000 steps would never trigger in a short run.
        dead_feature_window=max(10, min(1000, total_steps // 8)),
        n_batches_for_norm_estimate=_NORM_ESTIMATE_BATCHES,
        device="cpu",
        dtype="float32",
        seed=seed,  # recorded only: sae-lens does not seed anything itself, see fork_rng below
        logger=LoggingConfig(log_to_wandb=False),
        n_checkpoints=0,
        checkpoint_path=None,
        output_path=str(out_dir),
        verbose=False,
    )

    with _quiet(progress), _torch_threads(threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # SAE init and the activation mixing buffer's shuffles
        runner_cls = _runner_class()
        runner = runner_cls(cfg, override_dataset=dataset)
        runner.tl_hook = tl_hook_name(layer)
        runner.pbar_interval = max(1, total_steps // 50)
        runner.run()
        tokens_trained = int(runner.trainer.n_training_samples) if runner.trainer is not None else (
            total_steps * batch_size_tokens)
        train_s = time.time() - t0

        # Quality, measured on what was saved, through the loaders the package uses.
        saved = SAE.load_from_disk(str(out_dir), device="cpu")
        check_compatible(model_info(ModelConfig(name_or_path=str(model_dir))), sae_info(SAEConfig(path=str(out_dir))))
        hidden = residual_activations(runner.model.model, tokenizer, eval_texts, layer, context_size)
        stats = sae_quality(saved, hidden)
    return {
        "wall_s": round(time.time() - t0, 3),
        "train_s": round(train_s, 3),
        "tokens_trained": tokens_trained,
        "training_steps": total_steps,
        "l0": stats["l0"],
        "fve": stats["fve"],
        "dead_fraction": stats["dead_fraction"],
        "hook_name": saved.cfg.metadata.hook_name,
        "architecture": architecture,
        "saved_architecture": saved.cfg.architecture(),
        "d_in": d_in,
        "d_sae": d_sae,
        "n_train_texts": len(train_texts),
        "n_train_windows": len(dataset),
        "n_eval_texts": len(eval_texts),
        "n_eval_tokens": int(hidden.shape[0]),
        "out_dir": str(out_dir),
    }
