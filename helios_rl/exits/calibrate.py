"""Threshold calibration for cascaded exits, coverage/precision curves and exit-layer selection.

*Cascade semantics.* A token exits at the first exit layer whose threshold its confidence passes, so
the tokens that "would exit" at layer ``l`` are those that passed no earlier layer and pass ``l``.
Calibration therefore walks the exit layers shallow to deep on the held-out tokens still in flight:

* ``per_layer`` (default, CALM-style): at each layer, the lowest threshold whose exiting tokens agree
  with the final layer at rate >= ``target``. Every layer's exits then meet the target, so the
  overall agreement (exited plus full-depth tokens) does too, and it keeps holding when a different
  workload makes more or fewer tokens exit (precision at a confidence level transfers; coverage
  does not).
* ``overall``: one common per-layer precision level, bisected as low as possible while the overall
  agreement over *all* held-out tokens still reaches ``target``. More exits, but the guarantee only
  holds at the calibration data's coverage.

"Agreement" is exact argmax identity with the full model's own next-token prediction.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

DISABLED = 1.0  # threshold stored for a layer where no threshold reaches the target
MODES = ("per_layer", "overall")


def lowest_threshold(conf: np.ndarray, correct: np.ndarray, target: float, min_count: int = 20) -> float:
    """Lowest ``t`` with precision(conf >= t) >= ``target`` over at least ``min_count`` tokens.

    ``t`` is always one of the observed confidences (the most conservative value that selects the
    same held-out tokens). Returns :data:`DISABLED` when no threshold qualifies.
    """
    if len(conf) == 0:
        return DISABLED
    order = np.argsort(-conf, kind="stable")
    c, ok = conf[order], correct[order].astype(np.float64)
    prec = np.cumsum(ok) / np.arange(1, len(c) + 1)
    group_end = np.append(c[1:] < c[:-1], True)  # last index of each run of equal confidences
    valid = group_end & (prec >= target) & (np.arange(1, len(c) + 1) >= min_count)
    if not valid.any():
        return DISABLED
    return float(min(c[np.nonzero(valid)[0][-1]], DISABLED))


def cascade(conf: dict[int, np.ndarray], correct: dict[int, np.ndarray], thresholds: dict[int, float],
            layers: tuple[int, ...]) -> dict:
    """Where each token exits under ``thresholds`` (shallow to deep) and how often it agrees.

    Returns ``exit_at`` (layer per token, -1 = full depth), and per layer: ``exits``, ``precision``
    (among tokens exiting there), ``coverage`` (cumulative share exited by that layer) and
    ``cum_precision`` (agreement among all tokens exited by then); plus ``agreement`` (overall, with
    full-depth tokens counted as agreeing).
    """
    n = len(next(iter(conf.values()))) if conf else 0
    exit_at = np.full(n, -1, dtype=np.int64)
    agree = np.ones(n, dtype=bool)
    left = np.ones(n, dtype=bool)
    per: dict[int, dict] = {}
    done, good = 0, 0
    for layer in sorted(layers):
        out = left & (conf[layer] >= thresholds.get(layer, DISABLED))
        exit_at[out] = layer
        agree[out] = correct[layer][out]
        left &= ~out
        k, g = int(out.sum()), int(correct[layer][out].sum())
        done, good = done + k, good + g
        per[layer] = {"exits": k, "precision": g / k if k else None, "coverage": done / max(n, 1),
                      "cum_precision": good / done if done else None}
    return {"exit_at": exit_at, "layers": per, "agreement": float(agree.mean()) if n else 1.0}


def calibrate(conf: dict[int, np.ndarray], correct: dict[int, np.ndarray], layers: tuple[int, ...],
              target: float = 0.95, mode: str = "per_layer", min_count: int = 20) -> dict[int, float]:
    """Thresholds for the cascade over ``layers`` (see module docstring for the two modes)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target must be in (0, 1], got {target}")

    def at_level(level: float) -> dict[int, float]:
        thr: dict[int, float] = {}
        left = np.ones(len(next(iter(conf.values()))), dtype=bool)
        for layer in sorted(layers):
            thr[layer] = lowest_threshold(conf[layer][left], correct[layer][left], level, min_count)
            left &= ~(conf[layer] >= thr[layer])
        return thr

    if mode == "per_layer" or not layers:
        return at_level(target)
    lo, hi = 0.0, target  # find the lowest common level whose overall agreement still reaches target
    best = at_level(target)
    for _ in range(20):
        mid = (lo + hi) / 2
        thr = at_level(mid)
        if cascade(conf, correct, thr, layers)["agreement"] >= target:
            best, hi = thr, mid
        else:
            lo = mid
    return best


def curve(conf: np.ndarray, correct: np.ndarray, points: int = 41) -> dict[str, list[float]]:
    """Stand-alone precision at coverages ``0..1``: agreement among the ``c`` most confident tokens."""
    order = np.argsort(-conf, kind="stable")
    ok = correct[order].astype(np.float64)
    prec = np.cumsum(ok) / np.arange(1, len(ok) + 1)
    cov = np.linspace(1.0 / points, 1.0, points)
    idx = np.clip((cov * len(ok)).astype(int) - 1, 0, len(ok) - 1)
    return {"coverage": cov.round(4).tolist(), "precision": prec[idx].round(4).tolist(),
            "threshold": conf[order][idx].round(5).tolist()}


def precision_at_coverage(conf: np.ndarray, correct: np.ndarray, coverage: float) -> float:
    """Agreement among the ``coverage`` share of most confident tokens (at least one token)."""
    k = max(1, int(round(coverage * len(conf))))
    order = np.argsort(-conf, kind="stable")[:k]
    return float(correct[order].mean())


@dataclass
class Costs:
    """Measured per-token times (ms) at batch 1: one decoder layer, its extra cost when it recomputes a
    skipped position, one exit evaluation, and the final LM head."""

    layer: float
    recompute: float
    exit_eval: float
    final_head: float
    num_layers: int

    def speedup(self, exit_at: np.ndarray, layers: tuple[int, ...]) -> float:
        """Estimated full-depth time over cascade time for tokens exiting at ``exit_at`` (-1 = none)."""
        full = self.num_layers * self.layer + self.final_head
        lay = np.asarray(sorted(layers))
        deep = exit_at < 0
        depth = np.where(deep, self.num_layers, exit_at + 1)
        evals = np.where(deep, len(lay), np.searchsorted(lay, exit_at) + 1)
        t = depth * self.layer + evals * self.exit_eval + deep * self.final_head
        t = t + (self.num_layers - depth) * self.recompute
        return float(full * len(t) / max(t.sum(), 1e-12))


def select_layers(conf: dict[int, np.ndarray], correct: dict[int, np.ndarray], candidates: tuple[int, ...],
                  costs: Costs, target: float = 0.95, mode: str = "per_layer", max_layers: int = 3,
                  min_count: int = 20) -> tuple[tuple[int, ...], float]:
    """The subset of ``candidates`` (at most ``max_layers``) whose calibrated cascade is fastest by ``costs``."""
    best: tuple[tuple[int, ...], float] = ((), 1.0)
    for r in range(1, min(max_layers, len(candidates)) + 1):
        for sub in itertools.combinations(sorted(candidates), r):
            thr = calibrate(conf, correct, sub, target, mode, min_count)
            if all(thr[l] >= DISABLED for l in sub):
                continue
            s = costs.speedup(cascade(conf, correct, thr, sub)["exit_at"], sub)
            if s > best[1] + 1e-9:
                best = (sub, s)
    return best
