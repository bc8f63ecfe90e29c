"""How the SAE-feature intervention gets compiled into vLLM's decoder layer L (the patch itself;
`igds_ray.generation.vllm.VLLMBackend` drives it). Checked on vLLM 0.32, CPU build; see
tests/test_vllm_backend.py. Importing this module does not import vLLM.

* Hooks added after the engine is built (`LLM.apply_model` + `register_forward_hook`) only run with
  `enforce_eager=True`: vLLM compiles the model (torch.compile, CUDA graphs) while the engine is
  built, and the compiled graph never calls Python hooks. So the decoder layer L is changed *while
  the model loads*, before the first forward traces it: the model loader is wrapped for the duration
  of `LLM(...)`, and the loaded model's layer-L module gets a subclass of its own class whose
  forward adds the steering update. Only that one module changes; other layers and other engines
  in the process are untouched.
* vLLM decoder layers return `(hidden, residual)`; the residual stream (HF's block output) is their
  sum. The patched forward returns `(stream + delta, zeros)`, which the next layer's fused
  add-RMSNorm (or the final norm) turns back into `stream + delta` in the same float order as the
  HF backend's hook (`h + delta`).
* vLLM's compiled graphs run without dynamo guards, so anything Python-level read in forward is
  frozen at trace time. All intervention state is therefore in buffers of the patched module, updated
  in place between `generate` calls: the SAE's encoder/decoder sliced to at most `max_features`
  features (zero-padded), and per slot the affine map of both intervention modes (base.py),
  coefficient = a * scale + offset: scale mode writes (factor - 1, 0), clamp mode (-1, value); unused
  slots (0, 0) add nothing. So one traced graph serves both modes, and switching mode or value
  between calls is a buffer write, never a retrace. A call counter
  buffer is incremented inside forward, so it counts under compilation and graph replay too; an
  intervened `generate` whose counter did not advance raises.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

BUFFER_PREFIX = "_igds_"


def steer_delta(
    h: torch.Tensor,
    W_enc: torch.Tensor,  # [d_in, K]
    b_enc: torch.Tensor,  # [K]
    threshold: torch.Tensor | None,  # [K] (JumpReLU) or None
    W_dec: torch.Tensor,  # [K, d_in]
    b_dec: torch.Tensor,  # [d_in]
    apply_b_dec_to_input: bool,
    scale: torch.Tensor,  # [K]: mult per slot (factor - 1, or -1 to clamp), 0 for unused slots
    offset: torch.Tensor,  # [K]: offset per slot (0, or the clamp value), 0 for unused slots
) -> torch.Tensor:
    """`FeatureSteer.apply_affine(h, scale, offset) - h` with per-slot coefficients, written with plain
    tensors so that torch.compile traces it (no dataclass access, no data-dependent Python branches)."""
    x = h.to(W_enc.dtype)
    if apply_b_dec_to_input:
        x = x - b_dec
    pre = x @ W_enc + b_enc
    a = torch.relu(pre)
    if threshold is not None:
        a = a * (pre > threshold).to(a.dtype)
    return (a * scale + offset) @ W_dec


def _steered_forward(base_forward: Any, self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    out = base_forward(self, *args, **kwargs)
    self._igds_calls.add_(1)
    thr = self._igds_threshold if self._igds_jumprelu else None
    if isinstance(out, tuple) and len(out) == 2 and out[1] is not None:
        hidden, residual = out
        stream = residual + hidden
        delta = steer_delta(stream, self._igds_W_enc, self._igds_b_enc, thr, self._igds_W_dec, self._igds_b_dec,
                            self._igds_apply_b_dec, self._igds_scale, self._igds_offset)
        return stream + delta.to(stream.dtype), torch.zeros_like(residual)
    # Layers that return the stream itself (no separate residual).
    stream = out[0] if isinstance(out, tuple) else out
    delta = steer_delta(stream, self._igds_W_enc, self._igds_b_enc, thr, self._igds_W_dec, self._igds_b_dec,
                        self._igds_apply_b_dec, self._igds_scale, self._igds_offset)
    stream = stream + delta.to(stream.dtype)
    return (stream, *out[1:]) if isinstance(out, tuple) else stream


def install_steering(layer: nn.Module, d_in: int, max_features: int, jumprelu: bool, apply_b_dec: bool,
                     dtype: torch.dtype = torch.float32) -> nn.Module:
    """Give this one module a steerable forward (a subclass of its class) and the state buffers."""
    device = next(layer.parameters()).device
    cls = type(layer)
    base_forward = cls.forward

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return _steered_forward(base_forward, self, *args, **kwargs)

    layer.__class__ = type(f"IgdsSteered{cls.__name__}", (cls,), {"forward": forward})
    z = dict(device=device, dtype=dtype)
    layer.register_buffer(BUFFER_PREFIX + "W_enc", torch.zeros(d_in, max_features, **z), persistent=False)
    layer.register_buffer(BUFFER_PREFIX + "b_enc", torch.zeros(max_features, **z), persistent=False)
    layer.register_buffer(BUFFER_PREFIX + "threshold", torch.zeros(max_features, **z), persistent=False)
    layer.register_buffer(BUFFER_PREFIX + "W_dec", torch.zeros(max_features, d_in, **z), persistent=False)
    layer.register_buffer(BUFFER_PREFIX + "b_dec", torch.zeros(d_in, **z), persistent=False)
    layer.register_buffer(BUFFER_PREFIX + "scale", torch.zeros(max_features, **z), persistent=False)
    layer.register_buffer(BUFFER_PREFIX + "offset", torch.zeros(max_features, **z), persistent=False)
    layer.register_buffer(BUFFER_PREFIX + "calls", torch.zeros((), dtype=torch.int64, device=device), persistent=False)
    # Static for the engine's life (read at trace time): the SAE's architecture, not the intervention.
    layer._igds_jumprelu = jumprelu
    layer._igds_apply_b_dec = apply_b_dec
    return layer


@contextlib.contextmanager
def patch_model_loading(on_loaded: Any) -> Iterator[None]:
    """Call `on_loaded(model)` on every model a vLLM loader returns in this process, while inside."""
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    classes, todo = [], [BaseModelLoader]
    while todo:
        c = todo.pop()
        todo.extend(c.__subclasses__())
        if "load_model" in c.__dict__:
            classes.append(c)
    originals = {c: c.__dict__["load_model"] for c in classes}

    def wrap(orig: Any) -> Any:
        def load_model(self: Any, *args: Any, **kwargs: Any) -> nn.Module:
            model = orig(self, *args, **kwargs)
            on_loaded(model)
            return model

        return load_model

    for c, f in originals.items():
        setattr(c, "load_model", wrap(f))
    try:
        yield
    finally:
        for c, f in originals.items():
            setattr(c, "load_model", f)
