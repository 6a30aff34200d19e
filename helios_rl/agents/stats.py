"""Aggregate statistics of evaluation scores, rliable's way (Agarwal et al., 2021), on one seeded path.

Scores are arrays ``(runs, tasks)``. In a helios_rl comparison a *run* is one training seed of an agent
(a baseline without training has one run, or one per measured repeat) and a *task* is one held-out
test workload seed: every method serves the same test seeds, so the design is paired over tasks.

* IQM: the mean of the middle 50 % of all scores (scipy's ``trim_mean`` at 25 %, as rliable).
* Stratified bootstrap: each replicate resamples, independently for every task, the runs of that task
  with replacement (rliable's ``StratifiedBootstrap``: ``choice(runs, shape)``). With
  ``task_bootstrap`` the tasks are resampled too (rliable's option b), and for several methods the
  *same* task indices are used for all of them: the paired design. Methods may have different
  numbers of runs; each is resampled within its own runs.
* Every replicate draws from one ``numpy.random.RandomState(seed)``: the same seed gives the same
  interval. rliable's own implementation draws from numpy's *global* state; with that state seeded to
  the same value it computes exactly this (tested), so there is one computation, here, and the method
  string says which resampling ran.
* Probability of improvement: ``P(X > Y) + P(X = Y) / 2`` over pairs of runs, averaged over tasks.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

DEFAULT_REPS = 2000


def iqm(scores: np.ndarray) -> float:
    """Interquartile mean of all scores (scipy's trim_mean at 25 %, as rliable's aggregate_iqm)."""
    from scipy.stats import trim_mean

    return float(trim_mean(np.asarray(scores, dtype=float).reshape(-1), proportiontocut=0.25))


def prob_improvement(x: np.ndarray, y: np.ndarray) -> float:
    """P(a run of X scores above a run of Y), ties counted half, averaged over tasks."""
    x, y = _2d(x), _2d(y)
    out = []
    for t in range(x.shape[1]):
        a, b = x[:, t][:, None], y[:, t][None, :]
        out.append(float(((a > b) + 0.5 * (a == b)).mean()))
    return float(np.mean(out))


def _2d(a) -> np.ndarray:
    a = np.asarray(a, dtype=float)
    return a.reshape(-1, 1) if a.ndim == 1 else a


def stratified_bootstrap(func: Callable[..., float], arrays: list[np.ndarray], reps: int = DEFAULT_REPS,
                         size: float = 0.95, seed: int = 0, task_bootstrap: bool = False
                         ) -> tuple[float, float, str]:
    """Percentile interval of ``func(*arrays)`` over stratified-bootstrap replicates; (low, high, method).

    ``arrays``: ``(runs_i, tasks)`` each, the same tasks in the same order (a paired design)."""
    arrays = [_2d(a) for a in arrays]
    tasks = arrays[0].shape[1]
    if any(a.shape[1] != tasks for a in arrays):
        raise ValueError(f"every method must be scored on the same {tasks} tasks (test seeds), got shapes "
                         f"{[a.shape for a in arrays]}")
    rs = np.random.RandomState(seed)
    vals = np.empty(reps)
    cols = np.arange(tasks)[None, :]
    for r in range(reps):
        # run indices per (run, task) cell, independently per method, then (rliable's order) task indices
        idx = [rs.choice(a.shape[0], a.shape, replace=True) for a in arrays]
        t = rs.choice(tasks, (1, tasks), replace=True) if task_bootstrap else cols  # shared: paired seeds
        vals[r] = func(*[a[i, t] for a, i in zip(arrays, idx)])
    vals = vals[np.isfinite(vals)]
    method = (f"stratified bootstrap over runs{' and tasks (paired)' if task_bootstrap else ''}, percentile, "
              f"{reps} replicates, RandomState({seed})")
    if not len(vals):
        return float("nan"), float("nan"), method
    alpha = (1 - size) / 2
    return float(np.percentile(vals, 100 * alpha)), float(np.percentile(vals, 100 * (1 - alpha))), method


def bootstrap_ci(func: Callable[..., float], arrays: list[np.ndarray], reps: int = DEFAULT_REPS, size: float = 0.95,
                 seed: int = 0) -> tuple[float, float, str]:
    """Compatibility name for :func:`stratified_bootstrap` (runs only)."""
    return stratified_bootstrap(func, arrays, reps, size, seed)


def ratio_of_iqms(x: np.ndarray, y: np.ndarray) -> float:
    den = iqm(y)
    return iqm(x) / den if den > 0 else float("nan")


def method_stats(scores: dict[str, np.ndarray], reference: str, reps: int = DEFAULT_REPS,
                 seed: int = 0) -> dict[str, dict]:
    """Per method: IQM with its CI (runs resampled), the ratio of IQMs to ``reference`` with a paired CI
    (runs and test seeds resampled, the same seeds for both), and the probability of improvement."""
    out = {}
    ref = scores.get(reference)
    for name, s in scores.items():
        s = _2d(s)
        lo, hi, method = stratified_bootstrap(iqm, [s], reps, seed=seed, task_bootstrap=s.shape[0] == 1)
        row = {"iqm": iqm(s), "iqm_ci": [lo, hi], "mean": float(s.mean()), "n": int(s.size),
               "runs": int(s.shape[0]), "tasks": int(s.shape[1]), "ci_method": method}
        if ref is not None and name != reference:
            rlo, rhi, rmethod = stratified_bootstrap(ratio_of_iqms, [s, _2d(ref)], reps, seed=seed,
                                                     task_bootstrap=True)
            row.update({f"vs_{reference}_iqm_ratio": ratio_of_iqms(s, ref), f"vs_{reference}_ci": [rlo, rhi],
                        f"vs_{reference}_ci_method": rmethod,
                        f"prob_improvement_vs_{reference}": prob_improvement(s, _2d(ref))})
        out[name] = row
    return out


def performance_profile(scores: dict[str, np.ndarray], taus: np.ndarray) -> dict[str, list[float]]:
    """Share of (run, task) scores above each threshold ``tau`` (rliable's score distributions)."""
    return {m: [float((_2d(s) > t).mean()) for t in taus] for m, s in scores.items()}
