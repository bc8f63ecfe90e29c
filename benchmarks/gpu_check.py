"""One-shot GPU check of igds_ray's GPU paths on a Gemma-2-2B shape with random weights (bf16 on CUDA).

Device command (once, from the repo root; that machine has no ray, sae_lens, vllm or network):

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/gpu_check.py --device cuda --out $OUT

CPU dry run:  .venv/bin/python benchmarks/gpu_check.py --device cpu --tiny
Sections (`--sections score,generate,finetune`; `env`, with versions and a bf16 matmul ceiling, always
runs), each in its own try/except; <out>/gpu_check.json is rewritten after each, one JSON line at the end.
  score     package scorer (stages.score.PooledFeatureActs: LayerRunner to block L + FeatureEncoder, k=4,
            mean pooling), the same on device tensors ("core"), and the naive path (full forward with
            output_hidden_states, full sae.encode, slice): tokens/s, peak memory, max |scorer - naive|
  generate  HFBackend (real constructor, loaders patched to return in-memory objects), greedy, without
            and with one SAE feature amplified x4: new tokens/s
  finetune  train_loop needs Ray Train, so its inner step is re-implemented on peft + AdamW with the
            package's lora_config/collate: LoRA on a bf16 base, and full (float32 master weights + bf16
            autocast, as the package trains): steps/s, tokens/s, peak memory
The SAE is sae-lens's JumpReLUSAE when sae_lens imports, else a plain-torch module with the same parameter
names and encode/decode (igds_ray dispatches on the class name, so it is named alike).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, NamedTuple
from unittest import mock

if "PYTORCH_ALLOC_CONF" not in os.environ and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
    os.environ["PYTORCH_ALLOC_CONF"] = "expandable_segments:True"  # fewer OOMs from fragmentation
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

T0 = time.perf_counter()
FEATURES = (11, 500, 4000, 9000)


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


class Shape(NamedTuple):
    layers: int
    hidden: int
    heads: int
    kv: int
    head_dim: int
    mlp: int
    vocab: int
    layer: int
    d_sae: int
    score_batches: tuple[int, ...]  # rows of score_len tokens
    score_len: int
    gen_prompts: int
    gen_tokens: int
    ft_batch: int  # rows of ft_len tokens
    ft_len: int
    ft_steps: int  # timed LoRA steps (full: half as many)
    matmul_n: int


def gemma_shape() -> Shape:
    try:  # one source of truth for the shape when the benchmark module imports
        from benchmarks.score_throughput import SHAPES
        layers, hidden, heads, kv, mlp, vocab, layer, d_sae, _ = SHAPES["gemma2-2b"]
    except Exception:  # noqa: BLE001
        layers, hidden, heads, kv, mlp, vocab, layer, d_sae = 26, 2304, 8, 4, 9216, 256000, 12, 16384
    return Shape(layers, hidden, heads, kv, 256, mlp, vocab, layer, d_sae, (32, 64, 128), 256, 64, 64, 16, 512, 20, 8192)


TINY = Shape(4, 64, 4, 2, 16, 128, 1024, 2, 256, (2, 4), 32, 4, 8, 2, 64, 3, 256)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def free(dev: torch.device, reset_peak: bool = False) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        if reset_peak:
            torch.cuda.reset_peak_memory_stats(dev)


def peak_gb(dev: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if dev.type == "cuda" else None


def timed(fn: Callable[[], Any], reps: int, dev: torch.device) -> tuple[float, Any]:
    """Median seconds of `reps` calls after one warm-up call (CUDA events on a GPU); the last result."""
    from igds_ray.timing import time_call

    fn()
    sync(dev)
    times, res = [], None
    for _ in range(reps):
        dt, res = time_call(fn, dev)
        times.append(dt)
    return statistics.median(times), res


def tokenizer() -> Any:
    from igds_ray.demo.tiny import build_tokenizer, corpus

    return build_tokenizer(corpus())  # byte-level BPE of 384 ids: valid in any larger vocab


def build_model(sh: Shape, dev: torch.device, dtype: torch.dtype, tok: Any) -> nn.Module:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=sh.vocab, hidden_size=sh.hidden, num_hidden_layers=sh.layers,
                       num_attention_heads=sh.heads, num_key_value_heads=sh.kv, head_dim=sh.head_dim,
                       intermediate_size=sh.mlp, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device(dev):  # random init on the GPU: much faster than on the CPU
        model = Gemma2ForCausalLM(cfg)
    return model.to(dtype).eval()


class JumpReLUSAE(nn.Module):
    """sae-lens JumpReLUSAE inference semantics: acts = relu(pre) * (pre > threshold) with
    pre = (x.to(dtype) - b_dec * apply_b_dec_to_input) @ W_enc + b_enc;  decode = acts @ W_dec + b_dec."""

    def __init__(self, d_in: int, d_sae: int, hook_name: str, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.cfg = SimpleNamespace(d_in=d_in, d_sae=d_sae, architecture="jumprelu", apply_b_dec_to_input=True,
                                   normalize_activations="none", dtype=str(dtype).replace("torch.", ""),
                                   metadata=SimpleNamespace(hook_name=hook_name))
        self.dtype = dtype
        self.activation_fn = nn.ReLU()
        for name, shape in (("W_enc", (d_in, d_sae)), ("b_enc", (d_sae,)), ("threshold", (d_sae,)),
                            ("W_dec", (d_sae, d_in)), ("b_dec", (d_in,))):
            setattr(self, name, nn.Parameter(torch.zeros(*shape, dtype=dtype)))

    def process_sae_in(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype) - self.b_dec * self.cfg.apply_b_dec_to_input

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.process_sae_in(x) @ self.W_enc + self.b_enc
        return self.activation_fn(pre) * (pre > self.threshold).to(pre.dtype)

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        return acts @ self.W_dec + self.b_dec


def make_sae(sh: Shape, dev: torch.device) -> tuple[Any, str]:
    hook = f"blocks.{sh.layer}.hook_resid_post"
    try:
        import sae_lens

        from igds_ray.demo.tiny import build_sae
        sae, impl = build_sae(sh.hidden, sh.d_sae, hook, "jumprelu", seed=0), f"sae_lens {sae_lens.__version__} JumpReLUSAE"
    except ImportError:
        sae, impl = JumpReLUSAE(sh.hidden, sh.d_sae, hook), "plain-torch JumpReLU (sae_lens not installed on the device)"
        g = torch.Generator().manual_seed(0)  # the weights build_sae draws
        with torch.no_grad():
            w = torch.randn(sh.d_sae, sh.hidden, generator=g)
            w = w / w.norm(dim=-1, keepdim=True)
            sae.W_dec.copy_(w)
            sae.W_enc.copy_(w.T)
    with torch.no_grad():  # plausible sparsity, as benchmarks/score_throughput.py sets it
        sae.threshold.fill_(0.05)
    return sae.to(dev).eval(), impl


def section_env(sh: Shape, dev: torch.device, dtype: torch.dtype, reps: int) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__, "device": str(dev),
                           "dtype": str(dtype).replace("torch.", ""),
                           "alloc_conf": os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF")}
    for pkg in ("transformers", "peft", "accelerate", "sae-lens", "ray", "vllm"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        out.update(gpu=p.name, gpu_mem_gb=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
                   cuda=torch.version.cuda, fp32_matmul_precision=torch.get_float32_matmul_precision())
    n = sh.matmul_n
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    t, _ = timed(lambda: [a @ b for _ in range(reps)], 3, dev)
    out[f"matmul_{n}_tflops"] = round(2 * n**3 * reps / t / 1e12, 2)
    return out


def section_score(sh: Shape, dev: torch.device, dtype: torch.dtype, reps: int) -> dict[str, Any]:
    from igds_ray.models.runner import FeatureEncoder, LayerRunner
    from igds_ray.stages.score import PooledFeatureActs
    from igds_ray.tokenize import Example

    tok = tokenizer()
    model = build_model(sh, dev, dtype, tok)
    sae, impl = make_sae(sh, dev)
    feats = [f % sh.d_sae for f in FEATURES]
    encoder = FeatureEncoder(sae, feats)
    runner = LayerRunner(model, sh.layer, prune=False)  # keep every block: the naive path needs them
    L = sh.score_len
    out: dict[str, Any] = {"sae_impl": impl, "features": feats, "layer": sh.layer, "seq_len": L, "pooling": "mean",
                           "encoder_sliced": encoder.sliced, "attn_impl": model.config._attn_implementation, "batches": []}
    g = torch.Generator().manual_seed(1)
    for B in sh.score_batches:
        ids = torch.randint(3, sh.vocab, (B, L), generator=g)
        ids[:, 0] = tok.bos_token_id  # BOS is not pooled: positions 1..L-1
        examples = [Example(input_ids=r.tolist(), positions=list(range(1, L)), truncated=False) for r in ids]
        scorer = PooledFeatureActs(runner, encoder, tok.pad_token_id, "mean", token_budget=B * L)  # one micro-batch
        ids_d, mask_d = ids.to(dev), torch.ones_like(ids).to(dev)

        @torch.inference_mode()
        def core() -> torch.Tensor:
            return encoder(runner(ids_d, mask_d)[:, 1:]).float().mean(1)

        @torch.inference_mode()
        def naive() -> torch.Tensor:
            o = model(input_ids=ids_d, attention_mask=mask_d, output_hidden_states=True, use_cache=False)
            return sae.encode(o.hidden_states[sh.layer + 1][:, 1:])[..., feats].float().mean(1)

        row: dict[str, Any] = {"batch": B, "tokens": B * L}
        res = {}
        for name, fn in (("scorer", lambda: scorer(examples)), ("core", core), ("naive", naive)):
            free(dev, reset_peak=True)
            t, res[name] = timed(fn, reps, dev)
            row.update({f"{name}_s": round(t, 4), f"{name}_tokens_per_s": round(B * L / t, 1),
                        f"{name}_peak_gb": peak_gb(dev)})
        naive_np = res["naive"].cpu().numpy()
        row["max_abs_diff_scorer_vs_naive"] = float(abs(res["scorer"] - naive_np).max())
        row["max_abs_diff_core_vs_naive"] = float(abs(res["core"].cpu().numpy() - naive_np).max())
        row["mean_abs_score"] = float(abs(naive_np).mean())
        row["speedup_scorer_vs_naive"] = round(row["naive_s"] / row["scorer_s"], 3)
        out["batches"].append(row)
        log(f"score B={B}: {row}")
    return out


def section_generate(sh: Shape, dev: torch.device, dtype: torch.dtype, reps: int) -> dict[str, Any]:
    import igds_ray.generation.hf as hf
    from igds_ray.config import ModelConfig, SAEConfig
    from igds_ray.demo.tiny import corpus
    from igds_ray.generation.base import Intervention, SamplingConfig

    tok = tokenizer()
    model = build_model(sh, dev, dtype, tok)
    sae, impl = make_sae(sh, dev)
    with mock.patch.multiple(hf, load_tokenizer=lambda cfg: tok, load_model=lambda cfg, device=None: model,
                             load_sae=lambda cfg, device: sae):  # the real constructor, no 5 GB save/load
        be = hf.HFBackend(ModelConfig(name_or_path="in-memory"), SAEConfig(path="in-memory"), device=dev,
                          batch_size=sh.gen_prompts)
    prompts = corpus(sh.gen_prompts, seed=5)
    feat = FEATURES[0] % sh.d_sae
    calls: list[int] = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    out: dict[str, Any] = {"sae_impl": impl, "prompts": len(prompts), "max_new_tokens": sh.gen_tokens, "feature": feat,
                           "attn_impl": model.config._attn_implementation,
                           "construction": "HFBackend.__init__ with load_tokenizer/load_model/load_sae patched"}
    texts: dict[str, list[str]] = {}
    amplify = Intervention(layer=sh.layer, features=(feat,), factor=4.0)
    # Warm-up at the timed shapes (a first full-size call pays kernel selection: 6 s vs 1.6 s seen on an H200).
    for iv in (None, amplify):
        be.generate(prompts, SamplingConfig(max_new_tokens=sh.gen_tokens, temperature=0.0), iv)
    for name, iv in (("none", None), ("amplify_x4", amplify)):
        times = []
        for _ in range(max(1, reps)):
            free(dev, reset_peak=True)
            calls.clear()
            sync(dev)
            t = time.perf_counter()
            texts[name] = be.generate(prompts, SamplingConfig(max_new_tokens=sh.gen_tokens, temperature=0.0), iv)
            sync(dev)
            times.append(time.perf_counter() - t)
        dt = statistics.median(times)
        steps = len(calls)  # one forward per new token (prefill included); rows past EOS still run
        out[name] = {"s": round(dt, 3), "forward_calls": steps, "new_tokens": steps * len(prompts),
                     "new_tokens_per_s": round(steps * len(prompts) / dt, 1), "ms_per_step": round(1e3 * dt / steps, 2),
                     "peak_gb": peak_gb(dev)}
        log(f"generate {name}: {out[name]}")
    handle.remove()
    out["hook_calls"] = be.hook_calls
    out["rows_changed_by_intervention"] = sum(a != b for a, b in zip(texts["none"], texts["amplify_x4"]))
    out["slowdown_with_intervention"] = round(out["amplify_x4"]["s"] / out["none"]["s"], 3)
    be.close()
    return out


def _train(model: nn.Module, batch: dict[str, torch.Tensor], steps: int, amp: bool, dev: torch.device) -> dict[str, Any]:
    """train_loop's inner step: forward, float32 CE on target positions, backward, clip 1.0, AdamW 2e-4."""
    from igds_ray.stages.finetune import IGNORE_INDEX

    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=2e-4)
    n_targets = int((batch["labels"] != IGNORE_INDEX).sum())
    losses: list[float] = []

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16) if amp else nullcontext():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            tgt = batch["labels"][:, 1:]
            keep = tgt != IGNORE_INDEX
            loss = torch.nn.functional.cross_entropy(logits[:, :-1][keep].float(), tgt[keep], reduction="sum")
            (loss / n_targets).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()) / n_targets)  # the package syncs on the loss every step too

    for _ in range(2):
        step()
    free(dev, reset_peak=True)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync(dev)
    dt = time.perf_counter() - t
    B, T = batch["input_ids"].shape
    return {"batch": B, "seq_len": T, "steps": steps, "s": round(dt, 3), "steps_per_s": round(steps / dt, 3),
            "tokens_per_s": round(steps * B * T / dt, 1), "peak_gb": peak_gb(dev),
            "trainable_params": sum(p.numel() for p in trainable), "loss_first": losses[0], "loss_last": losses[-1]}


def section_finetune(sh: Shape, dev: torch.device, dtype: torch.dtype, reps: int) -> dict[str, Any]:
    from peft import get_peft_model

    from igds_ray.config import ModelConfig
    from igds_ray.stages.finetune import IGNORE_INDEX, FinetuneConfig, TrainExample, collate, lora_config

    tok = tokenizer()
    fcfg = FinetuneConfig(model=ModelConfig(name_or_path="in-memory"), data="unused", out="unused")
    lcfg = lora_config(fcfg)

    def batch_of(B: int) -> dict[str, torch.Tensor]:
        exs, p = [], sh.ft_len // 8  # the first p tokens are "prompt": no loss
        for r in torch.randint(3, sh.vocab, (B, sh.ft_len), generator=torch.Generator().manual_seed(2)).tolist():
            r[0] = tok.bos_token_id
            exs.append(TrainExample(r, [IGNORE_INDEX] * p + r[p:]))
        return {k: v.to(dev) for k, v in collate(exs, tok.pad_token_id).items()}

    def lora(B: int) -> dict[str, Any]:
        torch.manual_seed(fcfg.seed)
        model = get_peft_model(build_model(sh, dev, dtype, tok), lcfg).train()
        return {"base_dtype": str(dtype).replace("torch.", ""), **_train(model, batch_of(B), sh.ft_steps, False, dev)}

    def full(B: int) -> dict[str, Any]:  # the package's `full`: float32 master weights, bf16 autocast on CUDA
        model = build_model(sh, dev, torch.float32, tok).train()
        amp = dev.type == "cuda"
        return {"weights": "float32", "autocast_bf16": amp, **_train(model, batch_of(B), max(3, sh.ft_steps // 2), amp, dev)}

    out: dict[str, Any] = {"note": "stages.finetune.train_loop needs Ray Train; its inner step is re-implemented here "
                                   "with the package's lora_config, collate and IGNORE_INDEX",
                           "lora": {"r": fcfg.lora_r, "alpha": fcfg.lora_alpha, "dropout": fcfg.lora_dropout,
                                    "target_modules": sorted(lcfg.target_modules)}}
    for name, fn in (("lora_step", lora), ("full_step", full)):
        oom: str | None = None
        for B in (sh.ft_batch, sh.ft_batch // 2):  # one retry at half the batch after an OOM
            try:
                out[name] = {**fn(B), **({"after_oom": oom} if oom else {})}
                break
            except Exception as e:  # noqa: BLE001 - keep the other half
                oom = f"batch {B}: {type(e).__name__}: {str(e)[:500]}"
                out[name] = {"error": oom, "traceback": traceback.format_exc()[-1500:]}
                if not isinstance(e, torch.cuda.OutOfMemoryError) or B <= 1:
                    break
            finally:
                free(dev)
        log(f"finetune {name}: {out[name]}")
    return out


SECTIONS = {"env": section_env, "score": section_score, "generate": section_generate, "finetune": section_finetune}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny shape (CPU dry run)")
    p.add_argument("--out", type=Path, default=None, help="directory for gpu_check.json")
    p.add_argument("--sections", default="score,generate,finetune")
    p.add_argument("--max-s", type=float, default=420.0, help="skip sections that would start after this many seconds")
    args = p.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch.cuda.is_available() is False")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    sh = TINY if args.tiny else gemma_shape()
    wanted = [s.strip() for s in args.sections.split(",") if s.strip() and s.strip() != "env"]
    if set(wanted) - set(SECTIONS):
        raise SystemExit(f"unknown sections {sorted(set(wanted) - set(SECTIONS))}; choose from score,generate,finetune")
    results: dict[str, Any] = {"shape": "tiny" if args.tiny else "gemma2-2b", "shape_params": sh._asdict()}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    for name in ["env", *wanted]:
        if time.perf_counter() - T0 > args.max_s:
            results[name] = {"skipped": f"time limit of {args.max_s}s reached"}
            continue
        log(f"section {name} ...")
        t = time.perf_counter()
        try:  # one failed section must not lose the others
            reps = (20 if name == "env" else 3) if dev.type == "cuda" else 1
            results[name] = SECTIONS[name](sh, dev, dtype, reps)
        except Exception as e:  # noqa: BLE001
            results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
            log(f"section {name} FAILED: {type(e).__name__}: {e}")
        results[name]["section_s"] = round(time.perf_counter() - t, 1)
        free(dev)
        results["elapsed_s"] = round(time.perf_counter() - T0, 1)
        if args.out:
            (args.out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
        log(f"section {name} done in {results[name]['section_s']}s")
    print(json.dumps(results, default=str), flush=True)


if __name__ == "__main__":
    main()
