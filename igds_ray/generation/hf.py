"""Hugging Face generation backend: batched `generate` with left padding, greedy by default, and the
SAE-feature intervention (scale or clamp) as a forward hook on decoder block L (every position,
prefill and decode; `loglik` too). Also each latent's activation quantile, to put clamp values on
the latent's own scale."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from igds_ray.config import ModelConfig, SAEConfig
from igds_ray.generation.base import FeatureSteer, GenerationBackend, Intervention, SamplingConfig, check_features, check_intervention, cut_at_stop
from igds_ray.models.loading import decoder_layers, layer_from_hook_name, load_model, load_sae, load_tokenizer, resolve_device
from igds_ray.models.runner import FeatureEncoder, LayerRunner
from igds_ray.tokenize import pooled_mask


class HFBackend(GenerationBackend):
    def __init__(
        self,
        model: ModelConfig,
        sae: SAEConfig | None = None,
        device: torch.device | str | None = None,
        batch_size: int = 32,
    ) -> None:
        self.device = torch.device(device) if device is not None else resolve_device(model.device)
        self.tok = load_tokenizer(model)
        self.tok.padding_side = "left"  # not persisted by save_pretrained: set after every load
        self.model = load_model(model, self.device)
        self.sae = load_sae(sae, self.device) if sae is not None else None
        self.sae_layer = layer_from_hook_name(self.sae.cfg.metadata.hook_name) if self.sae is not None else None
        self.batch_size = batch_size
        self.hook_calls = 0
        self._steers: dict[tuple[int, ...], FeatureSteer] = {}

    # -- interventions ------------------------------------------------------------------------

    def steer(self, intervention: Intervention) -> FeatureSteer:
        check_intervention(intervention, self.sae, self.sae_layer)
        key = tuple(intervention.features)
        if key not in self._steers:
            # The update is computed in float32 and added in the stream's dtype (bf16 on GPUs).
            self._steers[key] = FeatureSteer.from_sae(self.sae, intervention.layer, key, self.device, torch.float32)
        return self._steers[key]

    @contextmanager
    def intervened(self, intervention: Intervention | None) -> Iterator[None]:
        """Apply the intervention to every forward pass inside the context; fail if it never ran."""
        if intervention is None:
            yield
            return
        steer = self.steer(intervention)
        # Built once here: the hook itself then runs on device tensors only (no copy, no sync).
        mult, offset = steer.coefficient_tensors(intervention)
        before = self.hook_calls

        def hook(_mod: torch.nn.Module, _inp: Any, out: Any) -> Any:
            self.hook_calls += 1
            if isinstance(out, (tuple, list)):
                return (steer.apply_affine(out[0], mult, offset), *out[1:])
            return steer.apply_affine(out, mult, offset)

        handle = decoder_layers(self.model)[intervention.layer].register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()
        if self.hook_calls == before:
            raise RuntimeError(f"intervention {intervention} was requested but the hook never ran")

    # -- generation ----------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(
        self, prompts: Sequence[str], sampling: SamplingConfig, intervention: Intervention | None = None
    ) -> list[str]:
        out: list[str | None] = [None] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        greedy = sampling.temperature <= 0
        gen_kwargs: dict[str, Any] = dict(
            max_new_tokens=sampling.max_new_tokens,
            do_sample=not greedy,
            repetition_penalty=sampling.repetition_penalty,
            pad_token_id=self.tok.pad_token_id,
            eos_token_id=self.tok.eos_token_id,
        )
        if not greedy:
            gen_kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p)
            torch.manual_seed(sampling.seed)
        else:  # silence "temperature set but do_sample=False" from the model's generation_config
            gen_kwargs.update(temperature=None, top_p=None, top_k=None)
        if sampling.stop:
            gen_kwargs.update(stop_strings=list(sampling.stop), tokenizer=self.tok)
        with self.intervened(intervention):
            for s in range(0, len(order), self.batch_size):
                idx = order[s : s + self.batch_size]
                enc = self.tok([prompts[i] for i in idx], return_tensors="pt", padding=True).to(self.device)
                gen = self.model.generate(**enc, **gen_kwargs)
                new = gen[:, enc["input_ids"].shape[1] :]
                texts = self.tok.batch_decode(new, skip_special_tokens=True)
                for i, t in zip(idx, texts):
                    out[i] = cut_at_stop(t, sampling.stop)
        return [t if t is not None else "" for t in out]

    @torch.inference_mode()
    def loglik(
        self, prompts: Sequence[str], references: Sequence[str], intervention: Intervention | None = None
    ) -> list[float]:
        """Mean per-token log-likelihood of each reference given its prompt (teacher forcing, no decoding)."""
        if len(prompts) != len(references):
            raise ValueError("prompts and references differ in length")
        res: list[float] = [0.0] * len(prompts)
        with self.intervened(intervention):
            for s in range(0, len(prompts), self.batch_size):
                idx = list(range(s, min(s + self.batch_size, len(prompts))))
                p_ids = self.tok([prompts[i] for i in idx])["input_ids"]
                r_ids = self.tok([references[i] for i in idx], add_special_tokens=False)["input_ids"]
                seqs = [p + r for p, r in zip(p_ids, r_ids)]
                T = max(len(x) for x in seqs)
                ids = torch.full((len(idx), T), self.tok.pad_token_id, dtype=torch.long)
                mask = torch.zeros((len(idx), T), dtype=torch.long)
                for j, x in enumerate(seqs):
                    ids[j, : len(x)] = torch.tensor(x)
                    mask[j, : len(x)] = 1
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
                logp = torch.log_softmax(logits.float(), dim=-1)
                for j, (p, r) in enumerate(zip(p_ids, r_ids)):
                    if not r:
                        res[idx[j]] = float("nan")
                        continue
                    pos = torch.arange(len(p) - 1, len(p) + len(r) - 1, device=logp.device)
                    tgt = torch.tensor(r, device=logp.device)
                    res[idx[j]] = float(logp[j, pos, tgt].mean())
        return res

    @torch.inference_mode()
    def activation_quantile(
        self, prompts: Sequence[str], layer: int, features: Sequence[int], q: float = 0.99
    ) -> list[float]:
        """Each latent's q-quantile activation (linear interpolation, numpy's default) over the prompts'
        token positions where it is active (> 0), special and padding tokens (and a BOS-less sink) excluded; 0.0 for a latent
        never active. One forward pass per batch, stopped after block `layer`."""
        if not 0.0 <= float(q) <= 1.0:
            raise ValueError(f"activation_quantile q must be in [0, 1], got {q!r}")
        if not prompts:
            raise ValueError("activation_quantile needs at least one prompt")
        feats = [int(f) for f in features]
        if not feats:
            raise ValueError("activation_quantile needs at least one feature")
        check_features(self.sae, self.sae_layer, layer, feats, what="activation_quantile")
        runner = LayerRunner(self.model, layer, prune=False)
        encoder = FeatureEncoder(self.sae, feats)
        ids_list = self.tok(list(prompts))["input_ids"]  # with BOS etc., as generate sees them
        order = sorted(range(len(ids_list)), key=lambda i: -len(ids_list[i]))
        kept: list[torch.Tensor] = []  # [n_tokens, k] per batch, left on the device until the end
        for s in range(0, len(order), self.batch_size):
            seqs = [ids_list[i] for i in order[s : s + self.batch_size]]
            # Right padding: real tokens keep positions 0..n-1 in a plain forward (left padding would
            # shift them, and a plain forward does not derive positions from the mask as generate does).
            T = max(1, max(len(x) for x in seqs))
            ids = torch.full((len(seqs), T), self.tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(seqs), T), dtype=torch.long)
            for j, x in enumerate(seqs):
                ids[j, : len(x)] = torch.tensor(x, dtype=torch.long)
                mask[j, : len(x)] = 1
            use = pooled_mask(ids, mask, self.tok).to(self.device)
            hidden = runner(ids.to(self.device), mask.to(self.device))
            kept.append(encoder(hidden[use]).float())
        acts = torch.cat(kept).cpu().double().numpy()
        out = []
        for j in range(len(feats)):
            col = acts[:, j]
            col = col[col > 0]
            out.append(float(np.quantile(col, float(q))) if col.size else 0.0)
        return out

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]
        self.sae = None
        self._steers.clear()
