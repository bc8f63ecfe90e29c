"""Load a causal LM + tokenizer (hub id or local dir) and an SAE (sae-lens release or local dir).

Everything that can be checked from configs alone (widths, layer, hook point, feature indices) is
checked by `check_compatible` before any weights are loaded, so a bad run fails in seconds.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from igds_ray.config import ModelConfig, SAEConfig
from igds_ray.errors import ConfigError, ModelSAEMismatch
from igds_ray.schema import FeatureId

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# TransformerLens-style and Hugging Face-style residual hook names. Both name the *output* of
# decoder block L (HF hidden_states[L+1]); resid_pre of block L is the output of block L-1.
_TL_POST = re.compile(r"^blocks\.(\d+)\.hook_resid_post$")
_TL_PRE = re.compile(r"^blocks\.(\d+)\.hook_resid_pre$")
_HF_LAYER = re.compile(r"^(?:model\.)?(?:model\.)?layers\.(\d+)$")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ConfigError(f"dtype {dtype!r} is not one of auto, {', '.join(_DTYPES)}") from None


def layer_from_hook_name(hook_name: str) -> int:
    """The decoder block whose output the SAE reads, from its hook name."""
    name = (hook_name or "").strip()
    if m := _TL_POST.match(name):
        return int(m.group(1))
    if m := _HF_LAYER.match(name):
        return int(m.group(1))
    if m := _TL_PRE.match(name):
        layer = int(m.group(1)) - 1
        if layer < 0:
            raise ModelSAEMismatch(f"SAE hook {name!r} reads the embeddings, which scoring does not support")
        return layer
    raise ModelSAEMismatch(
        f"SAE hook point {name!r} is not supported: use a residual-stream hook, "
        "blocks.L.hook_resid_post, blocks.L.hook_resid_pre or model.layers.L"
    )


# ---------------------------------------------------------------------------------------------
# configs only (no weights)


@dataclass(frozen=True)
class ModelInfo:
    hidden_size: int
    num_layers: int
    model_type: str


@dataclass(frozen=True)
class SAEInfo:
    d_in: int
    d_sae: int
    hook_name: str
    architecture: str
    layer: int


def model_info(cfg: ModelConfig) -> ModelInfo:
    from transformers import AutoConfig

    try:
        hf = AutoConfig.from_pretrained(
            cfg.name_or_path, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision
        )
    except Exception as e:  # transformers raises OSError/ValueError with long texts
        raise ConfigError(f"model {cfg.name_or_path!r}: cannot read its config ({type(e).__name__}: {e})") from None
    local = Path(os.path.expanduser(cfg.name_or_path))
    if local.is_dir():
        patterns = ("*.safetensors", "*.bin", "*.pt") if cfg.allow_pickle else ("*.safetensors",)
        if not any(next(local.glob(p), None) for p in patterns):
            raise ConfigError(
                f"model {cfg.name_or_path!r}: no {'weights' if cfg.allow_pickle else 'safetensors weights'} "
                "in this directory" + ("" if cfg.allow_pickle else " (pickle-based .bin files need model.allow_pickle)")
            )
    text_cfg = hf.get_text_config() if hasattr(hf, "get_text_config") else hf
    return ModelInfo(int(text_cfg.hidden_size), int(text_cfg.num_hidden_layers), str(hf.model_type))


def _sae_cfg_dict(cfg: SAEConfig) -> dict[str, Any]:
    if cfg.path is not None:
        p = Path(cfg.path)
        cfg_file = p / "cfg.json"
        if not cfg_file.is_file():
            raise ConfigError(f"sae.path {cfg.path!r}: no cfg.json there (expected a sae-lens `save_model` directory)")
        try:
            return json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"sae.path {cfg.path!r}: cfg.json is not valid JSON ({e})") from None
    from sae_lens.loading.pretrained_sae_loaders import load_sae_config_from_huggingface

    try:
        return load_sae_config_from_huggingface(cfg.release, cfg.sae_id)
    except Exception as e:
        raise ConfigError(f"sae {cfg.release}/{cfg.sae_id}: cannot read its config ({type(e).__name__}: {e})") from None


def sae_info(cfg: SAEConfig) -> SAEInfo:
    d = _sae_cfg_dict(cfg)
    if cfg.path is not None and not (Path(cfg.path) / "sae_weights.safetensors").is_file():
        raise ConfigError(f"sae.path {cfg.path!r}: no sae_weights.safetensors there")
    meta = d.get("metadata") or {}
    hook_name = meta.get("hook_name") or d.get("hook_name") or ""
    try:
        d_in, d_sae = int(d["d_in"]), int(d["d_sae"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"sae {cfg.describe()}: config lacks d_in/d_sae") from None
    return SAEInfo(d_in, d_sae, hook_name, str(d.get("architecture", "standard")), layer_from_hook_name(hook_name))


def check_compatible(model: ModelInfo, sae: SAEInfo, features: tuple[FeatureId, ...] = ()) -> None:
    """Refuse, before any compute, an SAE/model/feature combination that cannot work."""
    if sae.d_in != model.hidden_size:
        raise ModelSAEMismatch(
            f"SAE d_in={sae.d_in} differs from the model's hidden size {model.hidden_size}: "
            "this SAE was trained on another model"
        )
    if sae.layer >= model.num_layers:
        raise ModelSAEMismatch(
            f"SAE hook {sae.hook_name!r} reads layer {sae.layer}, but the model has {model.num_layers} layers "
            f"(0..{model.num_layers - 1})"
        )
    for f in features:
        if f.layer != sae.layer:
            raise ModelSAEMismatch(f"feature {f} is on layer {f.layer}, but the SAE reads layer {sae.layer}")
        if not 0 <= f.index < sae.d_sae:
            raise ModelSAEMismatch(f"feature {f}: index {f.index} is out of range for an SAE of d_sae={sae.d_sae}")


# ---------------------------------------------------------------------------------------------
# weights


def load_tokenizer(cfg: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        cfg.tokenizer or cfg.name_or_path, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision
    )
    if tok.pad_token_id is None:
        # Padding positions are masked everywhere we pad; any id will do, eos is the convention.
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def load_model(cfg: ModelConfig, device: torch.device | None = None, layers: int | None = None) -> torch.nn.Module:
    """A causal LM in eval mode. Safetensors only unless `allow_pickle`; remote code only if asked.

    `layers`: build and load only the first `layers` decoder blocks (the scorer needs blocks 0..L), so the
    later blocks' weights are never read or allocated. Ignored with an adapter (it may adapt any block).
    Models with attention-logit soft-capping (Gemma-2) run eager attention unless flash_attention_2 is
    asked for: SDPA has no soft-capping."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    device = device or resolve_device(cfg.device)
    kwargs: dict[str, Any] = dict(
        dtype=resolve_dtype(cfg.dtype, device),
        trust_remote_code=cfg.trust_remote_code,
        revision=cfg.revision,
        use_safetensors=None if cfg.allow_pickle else True,
    )
    mc = AutoConfig.from_pretrained(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    text = getattr(mc, "text_config", None) or mc
    attn = cfg.attn_implementation
    if getattr(text, "attn_logit_softcapping", None):
        if attn in ("sdpa", "flex_attention") or (attn or "").startswith("paged"):
            raise ConfigError(f"model.attn_implementation: {attn} ignores {cfg.name_or_path!r}'s attention logit "
                              "soft-capping; use eager or flash_attention_2")
        attn = attn or "eager"
    if attn:
        kwargs["attn_implementation"] = attn
    n = int(getattr(text, "num_hidden_layers", 0) or 0)
    truncated = layers is not None and not cfg.adapter and 0 < layers < n
    if truncated:
        # Per-layer lists (layer_types, sliding windows, ...) are cut with the layer count.
        for key, val in list(vars(text).items()):
            if isinstance(val, list) and len(val) == n:
                setattr(text, key, val[:layers])
        text.num_hidden_layers = layers
        kwargs["config"] = mc
    verbosity = hf_logging.get_verbosity()
    if truncated:  # the checkpoint's later blocks are "unused weights": expected, not worth a warning
        hf_logging.set_verbosity_error()
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, **kwargs)
    except OSError as e:
        if not cfg.allow_pickle and "safetensors" in str(e).lower():
            raise ConfigError(
                f"model {cfg.name_or_path!r} has no safetensors weights; pickle-based weights can run code "
                "on load, so they are refused unless model.allow_pickle is set"
            ) from None
        raise
    finally:
        hf_logging.set_verbosity(verbosity)
    if cfg.adapter:
        model = _apply_adapter(model, cfg.adapter)
    return model.to(device).eval()


def _apply_adapter(model: torch.nn.Module, adapter: str) -> torch.nn.Module:
    """Merge a PEFT adapter into the base weights: generation and scoring then run at base speed."""
    from peft import PeftModel

    if not (Path(adapter) / "adapter_config.json").is_file() and "://" not in adapter:
        raise ConfigError(f"model.adapter {adapter!r}: no adapter_config.json there (expected a PEFT adapter dir)")
    try:
        return PeftModel.from_pretrained(model, adapter).merge_and_unload()
    except Exception as e:
        raise ConfigError(f"model.adapter {adapter!r}: cannot load it ({type(e).__name__}: {e})") from None


def load_sae(cfg: SAEConfig, device: torch.device) -> Any:
    """An SAE through sae-lens: `SAE.load_from_disk(dir)` or `SAE.from_pretrained(release, sae_id)`."""
    from sae_lens import SAE

    dev = str(resolve_device(cfg.device) if cfg.device != "auto" else device)
    if cfg.path is not None:
        weights = Path(cfg.path) / "sae_weights.safetensors"
        if not weights.is_file():
            raise ConfigError(f"sae.path {cfg.path!r}: no sae_weights.safetensors there")
        sae = SAE.load_from_disk(cfg.path, device=dev, dtype=cfg.dtype)
    else:
        sae = SAE.from_pretrained(cfg.release, cfg.sae_id, device=dev, dtype=cfg.dtype)
    return sae.eval()


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder blocks of a Hugging Face causal LM (Llama, Gemma, Qwen, Mistral, GPT-NeoX, GPT-2 layouts)."""
    for path in ("model.layers", "model.language_model.layers", "gpt_neox.layers", "transformer.h", "layers"):
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList):
            return obj
    raise ModelSAEMismatch(f"cannot find the decoder layers of {type(model).__name__}")


def offline_env() -> dict[str, str]:
    """Environment flags that keep hub libraries from retrying network calls when offline."""
    return {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE") if k in os.environ}
