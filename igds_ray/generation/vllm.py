"""vLLM generation backend (offline `LLM` API) with the SAE-feature intervention compiled into the model.

How the intervention gets into vLLM (checked on vLLM 0.32, CPU build; see tests/test_vllm_backend.py):

* The intervention is compiled into decoder layer L while the model loads (a subclass of that one
  module's class whose forward adds the update, with all its state in buffers updated in place);
  see igds_ray/generation/vllm_steering.py for why and how, and for both modes' coefficients.
* State changes must reach the module in this process: the engine runs in-process
  (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, one worker), which rules out tensor/pipeline parallelism.
* Caches: the prefix cache would hand an intervened request the KV blocks of an unintervened one
  (or of another intervention) for a shared prompt prefix. Every intervened request carries a
  `cache_salt` naming its intervention (layer, features, mode, factor, value:
  `Intervention.cache_key`), so blocks are shared only between requests with the same intervention.
  vLLM's on-disk compile cache could load a graph traced without the patch, so it is disabled
  (`VLLM_DISABLE_COMPILE_CACHE=1`) whenever an SAE is given.
* Activation quantiles (`activation_quantile`, for clamp values) are not computed here: the HF
  backend computes them with one truncated forward, without a generation engine.

Fine-tuned arms (`ModelConfig.adapter`, a PEFT LoRA directory): the HF backend merges the adapter
into the weights; vLLM serves it unmerged as a LoRA adapter instead (`enable_lora`, `max_lora_rank`
= the adapter's largest rank rounded up to a rank vLLM accepts, and one `LoRARequest` on every
request). The result is the same model up to float rounding order (x W^T + s (x A^T) B^T against
x (W + s B A)^T). vLLM's LoRA wrappers replace the linear submodules (qkv_proj, o_proj, ...), not
the decoder layers, and are installed after the model loader returns, so the layer-L patch is
unaffected; after the engine is built the backend checks that layer L of the served model is still
the patched module. On CPUs vLLM turns compilation off whenever LoRA is enabled (eager engine).
The adapter is loaded when the engine is built, so a bad adapter fails there, not mid-run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import typing
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from igds_ray.config import ModelConfig, SAEConfig
from igds_ray.errors import ConfigError
from igds_ray.generation.base import FeatureSteer, GenerationBackend, Intervention, SamplingConfig, check_intervention, cut_at_stop
from igds_ray.generation.vllm_steering import BUFFER_PREFIX, install_steering, patch_model_loading, steer_delta
from igds_ray.models.loading import decoder_layers, layer_from_hook_name, load_sae, load_tokenizer, resolve_dtype

__all__ = ["VLLMBackend", "adapter_max_rank", "adapter_modules", "install_steering", "steer_delta", "vllm_lora_rank"]

log = logging.getLogger(__name__)


def _set_vllm_env(**values: str) -> None:
    """Set vLLM environment flags; vLLM caches its env reads once an engine started, so clear that cache."""
    os.environ.update(values)
    import vllm.envs as envs

    getter = getattr(envs, "__getattr__", None)
    if getter is not None and hasattr(getter, "cache_clear"):
        getter.cache_clear()


def adapter_max_rank(adapter_dir: str | os.PathLike[str]) -> int:
    """The largest LoRA rank in a PEFT adapter directory (`r` and any `rank_pattern` override)."""
    path = Path(adapter_dir) / "adapter_config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.adapter {str(adapter_dir)!r}: cannot read {path.name} ({e})") from None
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise ConfigError(f"model.adapter {str(adapter_dir)!r}: vLLM serves LoRA adapters only, not {peft_type}")
    ranks = [cfg.get("r"), *(cfg.get("rank_pattern") or {}).values()]
    if not all(isinstance(r, int) and r > 0 for r in ranks):
        raise ConfigError(f"model.adapter {str(adapter_dir)!r}: bad LoRA ranks {ranks} in {path.name}")
    return max(ranks)


_LORA_KEY_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")


def adapter_modules(adapter_dir: str | os.PathLike[str]) -> list[str]:
    """The module names (last path component: q_proj, down_proj, ...) a PEFT LoRA adapter has weights for,
    read from the keys of adapter_model.safetensors (empty when there is no such file)."""
    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not path.is_file():
        return []
    from safetensors import safe_open

    mods = set()
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            parts = key.split(".")
            i = next((j for j, part in enumerate(parts) if part in _LORA_KEY_PARTS), None)
            if i is not None and i > 0:
                mods.add(parts[i - 1])
    return sorted(mods)


def vllm_lora_rank(rank: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts that holds a LoRA of this rank."""
    from vllm.config.lora import MaxLoRARanks

    allowed = sorted(typing.get_args(MaxLoRARanks))
    fits = [a for a in allowed if a >= rank]
    if not fits:
        raise ConfigError(f"LoRA rank {rank} is above the largest max_lora_rank vLLM supports ({allowed[-1]})")
    return fits[0]


class VLLMBackend(GenerationBackend):
    """Generation through vLLM's offline engine, with interventions on SAE features at layer L.

    Options: `enforce_eager` (False = vLLM compiles the model; the intervention works either way),
    `max_model_len`, `gpu_memory_utilization`, `dtype` (default: the model config's; auto = bfloat16
    on GPUs, float32 on CPUs, as in the HF backend), `seed`, `max_features` (the most features one
    intervention may touch: the buffers are sized once, before compilation) and any other keyword
    for `vllm.LLM` (e.g. `kv_cache_memory_bytes`: 1 GiB by default on CPUs, `block_size`).
    With `model.adapter` set, the adapter is served as a vLLM LoRA on every request (see the module doc).

    Side effects on the process: sets VLLM_ENABLE_V1_MULTIPROCESSING=0 (and, with an SAE,
    VLLM_DISABLE_COMPILE_CACHE=1); on CPUs vLLM's worker then pins this process's OpenMP threads
    (torch runs with one thread per bound core), which also slows other torch work in the process.
    """

    def __init__(
        self,
        model: ModelConfig,
        sae: SAEConfig | None = None,
        *,
        enforce_eager: bool = False,
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.9,
        dtype: str | None = None,
        seed: int = 0,
        max_features: int = 16,
        **llm_kwargs: Any,
    ) -> None:
        for key in ("tensor_parallel_size", "pipeline_parallel_size"):
            if int(llm_kwargs.get(key, 1)) != 1:
                raise ValueError(f"VLLMBackend runs one in-process worker: {key} must be 1")
        # In-process engine: the intervention state lives in this process's copy of the model.
        env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        if sae is not None:
            env["VLLM_DISABLE_COMPILE_CACHE"] = "1"
        _set_vllm_env(**env)
        from vllm import LLM
        from vllm.platforms import current_platform

        self.tok = load_tokenizer(model)
        if dtype is None:
            device = torch.device("cpu" if current_platform.is_cpu() else "cuda")
            dtype = str(resolve_dtype(model.dtype, device)).removeprefix("torch.")
        self.max_features = int(max_features)
        if self.max_features < 1:
            raise ValueError("max_features must be >= 1")
        if current_platform.is_cpu() and "kv_cache_memory_bytes" not in llm_kwargs \
                and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            # On CPUs vLLM otherwise reserves gpu_memory_utilization x the node's RAM for the KV cache.
            llm_kwargs["kv_cache_memory_bytes"] = 1 << 30
        self.sae = None
        self.sae_layer: int | None = None
        self._layer: nn.Module | None = None
        self.lora: Any = None  # vllm.lora.request.LoRARequest for model.adapter
        if model.adapter:
            adapter = model.adapter
            if (Path(adapter) / "adapter_config.json").is_file():
                adapter = str(Path(adapter).resolve())
                llm_kwargs.setdefault("max_lora_rank", vllm_lora_rank(adapter_max_rank(adapter)))
                # Wrap only the modules the adapter adapts. Unrestricted, vLLM also wraps the logits
                # processor (lm_head LoRA), whose CPU kernel breaks prompt logprobs (loglik) in vLLM 0.32.
                mods = adapter_modules(adapter)
                if mods:
                    llm_kwargs.setdefault("lora_target_modules", mods)
            elif Path(adapter).exists() or "max_lora_rank" not in llm_kwargs:
                raise ConfigError(
                    f"model.adapter {adapter!r}: no adapter_config.json there (expected a local PEFT adapter "
                    "dir; for a remote one pass max_lora_rank to VLLMBackend)"
                )
            if llm_kwargs.get("enable_lora") is False:
                raise ValueError("model.adapter is set but enable_lora=False was passed")
            llm_kwargs["enable_lora"] = True
            from vllm.lora.request import LoRARequest

            self.lora = LoRARequest(lora_name=f"igds:{adapter}", lora_int_id=1, lora_path=adapter)
        patch: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        if sae is not None:
            # The SAE stays on the CPU: only the sliced rows go to the model's device.
            self.sae = load_sae(sae, torch.device("cpu"))
            self.sae_layer = layer_from_hook_name(self.sae.cfg.metadata.hook_name)
            # Refuse SAEs that cannot be steered (TopK, run-time normalization) before building anything.
            FeatureSteer.from_sae(self.sae, self.sae_layer, (0,), torch.device("cpu"), torch.float32)
            patch = patch_model_loading(self._on_model_loaded)
        with patch:
            self.llm = LLM(
                model=model.name_or_path,
                tokenizer=model.tokenizer,
                revision=model.revision,
                trust_remote_code=model.trust_remote_code,
                dtype=dtype,
                seed=seed,
                enforce_eager=enforce_eager,
                max_model_len=max_model_len,
                gpu_memory_utilization=gpu_memory_utilization,
                **llm_kwargs,
            )
        if sae is not None and self._layer is None:
            raise RuntimeError(
                "vLLM loaded the model outside this process (multiprocessing or a distributed executor), "
                "so the intervention could not be installed; run with VLLM_ENABLE_V1_MULTIPROCESSING=0 "
                "and a single worker"
            )
        if self.lora is not None:
            # Load (and validate: rank, DoRA, bias, modules_to_save, ...) the adapter now, not at the first request.
            try:
                self.llm.llm_engine.add_lora(self.lora)
            except Exception as e:
                self.close()
                raise ConfigError(f"model.adapter {model.adapter!r}: vLLM cannot serve it ({type(e).__name__}: {e})") \
                    from None
        if self._layer is not None:
            self._check_patch_in_model()
        self._lora_logits = False
        if self.lora is not None:
            from vllm.lora.layers.logits_processor import LogitsProcessorWithLoRA

            self._lora_logits = any(self.llm.apply_model(
                lambda m: any(isinstance(x, LogitsProcessorWithLoRA) for x in m.modules())))

    def _check_patch_in_model(self) -> None:
        """Layer L of the model the engine runs must still be the patched module (LoRA or other wrappers
        installed after loading could have replaced it, and the intervention would silently do nothing)."""
        L, layer = self.sae_layer, self._layer

        def find(model: nn.Module) -> str | None:
            got = decoder_layers(model)[L]
            return None if got is layer else type(got).__name__

        found = [f for f in self.llm.apply_model(find)]
        if any(f is not None for f in found):
            self.close()
            raise RuntimeError(
                f"vLLM replaced decoder layer {L} after loading (now {found}), so the SAE intervention "
                "would not run; this combination of vLLM options (e.g. LoRA) is not supported with interventions"
            )

    def _on_model_loaded(self, model: nn.Module) -> None:
        assert self.sae is not None and self.sae_layer is not None
        if self._layer is not None:  # a second model in the same engine (e.g. a draft model): leave it
            return
        layers = decoder_layers(model)
        if self.sae_layer >= len(layers):
            raise ValueError(f"the SAE reads layer {self.sae_layer}, but the model has {len(layers)} layers")
        cfg = self.sae.cfg
        log.info("igds: steering hook compiled into decoder layer %d (%s)", self.sae_layer,
                 type(layers[self.sae_layer]).__name__)
        self._layer = install_steering(
            layers[self.sae_layer], int(cfg.d_in), self.max_features,
            jumprelu=type(self.sae).__name__ == "JumpReLUSAE", apply_b_dec=bool(cfg.apply_b_dec_to_input),
        )

    # -- interventions ------------------------------------------------------------------------

    @property
    def hook_calls(self) -> int:
        """Forward passes of the patched layer so far (counted on the device, inside the compiled graph)."""
        return int(self._layer._igds_calls.item()) if self._layer is not None else 0

    def _check(self, intervention: Intervention) -> None:
        check_intervention(intervention, self.sae if self._layer is not None else None, self.sae_layer)
        if len(intervention.features) > self.max_features:
            raise ValueError(
                f"{len(intervention.features)} features in one intervention; this backend was built with "
                f"max_features={self.max_features}"
            )

    @torch.no_grad()
    def _load_state(self, intervention: Intervention | None) -> None:
        """Write the intervention into the patched layer's buffers, in place (compiled graphs hold them)."""
        layer = self._layer
        if layer is None:
            return
        # Zero coefficients first: from here on the layer adds nothing, whatever the other buffers hold.
        layer._igds_scale.zero_()
        layer._igds_offset.zero_()
        if intervention is None:
            return
        steer = FeatureSteer.from_sae(self.sae, intervention.layer, intervention.features,
                                      layer._igds_W_enc.device, layer._igds_W_enc.dtype)
        k = len(intervention.features)
        for name in ("W_enc", "b_enc", "threshold", "W_dec"):
            getattr(layer, BUFFER_PREFIX + name).zero_()
        layer._igds_W_enc[:, :k].copy_(steer.W_enc)
        layer._igds_b_enc[:k].copy_(steer.b_enc)
        if steer.threshold is not None:
            layer._igds_threshold[:k].copy_(steer.threshold)
        layer._igds_W_dec[:k].copy_(steer.W_dec)
        layer._igds_b_dec.copy_(steer.b_dec)
        # The coefficients in Python (double), then rounded once: the HF hook uses the same floats.
        mult, offset = intervention.coefficients()
        layer._igds_scale[:k].fill_(mult)
        layer._igds_offset[:k].fill_(offset)

    # -- generation ----------------------------------------------------------------------------

    def _sampling_params(self, sampling: SamplingConfig, i: int) -> Any:
        from vllm import SamplingParams

        greedy = sampling.temperature <= 0
        return SamplingParams(
            n=1,
            max_tokens=sampling.max_new_tokens,
            temperature=0.0 if greedy else sampling.temperature,
            top_p=1.0 if greedy else sampling.top_p,
            repetition_penalty=sampling.repetition_penalty,
            # One seed per prompt, so that repeated prompts give different samples, reproducibly.
            seed=None if greedy else sampling.seed + i,
            stop=list(sampling.stop) or None,
            # Stop strings need vLLM's detokenizer; the returned text is decoded below either way.
            detokenize=bool(sampling.stop),
        )

    def _run(self, ids: Sequence[Sequence[int]], params: Sequence[Any], intervention: Intervention | None) -> list[Any]:
        """`LLM.generate` on token ids with the intervention loaded; each intervention salts the prefix cache."""
        from vllm.inputs import TokensPrompt

        if intervention is not None:
            self._check(intervention)
        salt = intervention.cache_key() if intervention is not None else None
        reqs = []
        for x in ids:
            p = TokensPrompt(prompt_token_ids=list(x))
            if salt is not None:
                p["cache_salt"] = salt
            reqs.append(p)
        before = self.hook_calls
        self._load_state(intervention)
        try:
            outs = self.llm.generate(reqs, list(params), use_tqdm=False, lora_request=self.lora)
        finally:
            self._load_state(None)
        if intervention is not None and self.hook_calls == before:
            raise RuntimeError(
                f"intervention {intervention} was requested but the patched layer never ran "
                "(the compiled model does not contain it)"
            )
        return outs

    def generate(
        self, prompts: Sequence[str], sampling: SamplingConfig, intervention: Intervention | None = None
    ) -> list[str]:

        if intervention is not None:
            self._check(intervention)
        if not prompts:
            return []
        # Tokenize here, as the HF backend does, so both backends see the same ids.
        ids = self.tok(list(prompts))["input_ids"]
        outs = self._run(ids, [self._sampling_params(sampling, i) for i in range(len(prompts))], intervention)
        texts = []
        for o in outs:
            text = self.tok.decode(list(o.outputs[0].token_ids), skip_special_tokens=True)
            texts.append(cut_at_stop(text, sampling.stop))
        return texts

    def loglik(
        self, prompts: Sequence[str], references: Sequence[str], intervention: Intervention | None = None
    ) -> list[float]:
        """Mean per-token log-likelihood of each reference given its prompt (teacher forcing), as
        `HFBackend.loglik`: vLLM's prompt logprobs of the reference tokens (raw logits, one step)."""
        from vllm import SamplingParams

        if len(prompts) != len(references):
            raise ValueError("prompts and references differ in length")
        if self._lora_logits:
            raise NotImplementedError(
                "loglik with a LoRA on the LM head (or an adapter whose modules could not be read from "
                "adapter_model.safetensors): vLLM 0.32 applies the LM-head LoRA per request, not per prompt "
                "position, so prompt logprobs are wrong or fail; use the HF backend for loglik"
            )
        if not prompts:
            return []
        p_ids = self.tok(list(prompts))["input_ids"]
        r_ids = self.tok(list(references), add_special_tokens=False)["input_ids"]
        # Requests with prompt logprobs never read the prefix cache (vLLM sets skip_reading_prefix_cache).
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        outs = self._run([p + r for p, r in zip(p_ids, r_ids)], [params] * len(prompts), intervention)
        res = []
        for o, p, r in zip(outs, p_ids, r_ids):
            if not r:
                res.append(float("nan"))
                continue
            lps = [o.prompt_logprobs[len(p) + j][tok].logprob for j, tok in enumerate(r)]
            res.append(sum(lps) / len(lps))
        return res

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        self.llm = None
        self._layer = None
        self.sae = None
        self.lora = None
        if llm is not None:
            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown()
            del llm
