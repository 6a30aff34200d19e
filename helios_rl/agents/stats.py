"""Aggregate statistics of evaluation scores, rliable's way (Agarwal et al., 2021).

Scores are arrays ``(runs, tasks)``: here one task (the scenario) and one run per evaluated episode
(held-out seed x policy). IQM is the mean of the middle 50 % of scores; confidence intervals come
from a stratified bootstrap (resampling runs within each task); probability of improvement is
``P(X > Y) + P(X = Y) / 2`` over pairs of runs. The ``rliable`` package is used when it imports (its
``arch`` dependency breaks with some pandas releases); otherwise the same computation runs here.
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def iqm(scores: np.ndarray) -> float:
    """Interquartile mean of all scores (scipy's trim_mean at 25 %, as rliable's aggregate_iqm)."""
    from scipy.stats import trim_mean

    return float(trim_mean(np.asarray(scores, dtype=float).reshape(-1), proportiontocut=0.25))


def prob_improvement(x: np.ndarray, y: np.ndarray) -> float:
    """P(a run of X scores above a run of Y), ties counted half, averaged over tasks."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    out = []
    for t in range(x.shape[1]):
        a, b = x[:, t][:, None], y[:, t][None, :]
        out.append(float(((a > b) + 0.5 * (a == b)).mean()))
    return float(np.mean(out))


def _stratified_resample(rng: np.random.Generator, scores: np.ndarray) -> np.ndarray:
    runs, tasks = scores.shape
    idx = rng.integers(0, runs, size=(runs, tasks))
    return np.take_along_axis(scores, idx, axis=0)


def bootstrap_ci(func: Callable[..., float], arrays: list[np.ndarray], reps: int = 2000, size: float = 0.95,
                 seed: int = 0) -> tuple[float, float, str]:
    """Percentile CI of ``func(*arrays)`` under a stratified bootstrap of each array; (low, high, method)."""
    arrays = [np.asarray(a, float) for a in arrays]
    try:
        from rliable import library as rly  # noqa: F401  (imports arch)

        bs = rly.StratifiedBootstrap(*arrays, random_state=np.random.RandomState(seed))
        ci = bs.conf_int(func, reps=reps, size=size, method="percentile")
        low, high = float(np.ravel(ci)[0]), float(np.ravel(ci)[1])
        return low, high, "rliable.StratifiedBootstrap (percentile)"
    except Exception:  # noqa: BLE001 - rliable/arch missing or broken: same computation here
        rng = np.random.default_rng(seed)
        vals = np.array([func(*[_stratified_resample(rng, a) for a in arrays]) for _ in range(reps)])
        vals = vals[np.isfinite(vals)]
        if not len(vals):
            return float("nan"), float("nan"), "stratified bootstrap (helios_rl.agents.stats, percentile)"
        alpha = (1 - size) / 2
        return (float(np.quantile(vals, alpha)), float(np.quantile(vals, 1 - alpha)),
                "stratified bootstrap (helios_rl.agents.stats, percentile)")


def ratio_of_iqms(x: np.ndarray, y: np.ndarray) -> float:
    den = iqm(y)
    return iqm(x) / den if den > 0 else float("nan")


def method_stats(scores: dict[str, np.ndarray], reference: str, reps: int = 2000, seed: int = 0) -> dict[str, dict]:
    """Per method: IQM with its CI, ratio of IQMs to ``reference`` with its CI, probability of improvement."""
    out = {}
    ref = scores.get(reference)
    for name, s in scores.items():
        s = np.asarray(s, float)
        lo, hi, method = bootstrap_ci(iqm, [s], reps, seed=seed)
        row = {"iqm": iqm(s), "iqm_ci": [lo, hi], "mean": float(s.mean()), "n": int(s.size), "ci_method": method}
        if ref is not None and name != reference:
            rlo, rhi, _ = bootstrap_ci(ratio_of_iqms, [s, ref], reps, seed=seed)
            row.update({f"vs_{reference}_iqm_ratio": ratio_of_iqms(s, ref), f"vs_{reference}_ci": [rlo, rhi],
                        f"prob_improvement_vs_{reference}": prob_improvement(s, ref)})
        out[name] = row
    return out
