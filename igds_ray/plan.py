"""`igds plan`: does a run fit its GPUs, how long will it take, what will it cost, before any compute.

Per GPU stage, the memory one actor (or worker) needs on its share of a GPU, from the model's shape
(no weights), the SAE's width and the stage's settings:
- **recall / score / loss+IFD**: weights (scoring and recall: the first L+1 blocks only) + a forward's
  activations for the stage's `token_budget` + the SAE (recall: every latent; scoring: the k chosen
  columns) + a fixed workspace;
- **generation** (causal trials, evaluation): HF: weights + KV cache for `gen_batch_size` x (prompt +
  new tokens); vLLM: its reservation (`vllm_memory_options`: 0.9 of the GPU shared by the engines on
  it) must hold the weights, the workspace and the KV cache of one `max_model_len` sequence;
- **fine-tuning**: weights + LoRA or full optimizer state + activations for `batch_size` x
  `max_tokens` (gradient checkpointing: the layer inputs only) + the float32 logits and their copies
  in the loss. Evaluation loads one model at a time (vLLM is closed before the HF copy that reads activations).

Time comes from a FLOP model **calibrated on one measured H200** (BENCHMARKS.md, "GPU: one NVIDIA
H200"): the forward, LoRA and full fine-tuning rates measured there, as fractions of the measured
bf16 matmul rate, scaled to other GPU types by their datasheet bf16 rates; decode steps by a
roofline whose bandwidth efficiency is assumed (vLLM with CUDA graphs is unmeasured), or, for HF
generation, by the per-layer step time measured there. Costs use the config's `report` prices.
Token counts come from the pool's Parquet metadata and a sample (or `--pool-rows`, `--tokens-per-row`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from igds_ray.errors import ConfigError
from igds_ray.hardware import GIB, GPUType, ModelShape, gpu_type, model_shape, sae_shape

# ---- calibration: one NVIDIA H200, Gemma-2-2B shape, bf16 (benchmarks/results/gpu_check_h200.json)
H200_MATMUL_TFLOPS = 761.0  # measured bf16 8192^3 matmul
MATMUL_OF_DATASHEET = H200_MATMUL_TFLOPS / 989.0  # assumed the same fraction on every GPU type
WORKSPACE_BYTES = 2.0e9  # fixed forward workspace: scorer peak 5.75 GB at 8k tokens, 7.43 GB at 32k
INF_H, INF_I = 3, 3  # forward activation bytes per token = 2 x (INF_H x hidden + INF_I x intermediate)
ACT_H, ACT_I = 14, 4  # training activations per token and layer = 2 x (ACT_H x hidden + ACT_I x intermediate)
LOGIT_COPIES = 4  # float32 logits copies in the loss and its backward (+1 with soft-capping); LoRA peak 76.9 GB
CONTEXT_BYTES = 1.0 * GIB  # CUDA context and allocator slack per process (assumed)
VLLM_UTIL = 0.9  # vLLM's default share of a GPU, split between the engines on it
VLLM_BW_EFF = 0.7  # decode: achieved fraction of the datasheet bandwidth (assumed: unmeasured)
HF_STEP_S_PER_LAYER = (64 / 2636) / 26  # HF generate, batch 64: 24 ms per step over 26 layers (launch-bound)
RATES = {"forward": (174021, 2, "score"), "lora": (15447, 4, "all"), "full": (16422, 6, "all")}  # tok/s, x params


def _gemma() -> ModelShape:
    from igds_ray.hardware import KNOWN_SHAPES, shape_from_config

    return shape_from_config(KNOWN_SHAPES["google/gemma-2-2b"], "calibration")


def mfu(kind: str) -> float:
    """Achieved fraction of the matmul rate for a forward, a LoRA step or a full step (H200-measured)."""
    tps, mult, which = RATES[kind]
    g = _gemma()
    params = g.matmul_params(13, head=False) if which == "score" else g.matmul_params()
    return tps * mult * params / (H200_MATMUL_TFLOPS * 1e12)


@dataclass
class StagePlan:
    stage: str
    key: str  # the config key to change when it does not fit
    gpus_per_actor: float
    actors: int
    need_bytes: float
    gpu_seconds: float
    note: str = ""
    have_bytes: float = 0.0
    fits: bool = True
    wall_s: float = 0.0
    cost: float = 0.0


@dataclass
class Plan:
    gpu: str
    model_source: str
    sae: dict
    pool_rows: int
    tokens_per_row: float
    stages: list[StagePlan] = field(default_factory=list)
    roi: dict = field(default_factory=dict)

    @property
    def fits(self) -> bool:
        return all(s.fits for s in self.stages)

    def refusal(self) -> str | None:
        bad = [s for s in self.stages if not s.fits]
        if not bad:
            return None
        s = bad[0]
        return (f"stage {s.stage} does not fit on {self.gpu}: it needs {s.need_bytes / GIB:.1f} GiB per actor and "
                f"{s.gpus_per_actor:g} GPU of {self.gpu} holds {s.have_bytes / GIB:.1f} GiB; change {s.key}")


def vllm_memory_options(num_gpus: float, prompt_tokens: int, max_new_tokens: int, max_positions: int | None = None
                        ) -> dict[str, Any]:
    """vLLM engine options from the memory plan: a context just long enough for the longest prompt plus the
    generation, and 0.9 of the GPU split between the engines that share it (fractional `num_gpus`)."""
    per_gpu = max(1, int(math.floor(1.0 / num_gpus + 1e-9))) if 0 < num_gpus < 1 else 1
    length = int(prompt_tokens) + int(max_new_tokens) + 8  # + a few tokens of chat/BOS slack
    if max_positions:
        length = min(length, int(max_positions))
    return {"max_model_len": length, "gpu_memory_utilization": round(VLLM_UTIL / per_gpu, 4)}


def vllm_options(model: Any, prompts: list[str], references: list[str], max_new_tokens: int, num_gpus: float
                 ) -> dict[str, Any]:
    """`vllm_memory_options` for these prompts: `max_model_len` from the longest prompt plus the longer of the
    generation and the longest reference (teacher-forced log-likelihood), measured with the model's tokenizer."""
    from igds_ray.models.loading import load_tokenizer

    tok = load_tokenizer(model)
    longest = max((len(ids) for ids in tok(list(prompts))["input_ids"]), default=0)
    ref = max((len(ids) for ids in tok(list(references), add_special_tokens=False)["input_ids"]), default=0) \
        if references else 0
    return vllm_memory_options(num_gpus, longest, max(max_new_tokens, ref))


def _defaults(cls: type) -> dict[str, Any]:
    """A config dataclass's field defaults (the fields without one are left out)."""
    import dataclasses

    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _forward_bytes(m: ModelShape, tokens: int) -> float:
    return WORKSPACE_BYTES + tokens * 2 * (INF_H * m.hidden + INF_I * m.intermediate)


def _decode_step_s(g: GPUType, m: ModelShape, wbytes: float, batch: int, backend: str) -> float:
    compute = 2 * m.matmul_params() * batch / _rate(g, "forward")
    memory = wbytes / (VLLM_BW_EFF * g.hbm_gbs * 1e9)
    step = max(compute, memory)
    return max(step, HF_STEP_S_PER_LAYER * m.layers) if backend == "hf" else step


def _rate(g: GPUType, kind: str) -> float:
    return mfu(kind) * g.bf16_tflops * MATMUL_OF_DATASHEET * 1e12


def plan(cfg: Any, gpu: str, pool_rows: int | None = None, tokens_per_row: float | None = None,
         prompt_tokens: int = 256, eval_examples: int = 1000, cluster_gpus: int | None = None,
         sae_width: int | None = None, sae_layer: int | None = None) -> Plan:
    """The memory, time and cost plan of a `RunConfig` on GPUs of type `gpu`."""
    from igds_ray.baselines.lm import LMConfig
    from igds_ray.stages.finetune import FinetuneConfig

    g = gpu_type(gpu)
    m = model_shape(cfg.model.name_or_path, cfg.model.revision)
    s = sae_shape(cfg.sae.path, cfg.sae.release, cfg.sae.sae_id, m.hidden, sae_width, sae_layer)
    if s.layer >= m.layers or s.layer < 0:
        raise ConfigError(f"sae: layer {s.layer} is outside the model's {m.layers} layers")
    rows, tpr = pool_stats(cfg.pool, pool_rows, tokens_per_row)
    wb = 4 if cfg.model.dtype == "float32" else 2
    sae_b = 4 if cfg.sae.dtype == "float32" else 2
    p = Plan(g.name, m.source, asdict(s), rows, tpr)
    trunc_w = m.params(s.layer + 1, head=False) * wb
    full_w = m.params() * wb
    fwd = _rate(g, "forward")
    k_max = max(cfg.causal.k, 5 if "igds_k5" in cfg.arms else 0)
    ft = {**_defaults(FinetuneConfig), **cfg.finetune}  # the arms' shared FinetuneConfig keys over its defaults
    gpu_h = cfg.report.price_per_gpu_hour

    def add(st: StagePlan, concurrent_gpus: float) -> None:
        st.have_bytes = g.mem_gib * GIB * min(1.0, st.gpus_per_actor) - CONTEXT_BYTES
        st.fits = st.gpus_per_actor == 0 or st.need_bytes <= st.have_bytes
        gpus = min(concurrent_gpus, cluster_gpus) if cluster_gpus else concurrent_gpus
        st.wall_s = st.gpu_seconds / gpus if gpus > 0 else 0.0
        st.cost = st.gpu_seconds / 3600 * gpu_h
        p.stages.append(st)

    # recall: every latent of the SAE, forward to layer L, on recall.limit x templates prompts
    r = cfg.recall
    units = (r.limit or 1000) * len(r.templates)
    need = trunc_w + 2 * s.d_in * s.d_sae * sae_b + _forward_bytes(m, r.token_budget) + r.token_budget * s.d_sae * 4
    add(StagePlan("recall", "recall.token_budget", r.num_gpus, r.actors, need,
                  units * prompt_tokens * 2 * m.matmul_params(s.layer + 1, head=False) / fwd),
        r.actors * r.num_gpus)

    # causal trials: one generation per candidate x factor (+ the noise floor), on dev_limit prompts
    c = cfg.causal
    trials = r.top_n * len(c.factors) + 2 * c.gen_actors
    batches = math.ceil(c.dev_limit / c.gen_batch_size)
    step = _decode_step_s(g, m, full_w, min(c.gen_batch_size, c.dev_limit), c.backend)
    per_trial = batches * c.max_new_tokens * step + c.dev_limit * prompt_tokens * 2 * m.matmul_params() / fwd
    if c.loglik:
        per_trial += c.dev_limit * (prompt_tokens + c.max_new_tokens) * 2 * m.matmul_params() / fwd
    add(StagePlan("causal", "causal.gen_batch_size" if c.backend == "hf" else "causal.gen_num_gpus",
                  c.gen_num_gpus, c.gen_actors,
                  _generation_bytes(m, g, full_w, c.backend, c.gen_num_gpus, c.gen_batch_size, prompt_tokens,
                                    c.max_new_tokens), trials * per_trial,
                  note=f"{trials} trials, {c.backend}"), c.gen_actors * c.gen_num_gpus)

    # scoring: one pass over the pool per IGDS scores directory (igds, its ablations, igds_response)
    sc = cfg.score
    igds_dirs = len({a for a in cfg.arms if a.startswith("igds")})
    need = trunc_w + 2 * s.d_in * max(16, k_max) * sae_b + _forward_bytes(m, sc.token_budget)
    tokens = rows * min(tpr, sc.max_tokens)
    add(StagePlan("score", "score.token_budget", sc.num_gpus, sc.max_actors, need,
                  igds_dirs * tokens * 2 * m.matmul_params(s.layer + 1, head=False) / fwd,
                  note=f"{igds_dirs} scoring pass(es)"), sc.max_actors * sc.num_gpus)

    # loss / IFD: the full model over the pool (IFD twice: with and without the prompt); logits in chunks
    lm = {**_defaults(LMConfig), **cfg.baselines.get("lm", {})}
    passes = (1 if "loss" in cfg.arms else 0) + (2 if "ifd" in cfg.arms else 0) - (1 if {"loss", "ifd"} <= set(cfg.arms) else 0)
    if passes:
        need = full_w + _forward_bytes(m, lm["token_budget"]) + 3 * 256 * 2**20
        add(StagePlan("loss_ifd", "baselines.lm.token_budget", lm["num_gpus"], lm["actors"], need,
                      passes * rows * min(tpr, lm["max_tokens"]) * 2 * m.matmul_params() / fwd),
            lm["actors"] * lm["num_gpus"])

    # fine-tuning: every arm at equal epochs (full: every row; the others: the fraction)
    method = ft["method"]
    bs, T = int(ft["batch_size"]), int(ft["max_tokens"])
    workers, gpw = int(ft["num_workers"]), float(ft["gpus_per_worker"]) if ft["use_gpu"] else 0.0
    tok_mb = bs * T
    acts = tok_mb * 2 * (ACT_H * m.hidden + ACT_I * m.intermediate)
    acts = (tok_mb * 2 * m.hidden * m.layers + acts) if ft["gradient_checkpointing"] else acts * m.layers
    logits = tok_mb * m.vocab * 4 * (LOGIT_COPIES + (1 if m.softcap else 0))
    if method == "lora":
        state = m.params() * wb + m.lora_params(int(ft["lora_r"]), tuple(ft["target_modules"])) * 16
    else:
        state = m.params() * 16
    epochs = float(ft["epochs"])
    arm_rows = {a: rows if a == "full" else rows * cfg.fraction for a in cfg.arms}
    flop_mult = (4 if method == "lora" else 6) + (2 if ft["gradient_checkpointing"] else 0)
    ft_s = {a: n * min(tpr, T) * epochs * flop_mult * m.matmul_params() / _rate(g, method)
            for a, n in arm_rows.items()}
    add(StagePlan("finetune", "finetune.batch_size (or finetune.gradient_checkpointing: true)", gpw, workers,
                  state + acts + logits, sum(ft_s.values()), note=f"{len(arm_rows)} arms, {method}"),
        workers * gpw * max(1, cfg.finetune_concurrency))

    # evaluation: the base and every arm generate on the test set, then read the features' activation
    e = cfg.evaluate
    n_eval = e.limit or eval_examples
    # lm-eval generates through its own hf or vLLM model: plan it as that backend
    gen_backend = e.lm_eval_model if e.backend == "lm_eval" else e.backend
    step = _decode_step_s(g, m, full_w, min(e.batch_size, n_eval), gen_backend)
    per_arm = math.ceil(n_eval / e.batch_size) * e.max_new_tokens * step + 2 * n_eval * prompt_tokens * 2 \
        * m.matmul_params() / fwd
    gen = _generation_bytes(m, g, full_w, gen_backend, e.num_gpus, e.batch_size, prompt_tokens, e.max_new_tokens)
    need = max(gen, full_w + _forward_bytes(m, min(e.batch_size, n_eval) * prompt_tokens))
    tasks = f"; + lm-eval tasks {', '.join(e.lm_eval_tasks)} (not timed)" if e.lm_eval_tasks else ""
    add(StagePlan("evaluate", "evaluate.batch_size" if gen_backend == "hf" else "evaluate.num_gpus", e.num_gpus,
                  len(cfg.arms) + 1, need, (len(cfg.arms) + 1) * per_arm,
                  note=f"{n_eval} examples, {e.backend}{tasks}"),
        (len(cfg.arms) + 1) * e.num_gpus)

    by = {st.stage: st for st in p.stages}
    if "igds" in cfg.arms and "full" in cfg.arms:
        saved = ft_s["full"] - ft_s["igds"]
        overhead = by["recall"].gpu_seconds + by["causal"].gpu_seconds + by["score"].gpu_seconds / max(1, igds_dirs)
        p.roi = {"finetune_saved_gpu_h": saved / 3600, "igds_overhead_gpu_h": overhead / 3600,
                 "net_gpu_h": (saved - overhead) / 3600, "net_cost": (saved - overhead) / 3600 * gpu_h}
    return p


def _generation_bytes(m: ModelShape, g: GPUType, wbytes: float, backend: str, num_gpus: float, batch: int,
                      prompt_tokens: int, new_tokens: int) -> float:
    kv = m.kv_bytes_per_token(2)
    if backend == "vllm":
        # The engine must hold the weights, its workspace and one full-length sequence inside its reservation;
        # what it reserves is the stage's need (the rest of the GPU is for the engines beside it).
        opts = vllm_memory_options(num_gpus or 1.0, prompt_tokens, new_tokens, m.max_positions)
        inside = wbytes + WORKSPACE_BYTES + kv * opts["max_model_len"]
        reserved = opts["gpu_memory_utilization"] * g.mem_gib * GIB
        return max(inside, reserved) if inside <= reserved else inside + (g.mem_gib * GIB - reserved)
    return wbytes + kv * batch * (prompt_tokens + new_tokens) + batch * m.vocab * 4 * 2 + WORKSPACE_BYTES


def pool_stats(pool: Any, rows: int | None, tokens_per_row: float | None) -> tuple[int, float]:
    """(rows, mean tokens per row): the pool's footers (`igds_ray.pool.discover`, which also checks its columns)
    for the row count, the first 1,000 rows' characters / 4 for tokens."""
    if rows is not None and tokens_per_row is not None:
        return int(rows), float(tokens_per_row)
    import pyarrow.parquet as pq

    from igds_ray.pool import discover

    try:
        found = discover(pool.path, pool.text_columns, pool.id_column)
    except Exception as e:
        raise ConfigError(f"pool.path {pool.path!r}: cannot read it ({type(e).__name__}: {str(e)[:200]}); pass "
                          "--pool-rows and --tokens-per-row to plan without reading it") from None
    if tokens_per_row is None:
        from igds_ray.storage import filesystem

        fs, _ = filesystem(found.uri)
        with fs.open_input_file(found.files[0].path) as f:
            batch = next(pq.ParquetFile(f).iter_batches(batch_size=1000, columns=list(pool.text_columns)))
        sample = batch.to_pylist()
        chars = sum(len(str(v or "")) for r in sample for v in r.values()) / max(1, len(sample))
        tokens_per_row = chars / 4.0  # ~4 characters per token for English BPE (a sample, no tokenizer download)
    return (int(rows) if rows is not None else found.num_rows), float(tokens_per_row)


def cluster_gpus(path: str) -> tuple[int, str | None]:
    """(GPUs the cluster can hold at most, their type) from a Ray cluster-launcher YAML's GPU node types."""
    import yaml

    from igds_ray.hardware import ACCELERATOR_ALIASES

    try:
        spec = yaml.safe_load(open(path)) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"--cluster {path}: {e}") from None
    total, kind = 0, None
    for name, node in (spec.get("available_node_types") or {}).items():
        gpus = int((node.get("resources") or {}).get("GPU", 0))
        if not gpus:
            continue
        total += gpus * int(node.get("max_workers", 1))
        nc = node.get("node_config") or {}
        inst = str(nc.get("InstanceType") or nc.get("machineType") or "")
        family = inst.split(".")[0].split("-")[0]
        kind = kind or ACCELERATOR_ALIASES.get(family)
    return total, kind


def render(p: Plan) -> str:
    lines = [f"igds plan on {p.gpu} (model shape: {p.model_source}; SAE {p.sae['d_sae']} latents at layer "
             f"{p.sae['layer']}; pool {p.pool_rows:,} rows x {p.tokens_per_row:.0f} tokens)", "",
             "| stage | GPUs per actor | actors | memory per actor (GiB) | available (GiB) | fits | GPU-h | wall (h) | "
             "cost ($) | note |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in p.stages:
        have = f"{s.have_bytes / GIB:.1f}" if s.gpus_per_actor else "CPU"
        lines.append(f"| {s.stage} | {s.gpus_per_actor:g} | {s.actors} | {s.need_bytes / GIB:.1f} | {have} | "
                     f"{'yes' if s.fits else 'NO'} | {s.gpu_seconds / 3600:.2f} | {s.wall_s / 3600:.2f} | {s.cost:.2f} | "
                     f"{s.note} |")
    tot = sum(s.gpu_seconds for s in p.stages) / 3600
    lines += ["", f"total: {tot:.2f} GPU-h, ${sum(s.cost for s in p.stages):.2f} (time: a FLOP model calibrated on "
                  f"one measured H200, scaled by datasheet rates; decode bandwidth efficiency assumed)"]
    if p.roi:
        r = p.roi
        lines.append(f"ROI: IGDS@50% saves {r['finetune_saved_gpu_h']:.2f} GPU-h of fine-tuning against full data "
                     f"and spends {r['igds_overhead_gpu_h']:.2f} GPU-h on recall, causal trials and scoring: net "
                     f"{r['net_gpu_h']:+.2f} GPU-h (${r['net_cost']:+.2f})")
    refusal = p.refusal()
    if refusal:
        lines.append(f"DOES NOT FIT: {refusal}")
    summary = {"gpu": p.gpu, "fits": p.fits, "total_gpu_h": round(tot, 4),
               "cost": round(sum(s.cost for s in p.stages), 2), "roi": {k: round(v, 4) for k, v in p.roi.items()},
               "stages": [{"stage": s.stage, "need_gib": round(s.need_bytes / GIB, 2),
                           "have_gib": round(s.have_bytes / GIB, 2), "fits": s.fits, "gpu_h": round(s.gpu_seconds / 3600, 4),
                           "wall_h": round(s.wall_s / 3600, 4), "key": s.key} for s in p.stages]}
    lines.append(json.dumps(summary))
    return "\n".join(lines)
