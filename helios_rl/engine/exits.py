"""Exit decisions: which rows leave the layer loop at an exit layer.

The layer loop computes exit logits and confidence at every exit layer and then asks an
:class:`ExitDecider` which rows leave. Two deciders exist:

- :class:`ConfidenceExit` (the default, the real mechanism): a row leaves when its confidence
  reaches the layer's threshold; at the last loaded layer, a row below the threshold is a greedy
  exit (a breach when layers are missing).
- :class:`ExitReplay` (speed studies only): each token's exit layer is *drawn* from an exit-layer
  distribution measured on a real model, mapped by depth fraction onto the served model. It exists
  for paper-scale shapes with random weights, whose own confidence means nothing. The heads and
  confidence are still computed, so the work per step is the same as with real exits; only the
  decision is replayed. Everything served this way is labelled ``exit_mode: "replay"``.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


class ConfidenceExit:
    """Leave when confidence >= threshold (the engine's real exit rule)."""

    mode = "confidence"

    def begin(self, n_rows: int, num_layers: int) -> None:
        """A new ``run_rows`` call over ``n_rows`` rows of a model with ``num_layers`` layers."""

    def decide(self, layer: int, conf_np: np.ndarray, threshold: float, rows: np.ndarray) -> np.ndarray:
        """Bool per active row: leave after ``layer``. ``rows``: the rows' indices in the batch."""
        return conf_np >= threshold

    def greedy(self, last: int, conf_np: np.ndarray | None, threshold: float, rows: np.ndarray) -> np.ndarray:
        """Bool per row reaching the last loaded layer ``last``: it exits there without qualifying."""
        if conf_np is None:
            return np.ones(len(rows), dtype=bool)
        return conf_np < threshold


def map_exit_distribution(dist: Sequence[float], num_layers: int) -> np.ndarray:
    """Map a per-layer exit distribution of an ``len(dist)``-layer model onto ``num_layers`` layers.

    A token that exits after layer ``i`` (0-based) of an ``L``-layer model has run the fraction
    ``f = (i + 1) / L`` of the depth; it maps to the layer ``j = round(f * num_layers) - 1`` (at
    least 0), so the last layer maps to the last layer and depth fractions are kept.
    """
    src = np.asarray(dist, dtype=float)
    if src.ndim != 1 or not len(src) or np.any(src < 0) or src.sum() <= 0:
        raise ValueError("exit distribution must be a non-empty 1-D array of non-negative weights")
    src = src / src.sum()
    L = len(src)
    target = np.clip(np.rint((np.arange(L) + 1) / L * num_layers).astype(np.int64) - 1, 0, num_layers - 1)
    out = np.zeros(num_layers)
    np.add.at(out, target, src)
    return out


class ExitReplay(ConfidenceExit):
    """Replay a measured exit-layer distribution (see module docstring). Seeded and reproducible.

    Args:
        distribution: share of tokens exiting at each layer of the *measured* model (its length is
            that model's layer count); e.g. ``ExitProfile.exit_distribution`` or ``exit_counts``.
        seed: seeds the draws; the same seed and the same sequence of engine steps give the same exits.
        source: what was measured (model, heads, thresholds, prompts, date): copied into results.

    Each token (row of a ``run_rows`` call) draws its target exit layer on the served model; it
    leaves at the first exit layer of the serving config at or after that target. A token whose
    target lies beyond the last loaded layer exits there as a greedy exit (a breach under a partial
    load), as an unconfident token does under real exits.
    """

    mode = "replay"

    def __init__(self, distribution: Sequence[float], seed: int = 0, source: dict[str, Any] | None = None) -> None:
        self.distribution = np.asarray(distribution, dtype=float)
        map_exit_distribution(self.distribution, 1)  # validates
        self.seed = int(seed)
        self.source = dict(source or {})
        self._mapped: dict[int, np.ndarray] = {}
        self.reset()

    @classmethod
    def from_profile(cls, profile, seed: int = 0) -> "ExitReplay":
        """From an :class:`~helios_rl.exits.profile.ExitProfile` (or its ``to_dict()``)."""
        d = profile if isinstance(profile, dict) else profile.to_dict()
        dist = d.get("exit_counts") or d["exit_distribution"]
        keep = ("model", "depth", "num_layers", "exit_layers", "measure", "thresholds", "requests", "tokens",
                "mean_exit_layer", "exit_rate", "head_source", "agreement")
        return cls(dist, seed=seed, source={k: d[k] for k in keep if k in d})

    def reset(self, seed: int | None = None) -> None:
        """Restart the draws (from ``seed`` when given)."""
        if seed is not None:
            self.seed = int(seed)
        self.rng = np.random.default_rng(self.seed)
        self._targets = np.zeros(0, dtype=np.int64)

    def mapped(self, num_layers: int) -> np.ndarray:
        """The distribution mapped onto a ``num_layers``-layer model (cached)."""
        if num_layers not in self._mapped:
            self._mapped[num_layers] = map_exit_distribution(self.distribution, num_layers)
        return self._mapped[num_layers]

    def draw(self, n: int, num_layers: int) -> np.ndarray:
        """Target exit layers of ``n`` tokens on a ``num_layers``-layer model."""
        p = self.mapped(num_layers)
        return self.rng.choice(num_layers, size=n, p=p).astype(np.int64)

    def begin(self, n_rows: int, num_layers: int) -> None:
        self._targets = self.draw(n_rows, num_layers)

    def decide(self, layer: int, conf_np: np.ndarray, threshold: float, rows: np.ndarray) -> np.ndarray:
        return self._targets[rows] <= layer

    def greedy(self, last: int, conf_np: np.ndarray | None, threshold: float, rows: np.ndarray) -> np.ndarray:
        return self._targets[rows] > last

    def describe(self) -> dict[str, Any]:
        """The label every replay result carries."""
        return {"exit_mode": self.mode, "seed": self.seed, "source": self.source,
                "source_distribution": np.round(self.distribution / self.distribution.sum(), 6).tolist()}


CONFIDENCE = ConfidenceExit()

