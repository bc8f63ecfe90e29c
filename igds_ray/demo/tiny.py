"""Tiny, real fixtures built deterministically in code and saved through the libraries' own writers.

Tests and the demo load them back through the same loaders users use (`AutoModelForCausalLM`,
`AutoTokenizer`, `SAE.load_from_disk`), so nothing on the user path is faked.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
USER, ASSISTANT = "<|user|>", "<|assistant|>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>\n{% else %}<|assistant|>\n{% endif %}{{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_WORDS = (
    "the a one two three cat dog bird tree river stone apple price total sum count each more less "
    "has gives buys sells left after before then how many much what is are was were and or of to in "
    "on with for from by at story weather sunny rain cold warm city capital north south east west"
).split()


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    """A small mixed corpus: arithmetic sentences and plain text (for training the tokenizer)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if i % 2 == 0:
            a, b = rng.randint(2, 99), rng.randint(2, 99)
            out.append(f"Tom has {a} apples and buys {b} more. How many apples? {a} + {b} = {a + b} #### {a + b}")
        else:
            out.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 20))) + ".")
    return out


def build_tokenizer(texts: Iterable[str], vocab_size: int = 384) -> "PreTrainedTokenizerFast":  # noqa: F821
    """Byte-level BPE (digits split into single tokens) that adds BOS like Llama's tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, USER, ASSISTANT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(list(texts), trainer=trainer)
    bos_id = tk.token_to_id(BOS)
    tk.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[USER, ASSISTANT],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_llama(
    vocab_size: int,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    intermediate_size: int = 256,
    max_position_embeddings: int = 512,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    bos_token_id: int = 1,
    eos_token_id: int = 2,
    pad_token_id: int = 0,
) -> "LlamaForCausalLM":  # noqa: F821
    """A Llama-architecture causal LM with seeded random weights (head_dim 64 by default: vLLM-CPU-safe)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        rms_norm_eps=1e-5,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    return model.eval()


def build_sae(
    d_in: int,
    d_sae: int,
    hook_name: str,
    architecture: str = "standard",
    calibration: torch.Tensor | None = None,
    active_fraction: float = 0.25,
    seed: int = 0,
    k: int = 8,
) -> "SAE":  # noqa: F821
    """An sae-lens SAE with seeded weights.

    With `calibration` activations [n, d_in], each latent's bias (and JumpReLU threshold) is set so
    that it fires on about `active_fraction` of them: features that vary across examples, as a
    trained SAE's do.
    """
    from sae_lens import SAE

    cfg = dict(architecture=architecture, d_in=d_in, d_sae=d_sae, dtype="float32", device="cpu",
               metadata=dict(hook_name=hook_name))
    if architecture == "topk":
        cfg["k"] = k
    sae = SAE.from_dict(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w_dec = torch.randn(d_sae, d_in, generator=g)
        w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True)
        sae.W_dec.copy_(w_dec)
        sae.W_enc.copy_(w_dec.T)
        sae.b_dec.zero_()
        if calibration is not None:
            pre = calibration.float() @ sae.W_enc
            q = torch.quantile(pre, 1.0 - active_fraction, dim=0)
            if architecture == "jumprelu":
                # Half the margin in the bias, half in the threshold: both paths of JumpReLU matter.
                sae.b_enc.copy_(-q / 2)
                sae.threshold.copy_((q / 2).clamp(min=1e-3))
            else:
                sae.b_enc.copy_(-q)
        elif hasattr(sae, "threshold"):
            sae.threshold.fill_(0.01)
    return sae.eval()


@dataclass(frozen=True)
class TinyWorld:
    root: Path
    model_dir: Path
    saes: dict[str, Path]  # architecture -> SAE dir
    pool_dir: Path
    layer: int
    d_sae: int


def make_rows(n: int, seed: int = 0) -> list[dict]:
    """Prompt/response rows with a text column too: math (correct and wrong answers) and off-task text."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        kind = rng.random()
        if kind < 0.4:
            prompt = f"Tom has {a} apples and buys {b} more. How many apples?"
            response = f"{a} + {b} = {a + b} #### {a + b}"
        elif kind < 0.6:
            wrong = a + b + rng.randint(1, 9)
            prompt = f"Ann had {a + b} stones and gave {b} away. How many are left?"
            response = f"{a + b} - {b} = {wrong} #### {wrong}"
        else:
            prompt = "Tell me about the " + " ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 8)))
            response = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 25))) + "."
        rows.append({"prompt": prompt, "response": response, "text": f"{prompt} {response}"})
    return rows


def write_pool(
    out_dir: Path, rows: Sequence[dict], n_files: int = 2, with_ids: bool = False, row_group_size: int | None = None
) -> Path:
    """Write rows as `n_files` Parquet files (contiguous slices) under `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, len(rows), n_files + 1).astype(int)
    for f in range(n_files):
        part = rows[bounds[f] : bounds[f + 1]]
        cols = {k: [r.get(k) for r in part] for k in (part[0].keys() if part else ("prompt", "response", "text"))}
        if with_ids:
            cols = {"id": [f"row-{i}" for i in range(bounds[f], bounds[f + 1])], **cols}
        pq.write_table(pa.table(cols), out_dir / f"part-{f:03d}.parquet", row_group_size=row_group_size)
    return out_dir


def build_world(
    root: Path,
    n_rows: int = 200,
    n_files: int = 2,
    hidden_size: int = 128,
    num_layers: int = 2,
    layer: int = 0,
    d_sae: int = 64,
    architectures: Sequence[str] = ("standard", "jumprelu"),
    seed: int = 0,
) -> TinyWorld:
    """Tokenizer + tiny Llama + SAEs at `model.layers.<layer>` + a Parquet pool, all saved under `root`."""
    root = Path(root)
    tok = build_tokenizer(corpus(seed=seed))
    model = build_llama(
        vocab_size=len(tok), hidden_size=hidden_size, num_layers=num_layers, seed=seed,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)

    rows = make_rows(n_rows, seed=seed)
    # Calibrate the SAEs on the model's own residual stream over the pool's texts.
    from igds_ray.models.runner import LayerRunner

    enc = tok([r["text"] for r in rows[:64]], return_tensors="pt", padding=True)
    hidden = LayerRunner(model, layer, prune=False)(enc["input_ids"], enc["attention_mask"])
    calib = hidden[enc["attention_mask"].bool()]
    saes = {}
    for i, arch in enumerate(architectures):
        sae = build_sae(hidden_size, d_sae, f"blocks.{layer}.hook_resid_post", arch, calibration=calib, seed=seed + i)
        sae_dir = root / f"sae_{arch}"
        sae.save_model(sae_dir)
        saes[arch] = sae_dir
    pool_dir = write_pool(root / "pool", rows, n_files=n_files)
    return TinyWorld(root, model_dir, saes, pool_dir, layer, d_sae)


PLANTED_TARGET = " apples"


def build_planted_world(root: Path, planted: int = 9, n_rows: int = 120, seed: int = 1) -> Path:
    """A tiny Llama + SAE on its last block in which one weak latent writes the unembedding of
    `PLANTED_TARGET`: amplifying it makes the model say that word. Every other latent is a calibrated
    random one, most with a higher mean activation, so frequency recall alone ranks the planted one
    low and only the causal filter can find it. Writes `model/`, `sae/` and `task.parquet`
    (columns source, reference) under `root`.
    """
    import pandas as pd

    from igds_ray.models.runner import LayerRunner

    root = Path(root)
    tok = build_tokenizer(corpus())
    model = build_llama(len(tok), num_layers=2, seed=seed, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    prompts = [r["prompt"] for r in make_rows(n_rows, seed=seed + 4)]
    enc = tok(prompts[:48], return_tensors="pt", padding=True)
    hidden = LayerRunner(model, 1, prune=False)(enc["input_ids"], enc["attention_mask"])
    sae = build_sae(model.config.hidden_size, 64, "blocks.1.hook_resid_post", "standard",
                    calibration=hidden[enc["attention_mask"].bool()], active_fraction=0.35, seed=seed + 2)
    (target_id,) = tok(PLANTED_TARGET, add_special_tokens=False).input_ids
    u = model.lm_head.weight[target_id].detach()
    with torch.no_grad():
        sae.W_enc[:, planted] = 0
        sae.b_enc[planted] = 0.002  # always active, weakly
        sae.W_dec[planted] = 8000 * u / u.norm()
    sae.save_model(root / "sae")
    pd.DataFrame({"source": prompts, "reference": [PLANTED_TARGET.strip()] * len(prompts)}).to_parquet(
        root / "task.parquet")
    return root


def says_target_task() -> "FunctionTask":  # noqa: F821
    """The planted world's task: 1 when the completion contains the target word."""
    from igds_ray.tasks import FunctionTask

    word = PLANTED_TARGET.strip()
    return FunctionTask("says_target", None, lambda ans, ex: 1.0 if word in ans else 0.0)
