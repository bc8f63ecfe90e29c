"""Contrastive latents (the `igds_response` arm): SAE latents that fire more on the base model's
correct answers than on its wrong ones.

The paper's IGDS reads latents at the prompt, so it finds on-task data but cannot tell a correct
worked answer from a wrong one. This stage reads answers instead:
1. One Ray actor holds the model and the SAE. The base model answers the task's dev set (greedy, the
   HF generation backend), then the same model copy runs up to the SAE's layer on BOS + prompt + its
   own answer, tokenized as the scorer reads a prompt + response pool row, and every latent is
   pooled over the answer tokens (`pooling`: max or mean). The full-width encode runs
   `encode_chunk` positions at a time, so a 16k-wide SAE needs encode_chunk x d_sae floats at once,
   and only the pooled [n_examples, d_sae] matrix comes back to the driver.
2. Each answer is labelled with the task metric (`task.score`): for a 0/1 metric, correct when the
   score is 1; for a continuous one, correct when it is above the dev set's median (the rule is
   written into contrast.json). Answers with no token to read (empty) are left out and counted.
   A base that gets almost no dev problem right has nothing to contrast (`positives: auto` with fewer
   than `min_each` correct answers, or `positives: references`): the dev set's reference answers,
   read the same way on the same prompts, are then the positives and the base's wrong answers the
   negatives, and the halves below are split by dev example, so an example's reference and its
   answer fall on the same side.
3. The examples are split (seeded, stratified by label) into halves A and B. On A every latent is
   ranked by its AUROC with `correct` as the positive class: a high AUROC fires more on correct
   answers, the direction IGDS selection keeps (top scores). The `candidates` best on A get their
   AUROC on B with a stratified bootstrap CI; the first k in A order whose CI lower bound is > 0.5
   are chosen (`selected_by: heldout`; B only gates, so their B AUROC is not inflated by a search on
   B). When none passes, the k best B point estimates are kept (`selected_by: fallback`, with why).

Outputs: `<run>/features/contrast.parquet` (a row per latent: AUROC on A, its rank; AUROC and CI on B
for the candidates), `<run>/features/contrast.json` (the chosen latents, their A/B AUROC with CI,
label counts, selected_by, reason) and `<run>/features/contrast_answers.parquet` (each dev answer with
its score, label and half). A finished stage is skipped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np
import pyarrow as pa

from igds_ray.config import ConfigError, IdentifyConfig, ModelConfig, SAEConfig, _help, from_dict, to_dict
from igds_ray.stages.contrast_stats import auroc, bootstrap_auroc_ci, label_answers, split_halves

log = logging.getLogger(__name__)

CONTRAST_COLUMNS = ("feature", "index", "auroc_a", "rank_a", "mean_correct_a", "mean_incorrect_a", "candidate",
                    "auroc_b", "ci_low_b", "ci_high_b", "chosen")


@dataclass(frozen=True)
class ContrastConfig:
    k: int = _help("latents kept for the igds_response arm", default=1)
    pooling: Literal["max", "mean"] = _help(
        "pooling of each latent over the answer tokens; the igds_response arm scores the pool's responses the "
        "same way, whatever score.pooling is", default="max")
    min_each: int = _help("refuse to run with fewer correct, or fewer incorrect, dev answers than this", default=10)
    positives: Literal["auto", "answers", "references"] = _help(
        "the positive class: `answers` (the base's correct dev answers), `references` (the dev set's reference "
        "answers, against the base's wrong answers: for a base that gets almost none right), or `auto` (answers "
        "when the base has contrast.min_each correct ones, else references)", default="auto")
    candidates: int = _help("latents best on half A whose held-out AUROC (half B) is measured", default=20)
    bootstrap: int = _help("stratified bootstrap resamples of half B for the AUROC's CI", default=1000)
    ci: float = _help("confidence level of that CI", default=0.95)
    dev_limit: int = _help("dev examples answered (seeded sample, the same draw as causal filtering)", default=200)
    template: int | None = _help("prompt template index; default: causal.template (the one the pool's prompts are "
                                 "rendered in)", default=None)
    max_new_tokens: int = _help("answer length", default=128)
    repetition_penalty: float = _help("generation repetition penalty", default=1.0)
    gen_batch_size: int = _help("prompts per generate call", default=32)
    max_tokens: int = _help("prompt + answer tokens read (the start is kept, as scoring does)", default=1024)
    token_budget: int = _help("padded tokens per forward micro-batch", default=16384)
    encode_chunk: int = _help("token positions per full-width SAE encode (memory: encode_chunk x d_sae floats)",
                              default=1024)
    num_cpus: float = _help("CPUs of the contrast actor", default=1.0)
    num_gpus: float = _help("GPUs of the contrast actor", default=0.0)

    def __post_init__(self) -> None:
        for key in ("k", "min_each", "candidates", "dev_limit", "max_new_tokens", "gen_batch_size", "max_tokens",
                    "token_budget", "encode_chunk"):
            if getattr(self, key) < 1:
                raise ConfigError(f"contrast.{key} must be >= 1, got {getattr(self, key)}")
        if self.bootstrap < 100:
            raise ConfigError(f"contrast.bootstrap: at least 100 resamples, got {self.bootstrap}")
        if not 0.5 <= self.ci < 1.0:
            raise ConfigError(f"contrast.ci: a level in [0.5, 1), got {self.ci}")
        if self.candidates < self.k:
            raise ConfigError(f"contrast.candidates ({self.candidates}) < contrast.k ({self.k}): only candidates "
                              "can be chosen")
        if self.template is not None and self.template < 0:
            raise ConfigError(f"contrast.template must be >= 0, got {self.template}")
        if self.token_budget < self.max_tokens:
            raise ConfigError(f"contrast.token_budget ({self.token_budget}) must be >= contrast.max_tokens "
                              f"({self.max_tokens})")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ConfigError("contrast.num_cpus and contrast.num_gpus must be >= 0")


# ---------------------------------------------------------------------------------------------
# the model half: one actor answers and pools


def pooled_latents(runner: Any, sae: Any, examples: Sequence[Any], pad_id: int, pooling: str, token_budget: int,
                   encode_chunk: int) -> np.ndarray:
    """acts: [n_examples, d_sae] float32, every latent pooled (max or mean) over each example's positions."""
    import torch

    from igds_ray.stages.score import micro_batches

    d_sae = int(sae.cfg.d_sae)
    out = np.zeros((len(examples), d_sae), dtype=np.float32)
    device = next(runner.model.parameters()).device
    with torch.inference_mode():
        for mb in micro_batches([len(e.input_ids) for e in examples], token_budget):
            T = max(len(examples[i].input_ids) for i in mb)
            ids = torch.full((len(mb), T), pad_id, dtype=torch.long)
            mask = torch.zeros((len(mb), T), dtype=torch.long)
            for r, i in enumerate(mb):
                n = len(examples[i].input_ids)
                ids[r, :n] = torch.tensor(examples[i].input_ids)
                mask[r, :n] = 1
            hidden = runner(ids.to(device), mask.to(device))  # [b, T, d_model]
            rows = torch.tensor([r for r, i in enumerate(mb) for _ in examples[i].positions], device=hidden.device)
            cols = torch.tensor([p for i in mb for p in examples[i].positions], device=hidden.device)
            # -inf start: the max is then exact for any activation function, not only non-negative ones.
            fill = float("-inf") if pooling == "max" else 0.0
            pooled = torch.full((len(mb), d_sae), fill, dtype=torch.float32, device=hidden.device)
            for s in range(0, len(rows), encode_chunk):
                r = rows[s : s + encode_chunk]
                acts = sae.encode(hidden[r, cols[s : s + encode_chunk]]).float()  # [chunk, d_sae]
                if pooling == "max":
                    pooled.index_reduce_(0, r, acts, "amax", include_self=True)
                else:  # sums across chunks, divided once at the end
                    pooled.index_add_(0, r, acts)
            if pooling == "mean":
                counts = torch.bincount(rows, minlength=len(mb)).to(pooled.dtype)
                pooled /= counts[:, None]
            out[mb] = pooled.cpu().numpy()
    return out


class ContrastWorker:
    """Ray actor: one model + SAE copy that answers the dev prompts and pools every latent over each answer."""

    def __init__(self, model: dict, sae: dict, layer: int, contrast: dict) -> None:
        import torch

        from igds_ray.generation.hf import HFBackend
        from igds_ray.models.loading import resolve_device
        from igds_ray.models.runner import LayerRunner
        from igds_ray.tokenize import ExampleBuilder

        self.cfg = from_dict(ContrastConfig, contrast)
        mcfg = from_dict(ModelConfig, model)
        device = resolve_device(mcfg.device)
        if device.type == "cpu" and self.cfg.num_cpus >= 1:
            torch.set_num_threads(max(1, int(self.cfg.num_cpus)))
        t0 = time.time()
        self.backend = HFBackend(mcfg, from_dict(SAEConfig, sae), device=device, batch_size=self.cfg.gen_batch_size)
        self.load_s = time.time() - t0
        # The generating copy, not a second one: unpruned so that it can still generate.
        self.runner = LayerRunner(self.backend.model, layer, prune=False)
        self.builder = ExampleBuilder(self.backend.tok, self.cfg.pooling, self.cfg.max_tokens)

    def read(self, prompts: list[str], texts: list[str]) -> dict[str, Any]:
        """Every latent pooled over each text's tokens after its prompt, for the pairs with tokens to read
        ([rows]); errors name the others."""
        from igds_ray.tokenize import split_built

        c = self.cfg
        t0 = time.time()
        errors: list[str | None] = [None] * len(prompts)
        rows, examples = split_built(list(range(len(prompts))), self.builder.build_pairs(prompts, texts), errors)
        acts = pooled_latents(self.runner, self.backend.sae, examples, self.backend.tok.pad_token_id, c.pooling,
                              c.token_budget, c.encode_chunk)
        return {"rows": rows, "errors": errors, "acts": acts, "tokens": [len(e.positions) for e in examples],
                "encode_s": time.time() - t0}

    def run(self, prompts: list[str], stop: tuple[str, ...]) -> dict[str, Any]:
        """answers, and for those with tokens to read ([rows]) their pooled latents; errors name the others."""
        from igds_ray.generation import SamplingConfig

        c = self.cfg
        t0 = time.time()
        answers = self.backend.generate(prompts, SamplingConfig(max_new_tokens=c.max_new_tokens,
                                                                repetition_penalty=c.repetition_penalty, stop=stop))
        gen_s = time.time() - t0
        read = self.read(prompts, answers)
        return {"answers": answers, "rows": read["rows"], "errors": read["errors"], "acts": read["acts"],
                "answer_tokens": read["tokens"], "load_s": self.load_s, "gen_s": gen_s, "encode_s": read["encode_s"]}


# ---------------------------------------------------------------------------------------------
# choosing latents (pure)


def choose(acts: np.ndarray, correct: np.ndarray, cfg: ContrastConfig, seed: int,
           halves: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, Any]:
    """Rank on half A, gate on half B; returns the per-latent table columns and the choice.
    `halves`: the (A, B) row indices when the caller splits (e.g. by dev example), else a seeded
    split stratified by label."""
    idx_a, idx_b = split_halves(correct, seed) if halves is None else halves
    ya, yb = correct[idx_a], correct[idx_b]
    a = acts[idx_a]
    auc_a = auroc(a, ya)
    mean_c, mean_i = a[ya].mean(0), a[~ya].mean(0)
    d_sae = acts.shape[1]
    # Ties on A (e.g. latents never active, all at 0.5) go to the larger mean gap, then the lower index.
    order = np.lexsort((np.arange(d_sae), -(mean_c - mean_i), -auc_a))
    rank = np.empty(d_sae, np.int64)
    rank[order] = np.arange(d_sae)
    cand = order[: cfg.candidates]
    b = acts[idx_b][:, cand]
    auc_b = auroc(b, yb)
    low, high = bootstrap_auroc_ci(b, yb, cfg.bootstrap, cfg.ci, np.random.default_rng([seed, 2]))
    passed = [j for j in range(len(cand)) if low[j] > 0.5]
    if passed:
        picked = passed[: cfg.k]
        selected_by = "heldout"
        reason = (f"{len(passed)} of the {len(cand)} latents best on half A have a held-out AUROC whose "
                  f"{cfg.ci:.0%} CI lower bound is above 0.5; the first {len(picked)} in half-A order are kept")
    else:
        picked = sorted(range(len(cand)), key=lambda j: (-auc_b[j], j))[: cfg.k]
        selected_by = "fallback"
        best = max(range(len(cand)), key=lambda j: (low[j], -j))
        reason = (f"no latent among the {len(cand)} best on half A has a held-out AUROC whose {cfg.ci:.0%} CI "
                  f"lower bound is above 0.5 (best lower bound {low[best]:.3f}, latent {int(cand[best])}); the "
                  f"{len(picked)} best held-out point estimates are kept")
    col_b = np.full(d_sae, np.nan)
    col_low, col_high = col_b.copy(), col_b.copy()
    col_b[cand], col_low[cand], col_high[cand] = auc_b, low, high
    chosen = [int(cand[j]) for j in picked]
    return {
        "auroc_a": auc_a, "rank_a": rank, "mean_correct_a": mean_c, "mean_incorrect_a": mean_i,
        "candidate": np.isin(np.arange(d_sae), cand), "auroc_b": col_b, "ci_low_b": col_low, "ci_high_b": col_high,
        "chosen": chosen, "selected_by": selected_by, "reason": reason,
        "idx_a": idx_a, "idx_b": idx_b,
        "n_a": {"correct": int(ya.sum()), "incorrect": int((~ya).sum())},
        "n_b": {"correct": int(yb.sum()), "incorrect": int((~yb).sum())},
    }


# ---------------------------------------------------------------------------------------------
# the stage


def run(cfg: IdentifyConfig, contrast: ContrastConfig) -> dict[str, Any]:
    """Write `<run>/features/contrast.parquet` and `contrast.json` (skipped when finished); return the json."""
    import pyarrow.parquet as pq
    import ray

    from igds_ray.models.loading import check_compatible, model_info, sae_info
    from igds_ray.schema import FeatureId
    from igds_ray.stages.score import init_ray
    from igds_ray.storage import StageDir, exists, filesystem, join, read_json, write_json_atomic
    from igds_ray.tasks import TaskDataError, get_task, load_task_set

    c = contrast
    out_json = join(cfg.run_dir, "features", "contrast.json")
    out = StageDir(join(cfg.run_dir, "features", "contrast.parquet"))
    if out.done() and exists(out_json) and not cfg.overwrite:
        return read_json(out_json)
    t_start = time.time()
    si = sae_info(cfg.sae)
    check_compatible(model_info(cfg.model), si)
    task = get_task(cfg.task.name, **cfg.task.options)
    template = cfg.causal.template if c.template is None else c.template
    if not 0 <= template < task.num_templates:
        raise TaskDataError(f"contrast.template: index {template} but task {task.name!r} has {task.num_templates} "
                            "templates")
    source = cfg.task.dev_source or cfg.task.source
    dev = load_task_set(task, source, split=cfg.task.dev_split, columns=cfg.task.columns or None,
                        limit=c.dev_limit, seed=cfg.seed + 1)
    prompts = [task.build_prompt(e, template) for e in dev.examples]
    init_ray()
    Worker = ray.remote(ContrastWorker)
    actor = Worker.options(num_cpus=c.num_cpus, num_gpus=c.num_gpus or None).remote(
        to_dict(cfg.model), to_dict(cfg.sae), si.layer, to_dict(c))
    try:
        res = ray.get(actor.run.remote(prompts, tuple(getattr(task, "stop_sequences", ()) or ())))
        rows = res["rows"]
        scores = np.array([task.score(res["answers"][i], dev.examples[i]) for i in range(len(prompts))], np.float64)
        correct, rule = label_answers(scores[rows])
        n_c, n_i = int(correct.sum()), int((~correct).sum())
        use_refs = c.positives == "references" or (c.positives == "auto" and n_c < c.min_each)
        # The references, read on the same model copy, only when they are the positives.
        references = [task.reference_answer(e) for e in dev.examples] if use_refs else None
        ref = ray.get(actor.read.remote(prompts, references)) if use_refs else None
    finally:
        ray.kill(actor)
    unreadable = [e for e in res["errors"] if e is not None]
    where = (f"the base model's {len(rows)} readable answers on {source} (split {cfg.task.dev_split}) are {n_c} "
             f"correct and {n_i} incorrect ({rule}; {len(unreadable)} answers had no token to read)")
    if not use_refs:
        if min(n_c, n_i) < c.min_each:
            raise TaskDataError(
                f"contrast needs at least contrast.min_each={c.min_each} correct and {c.min_each} incorrect dev "
                f"answers; {where}. Use a larger dev set (contrast.dev_limit), lower contrast.min_each, or "
                "contrast.positives: references")
        acts, labels, halves = res["acts"], correct, None
        item_ex = np.asarray(rows, np.int64)
        positives = "answers"
        positives_rule = "positives: the base's correct dev answers; negatives: its incorrect ones"
    else:
        # Positives: the dev set's reference answers; negatives: the base's wrong answers to the same prompts.
        wrong = [j for j in range(len(rows)) if not correct[j]]
        ref_rows = list(ref["rows"])
        if len(wrong) < c.min_each or len(ref_rows) < c.min_each:
            raise TaskDataError(
                f"contrast (positives: references) needs at least contrast.min_each={c.min_each} readable reference "
                f"answers and {c.min_each} incorrect dev answers; {where}, and {len(ref_rows)} references had tokens "
                "to read. Use a larger dev set (contrast.dev_limit) or lower contrast.min_each")
        acts = np.concatenate([ref["acts"], res["acts"][wrong]])
        labels = np.r_[np.ones(len(ref_rows), bool), np.zeros(len(wrong), bool)]
        item_ex = np.r_[np.asarray(ref_rows, np.int64), np.asarray([rows[j] for j in wrong], np.int64)]
        # Halves by dev example (stratified by whether it has a wrong answer), so an example's reference
        # and its wrong answer are read on the same half and half B's prompts are all unseen on A.
        ex_ids = np.unique(item_ex)
        has_wrong = np.isin(ex_ids, item_ex[len(ref_rows):])
        a_ex, _ = split_halves(has_wrong, cfg.seed)
        in_a = np.isin(item_ex, ex_ids[a_ex])
        halves = (np.flatnonzero(in_a), np.flatnonzero(~in_a))
        for name, idx in (("A", halves[0]), ("B", halves[1])):
            if labels[idx].all() or not labels[idx].any():
                raise TaskDataError(f"contrast (positives: references): half {name} holds one class only; {where}. "
                                    "Use a larger dev set (contrast.dev_limit)")
        positives = "references"
        positives_rule = ("positives: the dev set's reference answers; negatives: the base's incorrect answers"
                          + (f" (auto: the base has {n_c} correct answers, below contrast.min_each={c.min_each})"
                             if c.positives == "auto" else ""))
    pick = choose(acts, labels, c, cfg.seed, halves)
    d_sae = acts.shape[1]
    chosen_mask = np.isin(np.arange(d_sae), pick["chosen"])
    table = pa.table({
        "feature": [str(FeatureId(si.layer, i)) for i in range(d_sae)],
        "index": pa.array(np.arange(d_sae), pa.int64()),
        **{k: pa.array(pick[k], pa.float64()) for k in ("auroc_a", "mean_correct_a", "mean_incorrect_a")},
        "rank_a": pa.array(pick["rank_a"], pa.int64()),
        "candidate": pa.array(pick["candidate"]),
        **{k: pa.array(pick[k], pa.float64(), from_pandas=True) for k in ("auroc_b", "ci_low_b", "ci_high_b")},
        "chosen": pa.array(chosen_mask),
    }).select(list(CONTRAST_COLUMNS))
    staging = out.begin(overwrite=True)
    pq.write_table(table, f"{staging}/part-0.parquet", filesystem=None if "://" not in out.uri else out.fs)
    # Every dev answer with its metric label, the half its contrast items were read on, and which of its
    # texts were contrasted, so a chosen latent can be checked against the texts.
    n = len(prompts)
    half: list[str | None] = [None] * n
    label: list[bool | None] = [None] * n
    n_read: list[int | None] = [None] * n
    for name, idx in (("A", pick["idx_a"]), ("B", pick["idx_b"])):
        for j in idx:
            half[int(item_ex[j])] = name
    for j, i in enumerate(rows):
        n_read[i], label[i] = res["answer_tokens"][j], bool(correct[j])
    answer_used, reference_used = [False] * n, [False] * n
    if use_refs:
        for i in ref_rows:
            reference_used[i] = True
        for j in wrong:
            answer_used[rows[j]] = True
    else:
        for i in rows:
            answer_used[i] = True
    fs, path = filesystem(join(cfg.run_dir, "features", "contrast_answers.parquet"))
    pq.write_table(pa.table({
        "id": [e.id for e in dev.examples], "prompt": prompts, "answer": res["answers"],
        "score": pa.array(scores, pa.float64()), "correct": pa.array(label, pa.bool_()),
        "half": pa.array(half, pa.string()), "answer_tokens": pa.array(n_read, pa.int64()),
        "error": pa.array(res["errors"], pa.string()),
        "answer_used": pa.array(answer_used), "reference": references or [None] * n,
        "reference_used": pa.array(reference_used),
    }), path, filesystem=fs)
    summary = {
        "dev_examples": len(prompts), "readable_answers": len(rows), "unreadable_answers": len(unreadable),
        "unreadable_reasons": sorted(set(unreadable))[:5], "n_correct": n_c, "n_incorrect": n_i,
        "n_a": pick["n_a"], "n_b": pick["n_b"], "label_rule": rule, "base_metric": float(scores.mean()),
        "positives": positives, "positives_rule": positives_rule, "n_positive": int(labels.sum()),
        "n_negative": int((~labels).sum()),
        "mean_answer_tokens": float(np.mean(res["answer_tokens"])) if rows else None,
        "pooling": c.pooling, "template": template, "candidates": c.candidates, "bootstrap": c.bootstrap, "ci": c.ci,
        "seed": cfg.seed, "model_load_s": round(res["load_s"], 3), "gen_s": round(res["gen_s"], 3),
        "encode_s": round(res["encode_s"] + (ref["encode_s"] if ref else 0.0), 3),
        "wall_s": round(time.time() - t_start, 3),
    }
    out.commit(staging, {"stage": "contrast", "config": {**to_dict(cfg), "contrast": to_dict(c)}, **summary})
    details = [{"feature": str(FeatureId(si.layer, i)), "index": i, "rank_a": int(pick["rank_a"][i]),
                "auroc_a": float(pick["auroc_a"][i]), "auroc_b": float(pick["auroc_b"][i]),
                "ci_low_b": float(pick["ci_low_b"][i]), "ci_high_b": float(pick["ci_high_b"][i]),
                "mean_correct_a": float(pick["mean_correct_a"][i]),
                "mean_incorrect_a": float(pick["mean_incorrect_a"][i])} for i in pick["chosen"]]
    result = {"layer": si.layer, "features": [d["feature"] for d in details], "selected_by": pick["selected_by"],
              "reason": pick["reason"], "details": details, **summary}
    write_json_atomic(out_json, result)
    log.info("contrast: %s (%s) from %d positive / %d negative texts (%s)", result["features"],
             result["selected_by"], int(labels.sum()), int((~labels).sum()), positives_rule)
    return result


# ---------------------------------------------------------------------------------------------
# the report's check: does a score tell the pool's correct rows from its wrong ones?


def label_auroc(score: Sequence[float | None], correct: Sequence[bool | None]) -> dict[str, Any]:
    """AUROC of `score` for correct (positive) against wrong rows, over the rows whose label is not null.

    A labelled row without a finite score (one that could not be scored) is counted in `n_unscored`,
    not ranked. `auroc` is None unless both classes have a scored row.
    """
    if len(score) != len(correct):
        raise ValueError(f"label_auroc: {len(score)} scores but {len(correct)} labels")
    s = np.array([np.nan if v is None else v for v in score], np.float64)
    known = np.array([v is not None for v in correct], bool)
    y = np.array([bool(v) for v in correct if v is not None], bool)
    y_all = np.zeros(len(s), bool)
    y_all[known] = y
    ok = known & np.isfinite(s)
    n_c, n_w = int((ok & y_all).sum()), int((ok & ~y_all).sum())
    return {"auroc": auroc(s[ok], y_all[ok]) if n_c and n_w else None, "n_correct": n_c, "n_wrong": n_w,
            "n_unscored": int((known & ~np.isfinite(s)).sum())}


def scores_label_auroc(scores_dir: str, pool_path: str, correct_column: str) -> dict[str, Any]:
    """`label_auroc` of a finished scores directory against the pool's boolean `correct_column`, rows
    matched by (src_file, src_row), from per-class score histograms in bounded memory
    (`igds_ray.labels.histogram_auroc`, with `auroc_max_error`)."""
    from igds_ray.labels import PoolColumn, histogram_auroc

    return histogram_auroc(scores_dir, PoolColumn(pool_path, correct_column, "report.correct_column"))


def arm_label_aurocs(run_dir: str, arms: Sequence[str], pool_path: str, correct_column: str) -> list[dict[str, Any]]:
    """One `scores_label_auroc` per scores directory the given arms selected from (read from their
    selection manifests), with the arms that share it."""
    import posixpath

    from igds_ray.storage import StageDir, join

    groups: dict[str, list[str]] = {}
    for arm in arms:
        sel = StageDir(join(run_dir, "selection", f"{arm}.parquet"))
        if sel.done():
            groups.setdefault(sel.manifest()["scores"], []).append(arm)
    return [{"scores": posixpath.basename(d.rstrip("/")), "arms": a, **scores_label_auroc(d, pool_path, correct_column)}
            for d, a in groups.items()]
