"""Paired statistics for the causal filter (pure numpy, no Ray, no model).

Every trial is compared with the base run on the *same* dev examples, so the unit of evidence is the
per-example difference d_i = treated_i - base_i. For each trial and measure:

- `delta`: the mean of d, with a seeded percentile-bootstrap confidence interval;
- a one-sided p-value for H0: mean(d) <= 0. Scores that are all 0/1 use the exact McNemar test (a
  binomial tail on the discordant pairs: under H0 an example that changed is equally likely to have
  improved or regressed); any other measure (log-likelihood, chrF, ROUGE) uses a paired sign-flip
  permutation test, enumerated exactly when at most `EXACT_SIGN_FLIP_MAX` differences are non-zero;
- Holm's step-down adjustment across all trials, because the best of ~30 noisy trials is positive
  by chance.

Random streams are derived from (seed, a key naming the trial and measure), so a trial's figures do
not depend on the order trials finished in.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

MCNEMAR = "mcnemar_exact"
SIGN_FLIP_EXACT = "sign_flip_exact"
SIGN_FLIP_PERM = "sign_flip_permutation"
# 2**16 sign patterns enumerate in a few ms; above that a seeded Monte Carlo sample is used.
EXACT_SIGN_FLIP_MAX = 16
_BOOT_CHUNK = 256  # resamples drawn at a time: bounds memory at 256 x n indices


def rng_for(seed: int, key: str) -> np.random.Generator:
    """A generator determined by the run's seed and a stable key (not by call order)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(key.encode())])


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation with average ranks for ties (NaN if either side is constant)."""

    def ranks(v: np.ndarray) -> np.ndarray:
        order = np.argsort(v, kind="mergesort")
        r = np.empty(len(v), dtype=np.float64)
        r[order] = np.arange(len(v), dtype=np.float64)
        for val in np.unique(v):  # average ranks of ties
            m = v == val
            r[m] = r[m].mean()
        return r

    a, b = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(a) < 2 or np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan")
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def bootstrap_ci(diffs: Sequence[float], n_boot: int, rng: np.random.Generator,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `diffs` (resampling examples with replacement)."""
    d = np.asarray(diffs, np.float64)
    if len(d) == 0:
        return float("nan"), float("nan")
    means = np.empty(n_boot, np.float64)
    for s in range(0, n_boot, _BOOT_CHUNK):
        m = min(_BOOT_CHUNK, n_boot - s)
        means[s:s + m] = d[rng.integers(0, len(d), size=(m, len(d)))].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


def mcnemar_one_sided(base: Sequence[float], treated: Sequence[float]) -> float:
    """Exact one-sided McNemar p-value for "treated beats base" on paired 0/1 outcomes:
    P(X >= b) for X ~ Binomial(b + c, 1/2), b = examples that went 0 -> 1, c = 1 -> 0."""
    x, y = np.asarray(base, np.float64), np.asarray(treated, np.float64)
    b = int(np.sum((x == 0) & (y == 1)))
    n = b + int(np.sum((x == 1) & (y == 0)))
    if n == 0:
        return 1.0
    # Integer arithmetic: exact for any n, no underflow of 0.5**n.
    return sum(math.comb(n, i) for i in range(b, n + 1)) / 2**n


def sign_flip_one_sided(diffs: Sequence[float], n_perm: int, rng: np.random.Generator) -> tuple[float, str]:
    """One-sided p-value of the paired sign-flip test for mean(diffs) > 0, and the test's name.

    Under H0 each difference is symmetric about 0, so every sign pattern is equally likely; zeros
    are unaffected by a flip and are left out. Exact enumeration when few differences are non-zero,
    otherwise (1 + #{flipped mean >= observed}) / (n_perm + 1).
    """
    d = np.asarray(diffs, np.float64)
    a = np.abs(d[d != 0])
    if len(a) == 0:
        return 1.0, SIGN_FLIP_EXACT
    obs = float(d[d != 0].sum())
    tol = 1e-12 * max(1.0, float(a.sum()))  # the observed pattern must count itself despite rounding
    if len(a) <= EXACT_SIGN_FLIP_MAX:
        patterns = (np.arange(2 ** len(a))[:, None] >> np.arange(len(a))) & 1
        sums = ((2 * patterns - 1) * a).sum(axis=1)
        return float(np.mean(sums >= obs - tol)), SIGN_FLIP_EXACT
    hits = 0
    for s in range(0, n_perm, _BOOT_CHUNK):
        m = min(_BOOT_CHUNK, n_perm - s)
        signs = rng.integers(0, 2, size=(m, len(a))) * 2 - 1
        hits += int(np.sum((signs * a).sum(axis=1) >= obs - tol))
    return (1 + hits) / (n_perm + 1), SIGN_FLIP_PERM


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm step-down adjusted p-values; NaN entries (trials that failed) are not in the family."""
    p = np.asarray(pvalues, np.float64)
    out = np.full(len(p), np.nan)
    idx = np.nonzero(~np.isnan(p))[0]
    m = len(idx)
    if m == 0:
        return out.tolist()
    order = idx[np.argsort(p[idx], kind="mergesort")]
    running = 0.0
    for j, i in enumerate(order):
        running = max(running, min(1.0, (m - j) * p[i]))
        out[i] = running
    return out.tolist()


def is_binary(*arrays: Sequence[float]) -> bool:
    return all(np.isin(np.asarray(a, np.float64), (0.0, 1.0)).all() for a in arrays)


@dataclass(frozen=True)
class Paired:
    """One measure of one trial against the base on the same examples."""

    delta: float
    ci_low: float
    ci_high: float
    p: float
    test: str
    n: int


def paired(base: Sequence[float], treated: Sequence[float], n_boot: int, seed: int, key: str,
           level: float = 0.95) -> Paired:
    """Paired mean difference, bootstrap CI and one-sided p (McNemar for 0/1 scores, else sign-flip).
    Pairs with a NaN on either side (an empty reference has no log-likelihood) are left out."""
    x, y = np.asarray(base, np.float64), np.asarray(treated, np.float64)
    if x.shape != y.shape:
        raise ValueError(f"{key}: {len(y)} treated values for {len(x)} base values: the runs must share examples")
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    if len(x) == 0:
        return Paired(float("nan"), float("nan"), float("nan"), float("nan"), "none", 0)
    d = y - x
    lo, hi = bootstrap_ci(d, n_boot, rng_for(seed, key + "|boot"), level)
    if is_binary(x, y):
        p, test = mcnemar_one_sided(x, y), MCNEMAR
    else:
        p, test = sign_flip_one_sided(d, n_boot, rng_for(seed, key + "|flip"))
    return Paired(float(d.mean()), lo, hi, float(p), test, int(len(d)))


# -- the noise floor ------------------------------------------------------------------------------


def noise_floor(runs: list[dict[str, Any]]) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Combine repeated base runs (same examples) into the base trials are compared with.

    Each run has "metric", "loglik", "scores" and "logliks". When the runs agree this is any one of
    them; when they do not, it is the per-example worst case for the claim "the intervention helps"
    (the highest base score and log-likelihood of any run), so run-to-run noise cannot pass as an effect.
    """
    scores = np.asarray([r["scores"] for r in runs], np.float64)
    lls = np.asarray([r["logliks"] for r in runs], np.float64)
    metrics = [float(r["metric"]) for r in runs]
    disagree = (scores != scores[0]).any(axis=0)
    nan = np.isnan(lls)
    spread = np.abs(np.where(nan, 0.0, lls - lls[0])) if lls.size else np.zeros(0)
    ll_diff = float(spread.max()) if spread.size else 0.0
    worst = bool(disagree.any() or max(metrics) != min(metrics))
    base_ll = np.where(nan.all(axis=0), np.nan, np.where(nan, -np.inf, lls).max(axis=0)) if lls.size else lls
    base_ll = np.asarray(base_ll, np.float64).reshape(-1)
    finite = base_ll[np.isfinite(base_ll)]
    base = {"scores": scores.max(axis=0).tolist(), "logliks": base_ll.tolist(), "metric": max(metrics),
            "loglik": float(finite.mean()) if finite.size else float("nan")}
    summary = {
        "runs": len(runs),
        "metric_max_abs_diff": max(metrics) - min(metrics),
        "loglik_max_abs_diff": ll_diff,
        "examples_disagreeing": int(disagree.sum()),
        "disagreements_vs_first_run": [int((s != scores[0]).sum()) for s in scores],
        "base_is_worst_case": worst,
    }
    return base, summary


# -- trials: tests, Holm, ranking ----------------------------------------------------------------

MEASURES = ("metric", "loglik")
# Trial keys of each measure's figures (the generation metric keeps the historical bare names).
COLUMNS = {
    "metric": dict(delta="delta", ci_low="delta_ci_low", ci_high="delta_ci_high", p="p_value", p_holm="p_holm",
                   test="test"),
    "loglik": dict(delta="loglik_delta", ci_low="loglik_ci_low", ci_high="loglik_ci_high", p="loglik_p",
                   p_holm="loglik_p_holm", test="loglik_test"),
}
_PER_EXAMPLE = {"metric": "scores", "loglik": "logliks"}


def assess(trials: list[dict[str, Any]], base: dict[str, Any], *, alpha: float, rank_by: str, n_boot: int,
           seed: int, part: str = "search") -> None:
    """Add each measure's paired figures, Holm-adjusted p-values over all ok trials, and `passed_holm`
    (the ranking measure's adjusted p < alpha with a positive delta) to every trial, in place.
    Trials carry their per-example "scores"/"logliks"; `base` the base's on the same examples."""
    level = 1.0 - alpha
    for measure in MEASURES:
        col = COLUMNS[measure]
        for t in trials:
            vals = t.get(_PER_EXAMPLE[measure])
            ref = base.get(_PER_EXAMPLE[measure])
            if t["status"] != "ok" or vals is None or ref is None or np.isnan(np.asarray(vals, float)).all():
                r = Paired(float("nan"), float("nan"), float("nan"), float("nan"), "none", 0)
            else:
                r = paired(ref, vals, n_boot, seed, f"{part}|{t['feature']}|{t['factor']!r}|{measure}", level)
            t.update({col["delta"]: r.delta, col["ci_low"]: r.ci_low, col["ci_high"]: r.ci_high, col["p"]: r.p,
                      col["test"]: r.test})
            if measure == "metric":
                t["n_" + part] = r.n
        adjusted = holm([t[col["p"]] for t in trials])
        for t, q in zip(trials, adjusted):
            t[col["p_holm"]] = q
    col = COLUMNS[rank_by]
    for t in trials:
        t["passed_holm"] = bool(t[col["p_holm"]] < alpha and t[col["delta"]] > 0)


def rank_latents(trials: list[dict[str, Any]], rank_by: str) -> list[dict[str, Any]]:
    """Each latent's best trial among those that passed Holm (largest ranking delta, then smaller adjusted
    p, then the other measure's delta), latents ordered the same way, then by recall rank."""
    other = COLUMNS["loglik" if rank_by == "metric" else "metric"]["delta"]
    col = COLUMNS[rank_by]

    def key(t: dict[str, Any]) -> tuple:
        return (-t[col["delta"]], t[col["p_holm"]], -np.nan_to_num(t[other], nan=-np.inf), t["recall_rank"],
                t["index"], t["factor"])

    best: dict[int, dict[str, Any]] = {}
    for t in trials:
        if t.get("passed_holm") and (t["index"] not in best or key(t) < key(best[t["index"]])):
            best[t["index"]] = t
    return sorted(best.values(), key=key)


def confirm(rechecked: list[dict[str, Any]], base: dict[str, Any], *, alpha: float, rank_by: str, n_boot: int,
            seed: int) -> None:
    """Held-out recheck, in place: each rechecked trial has "confirm_scores"/"confirm_logliks" (its best
    factor on the confirm part); `base` is the base on the confirm part. A latent is kept when the ranking
    measure's confirm delta has Holm-adjusted (over the rechecked) p < alpha and the generation metric's
    confirm delta is not below 0."""
    level = 1.0 - alpha
    for t in rechecked:
        m = paired(base["scores"], t["confirm_scores"], n_boot, seed, f"confirm|{t['feature']}|{t['factor']!r}|metric",
                   level)
        r = m if rank_by == "metric" else paired(base["logliks"], t["confirm_logliks"], n_boot, seed,
                                                 f"confirm|{t['feature']}|{t['factor']!r}|loglik", level)
        t.update(confirm_delta=r.delta, confirm_ci_low=r.ci_low, confirm_ci_high=r.ci_high, confirm_p=r.p,
                 confirm_test=r.test, confirm_metric_delta=m.delta, n_confirm=r.n)
    for t, q in zip(rechecked, holm([t["confirm_p"] for t in rechecked])):
        t["confirm_p_holm"] = q
        t["kept"] = bool(q < alpha and t["confirm_delta"] > 0 and t["confirm_metric_delta"] >= 0)


def choose(trials: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """The top k kept latents (one trial each, in selection order) from assessed trial rows, e.g. the
    records of causal.parquet."""
    kept = [t for t in trials if _true(t.get("kept"))]
    return sorted(kept, key=lambda t: t["selection_rank"])[:k]


def _true(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v)) and bool(v)


def fallback_reason(trials: list[dict[str, Any]], ranked: list[dict[str, Any]], rechecked: list[dict[str, Any]],
                    *, alpha: float, rank_by: str) -> str:
    """Why no latent was kept, naming the closest trial."""
    col = COLUMNS[rank_by]
    ok = [t for t in trials if t["status"] == "ok" and not math.isnan(t[col["ci_low"]])]
    what = "metric" if rank_by == "metric" else "log-likelihood"
    if not ok:
        return f"no trial produced a {what} delta ({len(trials)} trials, all failed or without examples)"
    if not ranked:
        best = max(ok, key=lambda t: (t[col["ci_low"]], t[col["delta"]]))
        return (f"no trial cleared Holm-corrected alpha={alpha:g} on the {what} (best lower bound "
                f"{best[col['ci_low']]:+.4g} for {best['feature']} x{best['factor']:g}, delta {best[col['delta']]:+.4g}, "
                f"p_holm {best[col['p_holm']]:.3g})")
    parts = [f"{t['feature']} x{t['factor']:g}: confirm delta {t['confirm_delta']:+.4g}, p_holm "
             f"{t['confirm_p_holm']:.3g}, metric delta {t['confirm_metric_delta']:+.4g}" for t in rechecked]
    return (f"{len(ranked)} latent(s) cleared Holm-corrected alpha={alpha:g} on the search part but none was "
            f"confirmed on the held-out part ({'; '.join(parts)})")


def split_dev(n: int, confirm_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of n dev examples into (search, confirm) index lists, each in the original order."""
    n_confirm = int(round(n * confirm_fraction))
    if confirm_fraction > 0 and not 1 <= n_confirm < n:
        raise ValueError(f"causal.confirm_fraction={confirm_fraction} of {n} dev examples leaves "
                         f"{n_confirm} to confirm and {n - n_confirm} to search: both need at least one")
    perm = rng_for(seed, "split").permutation(n)
    return sorted(perm[n_confirm:].tolist()), sorted(perm[:n_confirm].tolist())
