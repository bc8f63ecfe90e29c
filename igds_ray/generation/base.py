"""The generation interface: prompts + sampling settings + an optional SAE-feature intervention -> texts.

An intervention multiplies chosen SAE latents at the output of decoder block `layer`, at every
position of prefill and decode:  h' = h + sum_f (v - 1) * a_f(h) * W_dec[f],  where a_f is the
latent's activation (the SAE's own encode) and v the factor: v = 0 ablates, v > 1 amplifies.
This equals the reconstruction-plus-error form  decode(z') + (h - decode(z))  for SAEs without
run-time output normalization (the SAEs igds loads; checked in tests).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from igds_ray.config import ModelConfig, SAEConfig


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int = 0


@dataclass(frozen=True)
class Intervention:
    layer: int
    features: tuple[int, ...]
    factor: float

    def __post_init__(self) -> None:
        if not self.features:
            raise ValueError("an intervention needs at least one feature")
        if self.factor < 0:
            raise ValueError(f"intervention factor must be >= 0 (0 ablates), got {self.factor}")


@dataclass(frozen=True)
class FeatureSteer:
    """What an intervention needs from the SAE, sliced to its features (tensors on the model's device).

    acts = act_fn(process(h) @ W_enc + b_enc) with JumpReLU thresholding when `threshold` is set;
    the residual update is  (factor - 1) * acts @ W_dec.
    """

    W_enc: torch.Tensor  # [d_in, k]
    b_enc: torch.Tensor  # [k]
    threshold: torch.Tensor | None  # [k] (JumpReLU) or None
    W_dec: torch.Tensor  # [k, d_in]
    b_dec: torch.Tensor  # [d_in], subtracted from the input when apply_b_dec_to_input
    apply_b_dec_to_input: bool
    layer: int

    @classmethod
    def from_sae(cls, sae: Any, layer: int, features: Sequence[int], device: torch.device, dtype: torch.dtype) -> "FeatureSteer":
        kind = type(sae).__name__
        if kind not in ("StandardSAE", "JumpReLUSAE"):
            raise ValueError(f"interventions support standard and JumpReLU SAEs; this SAE is {kind}")
        if getattr(sae.cfg, "normalize_activations", "none") not in ("none", None):
            raise ValueError(
                f"interventions need an SAE without run-time normalization (got {sae.cfg.normalize_activations}); "
                "fold the normalization into the weights first"
            )
        idx = torch.tensor(list(features), dtype=torch.long, device=sae.W_enc.device)
        to = dict(device=device, dtype=dtype)
        return cls(
            W_enc=sae.W_enc[:, idx].detach().to(**to).contiguous(),
            b_enc=sae.b_enc[idx].detach().to(**to),
            threshold=sae.threshold[idx].detach().to(**to) if kind == "JumpReLUSAE" else None,
            W_dec=sae.W_dec[idx].detach().to(**to).contiguous(),
            b_dec=sae.b_dec.detach().to(**to),
            apply_b_dec_to_input=bool(sae.cfg.apply_b_dec_to_input),
            layer=layer,
        )

    def acts(self, h: torch.Tensor) -> torch.Tensor:
        x = h.to(self.W_enc.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        pre = x @ self.W_enc + self.b_enc
        a = torch.relu(pre)
        if self.threshold is not None:
            a = a * (pre > self.threshold).to(a.dtype)
        return a

    def apply(self, h: torch.Tensor, factor: float | torch.Tensor) -> torch.Tensor:
        """h + (factor - 1) * acts(h) @ W_dec, in h's dtype."""
        delta = (self.acts(h) * (factor - 1)) @ self.W_dec
        return h + delta.to(h.dtype)


def check_intervention(intervention: Intervention, sae: Any, sae_layer: int | None) -> None:
    """Refuse an intervention the backend's SAE cannot apply (no SAE, another layer, a latent beyond d_sae)."""
    if sae is None:
        raise ValueError("this backend was built without an SAE: it cannot intervene on features")
    if intervention.layer != sae_layer:
        raise ValueError(f"intervention on layer {intervention.layer}, but the SAE reads layer {sae_layer}")
    d_sae = int(sae.cfg.d_sae)
    bad = [f for f in intervention.features if not 0 <= f < d_sae]
    if bad:
        raise ValueError(f"feature index {bad[0]} is out of range for an SAE of d_sae={d_sae}")


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """The text up to the first stop string (vLLM's convention: the stop string is not included)."""
    cuts = [i for s in stop if s and (i := text.find(s)) != -1]
    return text[: min(cuts)] if cuts else text


class GenerationBackend(abc.ABC):
    """Loads a model once; generates for many prompts, with or without an intervention."""

    @abc.abstractmethod
    def generate(
        self, prompts: Sequence[str], sampling: SamplingConfig, intervention: Intervention | None = None
    ) -> list[str]:
        """Completions (without the prompt), in prompt order."""

    def loglik(
        self, prompts: Sequence[str], references: Sequence[str], intervention: Intervention | None = None
    ) -> list[float]:
        """Mean per-token log-likelihood of each reference given its prompt (teacher forcing)."""
        raise NotImplementedError(f"{type(self).__name__} does not compute log-likelihoods")

    def close(self) -> None:  # noqa: B027 - optional
        """Free the model."""


def make_backend(kind: str, model: ModelConfig, sae: SAEConfig | None = None, **kwargs: Any) -> GenerationBackend:
    """`hf` (any machine) or `vllm` (imported only when asked for)."""
    if kind == "hf":
        from igds_ray.generation.hf import HFBackend

        return HFBackend(model, sae, **kwargs)
    if kind == "vllm":
        from igds_ray.generation.vllm import VLLMBackend

        return VLLMBackend(model, sae, **kwargs)
    raise ValueError(f"unknown generation backend {kind!r}: use hf or vllm")
