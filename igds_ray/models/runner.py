"""Run a causal LM only as far as decoder block L, and encode only the chosen SAE features."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from igds_ray.models.loading import decoder_layers


class _StopForward(Exception):
    """Raised by the capture hook so that nothing after block L (later blocks, final norm, LM head) runs."""


def _block_output(output: Any) -> Tensor:
    # transformers 5 blocks return a tensor; older versions and other architectures a tuple.
    return output[0] if isinstance(output, (tuple, list)) else output


class LayerRunner:
    """Forward pass that stops at the output of decoder block `layer` (HF `hidden_states[layer + 1]`).

    With `prune=True` the blocks after `layer` are deleted, so their weights do not take memory;
    the model must then be used for nothing else.
    """

    def __init__(self, model: nn.Module, layer: int, prune: bool = True) -> None:
        layers = decoder_layers(model)
        if not 0 <= layer < len(layers):
            raise ValueError(f"layer {layer} is out of range for a model of {len(layers)} layers")
        if prune and layer + 1 < len(layers):
            del layers[layer + 1 :]
        self.model = model
        self.layer = layer
        self._block = layers[layer]

    @torch.inference_mode()
    def __call__(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        """hidden: [batch, seq, d_model], the residual stream after block `layer`.

        `attention_mask=None` for right-padded batches whose padding is never read: under causal attention no
        real token attends to the padding after it, and without a padding mask transformers builds no 4D mask,
        so SDPA (and flash) run their fused causal kernels."""
        captured: list[Tensor] = []

        def hook(_mod: nn.Module, _inp: Any, out: Any) -> None:
            captured.append(_block_output(out))
            raise _StopForward

        handle = self._block.register_forward_hook(hook)
        try:
            self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(f"decoder block {self.layer} was never called")
        return captured[0]


_SLICEABLE = ("StandardSAE", "JumpReLUSAE")


class FeatureEncoder(nn.Module):
    """`sae.encode(x)[..., indices]` computed from slices of W_enc, b_enc and threshold.

    Standard and JumpReLU SAEs encode each latent independently of the others, so slicing is exact
    in math: the input goes through the SAE's own `process_sae_in` (dtype cast, run-time norm,
    b_dec subtraction). The slice is padded to `pad_to` columns because CPU matmul kernels for very
    narrow right-hand sides round differently from the full-width one. Architectures whose
    activation couples latents (TopK, BatchTopK, ...) or that are not known fall back to the full
    encode, then slice.
    """

    def __init__(self, sae: nn.Module, indices: Sequence[int] | None, pad_to: int = 16, compact: bool = False) -> None:
        """`compact`: once the k columns are copied, drop the SAE's full W_enc and W_dec (d_in x d_sae each) so
        that moving the encoder to a GPU moves only the columns and the input preprocessing's vectors."""
        super().__init__()
        self.sae = sae
        d_sae = int(sae.cfg.d_sae)
        self.full = indices is None  # every latent: the SAE's own encode, nothing copied
        indices = list(range(d_sae)) if indices is None else list(indices)
        self.k = len(indices)
        for i in indices:
            if not 0 <= i < d_sae:
                raise ValueError(f"feature index {i} is out of range for d_sae={d_sae}")
        self.register_buffer("index", torch.tensor(indices, dtype=torch.long, device=sae.W_enc.device))
        kind = type(sae).__name__
        self.sliced = not self.full and kind in _SLICEABLE and isinstance(getattr(sae, "activation_fn", None), nn.ReLU)
        self.jumprelu = kind == "JumpReLUSAE"
        if self.sliced:
            cols = list(indices)
            # Pad with other latents (their values are dropped) to reach the wide kernel.
            filler = [j for j in range(d_sae) if j not in set(cols)][: max(0, pad_to - len(cols))]
            cols = torch.tensor(cols + filler, dtype=torch.long, device=sae.W_enc.device)
            with torch.no_grad():
                self.register_buffer("W", sae.W_enc[:, cols].detach().clone().contiguous())
                self.register_buffer("b", sae.b_enc[cols].detach().clone())
                if self.jumprelu:
                    self.register_buffer("threshold", sae.threshold[cols].detach().clone())
            if compact:
                for name in ("W_enc", "W_dec"):
                    if isinstance(getattr(sae, name, None), nn.Parameter):
                        setattr(sae, name, nn.Parameter(getattr(sae, name).new_empty(0), requires_grad=False))

    @torch.inference_mode()
    def forward(self, x: Tensor) -> Tensor:
        """acts: [..., k] in the order of `indices`, in the SAE's dtype."""
        if self.full:
            return self.sae.encode(x)
        if not self.sliced:
            return self.sae.encode(x)[..., self.index]
        sae_in = self.sae.process_sae_in(x)
        pre = sae_in @ self.W + self.b
        acts = torch.relu(pre)
        if self.jumprelu:
            acts = acts * (pre > self.threshold).to(acts.dtype)
        return acts[..., : self.k]


@contextmanager
def capture_block_output(model: nn.Module, layer: int) -> Iterator[list[Tensor]]:
    """Collect the output of decoder block `layer` on every forward call inside the context."""
    store: list[Tensor] = []
    handle = decoder_layers(model)[layer].register_forward_hook(
        lambda _m, _i, out: store.append(_block_output(out).detach())
    )
    try:
        yield store
    finally:
        handle.remove()
