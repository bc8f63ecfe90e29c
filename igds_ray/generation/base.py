"""The generation interface: prompts + sampling settings + an optional SAE-feature intervention -> texts.

An intervention edits chosen SAE latents at the output of decoder block `layer`, at every position
of prefill and decode, in one of two modes (a_f is the latent's activation under the SAE's own
encode, W_dec[f] its decoder row):

* `scale` (the paper's amplification):  h' = h + sum_f (v - 1) * a_f(h) * W_dec[f],  v the factor:
  v = 0 ablates, v > 1 amplifies. A latent that is (near) zero at a position stays (near) zero, so
  scaling cannot switch on a latent the prompt does not already use.
* `clamp` (steering):  h' = h + sum_f (c - a_f(h)) * W_dec[f],  c the value (>= 0): in the SAE's
  decomposition of h' the latent's coefficient is c at every position, active or not, so a clamp can
  switch on a silent latent. c = 0 is the same ablation as factor 0, bit for bit.

Both equal the reconstruction-plus-error form  decode(z') + (h - decode(z)),  z' being z with the
chosen latents scaled or set, for SAEs without run-time output normalization (the SAEs igds loads;
checked in tests). Re-encoding h' gives back c only when the encoder reads the latent's own decoder
row with gain 1 (W_enc[:, f] . W_dec[f] = 1) at a position where it is active; in general it reads
pre_f(h) + (c - a_f(h)) * W_enc[:, f] . W_dec[f] (plus cross terms from the other edited latents). Both modes are one affine map of the activation,
coefficient = a_f * mult + offset (scale: mult = v - 1, offset = 0; clamp: mult = -1, offset = c),
which is how the backends apply them (vLLM keeps mult and offset in buffers of its compiled graph).
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch

from igds_ray.config import ModelConfig, SAEConfig

InterventionMode = Literal["scale", "clamp"]
INTERVENTION_MODES: tuple[str, ...] = ("scale", "clamp")


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int = 0


def _finite_nonneg(x: Any) -> bool:
    if isinstance(x, (str, bytes)):
        return False
    try:
        x = float(x)
    except (TypeError, ValueError):
        return False
    return math.isfinite(x) and x >= 0


@dataclass(frozen=True)
class Intervention:
    """Edit SAE latents `features` at decoder block `layer` (see the module doc for the math).

    mode "scale" multiplies them by `factor`; mode "clamp" sets them to `value` and does not read
    `factor` (callers may keep there what the value was derived from, e.g. a multiple of the
    latent's p99; it is part of the intervention's identity, nothing more).
    """

    layer: int
    features: tuple[int, ...]
    factor: float
    mode: InterventionMode = "scale"
    value: float | None = None

    def __post_init__(self) -> None:
        if not self.features:
            raise ValueError("intervention features: need at least one feature")
        dup = sorted({f for f in self.features if self.features.count(f) > 1})
        if dup:
            # A repeated latent would get its update twice.
            raise ValueError(f"intervention features: feature {dup[0]} is listed more than once")
        if not _finite_nonneg(self.factor):
            raise ValueError(f"intervention factor must be a finite number >= 0 (0 ablates), got {self.factor!r}")
        if self.mode not in INTERVENTION_MODES:
            raise ValueError(f"intervention mode must be one of {list(INTERVENTION_MODES)}, got {self.mode!r}")
        if self.mode == "clamp":
            if self.value is None:
                raise ValueError("intervention value is required in clamp mode (the activation to clamp to)")
            if not _finite_nonneg(self.value):
                raise ValueError(f"intervention value must be a finite number >= 0 in clamp mode, got {self.value!r}")
        elif self.value is not None:
            raise ValueError(f"intervention value={self.value!r} is only read in clamp mode; mode is {self.mode!r}")

    def coefficients(self) -> tuple[float, float]:
        """(mult, offset) of the affine map  a -> a * mult + offset  giving each latent's update coefficient."""
        if self.mode == "clamp":
            assert self.value is not None
            return -1.0, float(self.value)
        return float(self.factor) - 1.0, 0.0

    def cache_key(self) -> str:
        """A string naming everything the intervention changes (vLLM's prefix-cache salt)."""
        feats = ",".join(map(str, self.features))
        value = "" if self.value is None else f":c{float(self.value)!r}"
        return f"igds:L{self.layer}:f{feats}:{self.mode}:v{float(self.factor)!r}{value}"


@dataclass(frozen=True)
class FeatureSteer:
    """What an intervention needs from the SAE, sliced to its features (tensors on the model's device).

    acts = act_fn(process(h) @ W_enc + b_enc) with JumpReLU thresholding when `threshold` is set;
    the residual update is  (acts * mult + offset) @ W_dec  (see `Intervention.coefficients`).
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

    def coefficient_tensors(self, intervention: Intervention) -> tuple[torch.Tensor, torch.Tensor]:
        """(mult [k], offset [k]) on the steer's device and dtype, built once per intervention so that
        the per-forward update needs no host-to-device copy; each rounds the double once, as vLLM's buffers do."""
        mult, offset = intervention.coefficients()
        k = self.W_enc.shape[1]
        like = dict(dtype=self.W_enc.dtype, device=self.W_enc.device)
        return torch.full((k,), mult, **like), torch.full((k,), offset, **like)

    def apply_affine(self, h: torch.Tensor, mult: torch.Tensor | float, offset: torch.Tensor | float) -> torch.Tensor:
        """h + (acts(h) * mult + offset) @ W_dec, in h's dtype (mult/offset: scalars or one per feature)."""
        delta = (self.acts(h) * mult + offset) @ self.W_dec
        return h + delta.to(h.dtype)

    def apply(
        self, h: torch.Tensor, factor: float | torch.Tensor = 1.0, value: float | torch.Tensor | None = None
    ) -> torch.Tensor:
        """Scale (value None): h + (factor - 1) * acts(h) @ W_dec; clamp (value given, factor unread):
        h + (value - acts(h)) @ W_dec. In h's dtype; factor and value may be tensors (no host sync)."""
        if value is None:
            return self.apply_affine(h, factor - 1, 0.0)
        return self.apply_affine(h, -1.0, value)


def check_features(sae: Any, sae_layer: int | None, layer: int, features: Sequence[int], what: str) -> None:
    """Refuse SAE latents the backend cannot reach (no SAE, another layer, an index beyond d_sae)."""
    if sae is None:
        raise ValueError(f"{what}: this backend was built without an SAE, so it has no features")
    if layer != sae_layer:
        raise ValueError(f"{what} on layer {layer}, but the SAE reads layer {sae_layer}")
    d_sae = int(sae.cfg.d_sae)
    bad = [f for f in features if not 0 <= f < d_sae]
    if bad:
        raise ValueError(f"{what}: feature index {bad[0]} is out of range for an SAE of d_sae={d_sae}")


def check_intervention(intervention: Intervention, sae: Any, sae_layer: int | None) -> None:
    """Refuse an intervention the backend's SAE cannot apply (no SAE, another layer, a latent beyond d_sae)."""
    check_features(sae, sae_layer, intervention.layer, intervention.features, what="intervention")


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

    def activation_quantile(
        self, prompts: Sequence[str], layer: int, features: Sequence[int], q: float = 0.99
    ) -> list[float]:
        """Each latent's q-quantile activation over the prompts' non-special token positions where it
        is active (> 0); 0.0 for a latent never active. Sets clamp values on each latent's own scale."""
        raise NotImplementedError(
            f"{type(self).__name__} does not compute activation quantiles; use the HF backend "
            "(igds_ray.generation.hf.HFBackend.activation_quantile), which needs no generation engine"
        )

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
