"""What `igds plan` knows without weights: GPU types, a model's shape, an SAE's width and layer.

- **GPU types**: memory as `nvidia-smi` reports it and the vendor's dense bf16 tensor rate and
  memory bandwidth (datasheet figures). Achieved rates come from `igds_ray.plan`'s calibration on a
  measured H200, scaled by these datasheet ratios.
- **Model shape**: read from `config.json` in a local model directory or the local Hugging Face
  cache (never downloaded); for the shipped configs' hub ids a built-in copy of the published
  config's shape is the fallback, and the plan says which was used.
- **SAE**: width and layer from a local sae-lens `cfg.json`, else from the release's sae_id
  (`layer_12/width_16k/...`, Llama Scope's `l15r_8x`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from igds_ray.errors import ConfigError

GIB = 1024**3


@dataclass(frozen=True)
class GPUType:
    name: str
    mem_gib: float  # total, as nvidia-smi reports it
    bf16_tflops: float  # datasheet dense bf16 tensor rate
    hbm_gbs: float  # datasheet memory bandwidth, GB/s


GPU_TYPES: dict[str, GPUType] = {g.name: g for g in (
    GPUType("A10G-24GB", 23028 / 1024, 70.0, 600.0),
    GPUType("L4-24GB", 23034 / 1024, 121.0, 300.0),
    GPUType("A100-40GB", 40960 / 1024, 312.0, 1555.0),
    GPUType("A100-80GB", 81920 / 1024, 312.0, 2039.0),
    GPUType("H100-80GB", 81559 / 1024, 989.0, 3350.0),
    GPUType("H200-141GB", 143771 / 1024, 989.0, 4800.0),
)}

# Ray's `accelerator_type:<X>` resource (what its GPU nodes advertise) and cloud instance names -> GPU type.
ACCELERATOR_ALIASES: dict[str, str] = {
    "A10G": "A10G-24GB", "L4": "L4-24GB", "A100": "A100-40GB", "A100-40G": "A100-40GB", "A100-80G": "A100-80GB",
    "H100": "H100-80GB", "H200": "H200-141GB", "g5": "A10G-24GB", "g6": "L4-24GB", "g2": "L4-24GB", "a2": "A100-40GB", "a3": "H100-80GB", "nvidia-l4": "L4-24GB",
    "nvidia-tesla-a100": "A100-40GB", "nvidia-a100-80gb": "A100-80GB", "nvidia-h100-80gb": "H100-80GB",
    "nvidia-h200-141gb": "H200-141GB", "p4d": "A100-40GB", "p4de": "A100-80GB", "p5": "H100-80GB",
    "p5e": "H200-141GB",
}


def gpu_type(name: str) -> GPUType:
    """A known GPU type by its name (`A10G-24GB`) or an alias (`A10G`, Ray's accelerator type)."""
    got = GPU_TYPES.get(name) or GPU_TYPES.get(ACCELERATOR_ALIASES.get(name, ""))
    if got is None:
        raise ConfigError(f"unknown GPU type {name!r} (known: {', '.join(GPU_TYPES)})")
    return got


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    max_positions: int
    softcap: bool  # final logit soft-capping (Gemma-2): one more logits-sized tensor in the loss
    source: str  # where the shape came from

    @property
    def block_params(self) -> int:
        attn = self.hidden * self.heads * self.head_dim * 2 + self.hidden * self.kv_heads * self.head_dim * 2
        return attn + 3 * self.hidden * self.intermediate  # gated MLP (gate, up, down)

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    def params(self, layers: int | None = None, head: bool = True) -> int:
        """Parameters of the first `layers` blocks (all by default) + embeddings (+ the LM head when untied)."""
        n = self.layers if layers is None else min(layers, self.layers)
        return n * self.block_params + self.embed_params + (self.embed_params if head and not self.tied else 0)

    def matmul_params(self, layers: int | None = None, head: bool = True) -> int:
        """Parameters a token's forward multiplies by (the embedding is a lookup; a tied head is a matmul)."""
        n = self.layers if layers is None else min(layers, self.layers)
        return n * self.block_params + (self.embed_params if head else 0)

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes

    def lora_params(self, r: int, targets: tuple[str, ...]) -> int:
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        dims = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, i),
                "up_proj": (h, i), "down_proj": (i, h)}
        if "all-linear" in targets:
            targets = tuple(dims)
        return self.layers * sum(r * (a + b) for t, (a, b) in dims.items() if t in targets)


# The published config.json shapes of the shipped configs' models, used only when no config.json is
# readable locally (the plan must run on a laptop without hub access).
KNOWN_SHAPES: dict[str, dict[str, Any]] = {
    "google/gemma-2-2b": dict(num_hidden_layers=26, hidden_size=2304, num_attention_heads=8, num_key_value_heads=4,
                              head_dim=256, intermediate_size=9216, vocab_size=256000, tie_word_embeddings=True,
                              max_position_embeddings=8192, final_logit_softcapping=30.0),
    "meta-llama/Llama-3.1-8B": dict(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32,
                                    num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                                    tie_word_embeddings=False, max_position_embeddings=131072),
    "Qwen/Qwen3-8B": dict(num_hidden_layers=36, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                          head_dim=128, intermediate_size=12288, vocab_size=151936, tie_word_embeddings=False,
                          max_position_embeddings=40960),
}


def shape_from_config(cfg: dict[str, Any], source: str) -> ModelShape:
    cfg = cfg.get("text_config") or cfg
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        return ModelShape(
            layers=int(cfg["num_hidden_layers"]), hidden=hidden, heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads), intermediate=int(cfg["intermediate_size"]),
            vocab=int(cfg["vocab_size"]), tied=bool(cfg.get("tie_word_embeddings", False)),
            max_positions=int(cfg.get("max_position_embeddings") or 4096),
            softcap=bool(cfg.get("final_logit_softcapping")), source=source)
    except KeyError as e:
        raise ConfigError(f"{source}: the model config has no {e.args[0]!r}") from None


def model_shape(name_or_path: str, revision: str | None = None) -> ModelShape:
    """The model's shape from a local config.json, the local hub cache, or the built-in shipped shapes."""
    local = Path(name_or_path)
    if (local / "config.json").is_file():
        return shape_from_config(json.loads((local / "config.json").read_text()), f"{local / 'config.json'}")
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name_or_path, "config.json", revision=revision)
    except Exception:  # not a valid repo id, or no hub library: fall through to the built-in shapes
        cached = None
    if isinstance(cached, str):
        return shape_from_config(json.loads(Path(cached).read_text()), f"hub cache {name_or_path}")
    if name_or_path in KNOWN_SHAPES:
        return shape_from_config(KNOWN_SHAPES[name_or_path], f"built-in shape of {name_or_path}")
    raise ConfigError(f"model.name_or_path {name_or_path!r}: no config.json in that directory or the local hub "
                      "cache, and no built-in shape (download the config, or pass a local directory)")


@dataclass(frozen=True)
class SAEShape:
    d_in: int
    d_sae: int
    layer: int
    source: str


def sae_shape(path: str | None, release: str | None, sae_id: str | None, hidden: int,
              width: int | None = None, layer: int | None = None) -> SAEShape:
    """Width and layer from a local sae-lens cfg.json, else parsed from the sae_id (or given)."""
    if path and (Path(path) / "cfg.json").is_file():
        cfg = json.loads((Path(path) / "cfg.json").read_text())
        hook = (cfg.get("metadata") or {}).get("hook_name") or cfg.get("hook_name") or ""
        m = re.search(r"(?:layers?[._]|blocks\.)(\d+)", hook)
        return SAEShape(int(cfg.get("d_in", hidden)), width or int(cfg["d_sae"]),
                        layer if layer is not None else int(m.group(1)) if m else -1, f"{path}/cfg.json")
    text = sae_id or path or ""
    if layer is None:
        m = re.search(r"layer[_-]?(\d+)", text) or re.search(r"(?:^|/)l(\d+)r", text)
        layer = int(m.group(1)) if m else None
    if width is None:
        m = re.search(r"width_(\d+)([km]?)", text)
        if m:
            width = int(m.group(1)) * {"": 1, "k": 1024, "m": 1024**2}[m.group(2)]
        else:
            m = re.search(r"_(\d+)x\b", text)  # Llama Scope: expansion factor x the residual width
            width = int(m.group(1)) * hidden if m else None
    if layer is None or width is None:
        where = f"sae.path {path!r}" if path else f"sae.sae_id {sae_id!r} (release {release})"
        raise ConfigError(f"{where}: cannot tell the SAE's {'layer' if layer is None else 'width'} without its "
                          "cfg.json (pass --sae-layer / --sae-width)")
    return SAEShape(hidden, width, layer, f"parsed from {text!r}")
