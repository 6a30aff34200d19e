"""Observation and action encoding shared by the environment and by deployed policies.

A policy trained on :class:`~helios_rl.env.env.HeliosServingEnv` must see exactly the same
observation vector, and have its actions decoded exactly the same way, when it later runs as a
controller in the evaluation harness or the server (:mod:`helios_rl.controllers.policy`). Both sides
therefore use these two classes, and a run folder stores their parameters (:meth:`SpaceSpec.to_dict`)
so a policy can be checked against the scenario it is deployed on.

- :class:`ActionCodec`: MultiDiscrete ``[models+1, depths+1, batches+1, thresholds+1]`` (0 keeps the
  current value) or flat Discrete over feasible tuples (0 keeps); decoding, masks, clamping.
- :class:`ObservationBuilder`: telemetry snapshot + config in force -> float32 vector in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

EXIT_BUCKETS = 4
DEFAULT_THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95)
SCHEMA_VERSION = 1

Admissible = Callable[[str, int], int]


@dataclass
class SpaceSpec:
    """Everything that fixes the observation and action spaces (saved beside a trained policy)."""

    models: list[str]
    num_layers: dict[str, int]
    depth_values: list[int]
    batch_values: list[int]
    thresholds: list[float]
    cap: int
    action_mode: str = "multi"
    tuples: list[list] = field(default_factory=list)  # flat mode: (model, depth, batch, threshold) per action - 1
    obs_names: list[str] = field(default_factory=list)
    norm: dict[str, float] = field(default_factory=dict)  # nominal rate, demand tokens/s, SLO, interval
    version: int = SCHEMA_VERSION
    depth_buckets: int = 4  # fractions of each model's depth that ``depth_values`` were built from

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SpaceSpec":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"space schema: unknown field(s) {sorted(unknown)}")
        return cls(**d)

    def mismatch(self, other: "SpaceSpec") -> list[str]:
        """Human-readable differences that make a policy trained on ``self`` unusable on ``other``."""
        out = []
        for key in ("version", "action_mode", "models", "num_layers", "depth_values", "batch_values", "thresholds",
                    "cap", "obs_names"):
            a, b = getattr(self, key), getattr(other, key)
            if key == "thresholds":
                a, b = [round(float(x), 6) for x in a], [round(float(x), 6) for x in b]
            if a != b:
                out.append(f"{key}: policy has {a!r}, scenario gives {b!r}")
        if self.action_mode == "flat" and [list(t) for t in self.tuples] != [list(t) for t in other.tuples]:
            out.append(f"tuples: the flat action list differs ({len(self.tuples)} vs {len(other.tuples)} actions)")
        return out


def depth_values_for(num_layers: dict[str, int], buckets: int) -> list[int]:
    """Absolute depths: each model's ``buckets`` evenly spaced fractions of its depth (merged, sorted)."""
    return sorted({max(1, math.ceil(f * L)) for L in num_layers.values()
                   for f in np.linspace(1 / buckets, 1.0, buckets)})


def batch_values_for(cap: int) -> list[int]:
    return sorted({2 ** i for i in range(int(math.log2(cap)) + 1)} | {cap})


def obs_names_for(models: list[str]) -> list[str]:
    return (["arrival_rate", "queue", "running"] + [f"exit_q{i}" for i in range(EXIT_BUCKETS)]
            + ["breach_rate", "confidence", "ttft_p95_slo", "tpot_p95_slo", "memory_headroom", "tokens_per_s"]
            + [f"model_{m}" for m in models] + ["depth", "batch", "threshold", "since_switch"])


def build_spec(models, num_layers: dict[str, int], cap: int, admissible: Admissible, thresholds, depth_buckets: int,
               action_mode: str, norm: dict[str, float]) -> SpaceSpec:
    models = list(models)
    depths = depth_values_for({m: num_layers[m] for m in models}, depth_buckets)
    batches = batch_values_for(cap)
    thresholds = [float(t) for t in thresholds]
    tuples = [[m, d, b, t] for m in models for d in depths if d <= num_layers[m] and admissible(m, d) >= 1
              for b in batches if b <= admissible(m, d) for t in thresholds] if action_mode == "flat" else []
    return SpaceSpec(models=models, num_layers={m: int(num_layers[m]) for m in models}, depth_values=depths,
                     batch_values=batches, thresholds=thresholds, cap=int(cap), action_mode=action_mode,
                     tuples=tuples, obs_names=obs_names_for(models), norm=dict(norm), depth_buckets=int(depth_buckets))


class ActionCodec:
    """Decodes actions into configs and computes masks, for one :class:`SpaceSpec` and budget."""

    def __init__(self, spec: SpaceSpec, admissible: Admissible) -> None:
        self.spec, self.admissible = spec, admissible
        self.models, self.L = tuple(spec.models), spec.num_layers
        self.dims = [len(spec.models) + 1, len(spec.depth_values) + 1, len(spec.batch_values) + 1,
                     len(spec.thresholds) + 1]
        self.n_flat = len(spec.tuples) + 1
        self._masks: dict[tuple, np.ndarray] = {}

    def check(self, action):
        """The action as ints; ValueError naming the space when it is outside it."""
        try:
            if self.spec.action_mode == "multi":
                a = np.asarray(action)
                ok = a.shape == (4,) and (a.dtype.kind in "iu" or (a.dtype.kind == "f" and np.all(a == np.round(a))))
                vals = [int(x) for x in a.tolist()] if ok else []
                ok = ok and all(0 <= v < n for v, n in zip(vals, self.dims))
                out = vals
            else:
                a = np.asarray(action)
                ok = a.size == 1 and float(a.reshape(-1)[0]).is_integer() and 0 <= int(a.reshape(-1)[0]) < self.n_flat
                out = int(a.reshape(-1)[0]) if ok else None
        except (TypeError, ValueError):
            ok = False
        if not ok:
            space = f"MultiDiscrete({self.dims})" if self.spec.action_mode == "multi" else f"Discrete({self.n_flat})"
            raise ValueError(f"action {action!r} is outside the action space {space}")
        return out

    def decode(self, action, cur: dict) -> tuple[dict, bool]:
        """(config dict, adjusted): the config an (already checked) action asks for, clamped to what the
        model and the budget admit; ``adjusted`` says a value had to be changed."""
        s = self.spec
        if s.action_mode == "flat":
            if int(action) == 0:
                return dict(cur), False
            m, d, b, t = s.tuples[int(action) - 1]
            return {"model": m, "depth": int(d), "batch": int(b), "threshold": float(t)}, False
        a = action
        model = s.models[a[0] - 1] if a[0] else cur["model"]
        depth = s.depth_values[a[1] - 1] if a[1] else cur["depth"]
        batch = s.batch_values[a[2] - 1] if a[2] else cur["batch"]
        thr = s.thresholds[a[3] - 1] if a[3] else cur["threshold"]
        return self.clamp(model, depth, batch, thr, cur)

    def clamp(self, model: str, depth: int, batch: int | None, thr, cur: dict,
              batch_adjusts: bool = True) -> tuple[dict, bool]:
        """(config dict, adjusted): ``depth`` cut to the model and to what the budget holds, ``batch``
        (None: what the budget admits) to the admissible batch; ``cur`` when nothing fits. With
        ``batch_adjusts`` False a batch cut to the budget does not count as adjusted."""
        adjusted = False
        depth = int(depth)
        if depth > self.L[model]:
            depth, adjusted = self.L[model], True
        while depth > 1 and self.admissible(model, depth) < 1:
            depth, adjusted = depth - 1, True
        adm = self.admissible(model, depth)
        if adm < 1:
            return dict(cur), True
        if batch is None:
            batch = adm
        elif batch > adm:
            batch, adjusted = adm, adjusted or batch_adjusts
        return {"model": model, "depth": depth, "batch": int(batch), "threshold": thr}, adjusted

    def masks(self, cur: dict) -> np.ndarray:
        """Flat bool mask (MaskablePPO convention: the dimensions' masks concatenated)."""
        s = self.spec
        if s.action_mode == "flat":
            return np.ones(self.n_flat, dtype=bool)
        key = (cur["model"], cur["depth"])
        cached = self._masks.get(key)
        if cached is None:
            m, adm = cur["model"], self.admissible
            parts = [[True] + [adm(x, 1) >= 1 for x in s.models],
                     [True] + [d <= self.L[m] and adm(m, d) >= 1 for d in s.depth_values],
                     [True] + [b <= adm(m, cur["depth"]) for b in s.batch_values],
                     [True] * (len(s.thresholds) + 1)]
            cached = self._masks[key] = np.concatenate([np.asarray(p, dtype=bool) for p in parts])
        return cached.copy()


class ObservationBuilder:
    """Telemetry snapshot + config in force -> observation in [0, 1] (raw values beside it).

    State across calls: the arrival-rate estimate (an exponential average of arrivals per window).
    Normalisers are the scenario's nominal figures stored in ``spec.norm`` (``rate``: requests/s,
    ``demand_tps``: output tokens/s demanded, ``ttft_s``/``tpot_s``: the SLO, ``interval_s``).
    """

    def __init__(self, spec: SpaceSpec, default_threshold: float) -> None:
        self.spec, self.default_threshold = spec, float(default_threshold)
        n = spec.norm
        self.rate, self.demand_tps = float(n["rate"]), float(n["demand_tps"])
        self.ttft_s, self.tpot_s, self.interval_s = float(n["ttft_s"]), float(n["tpot_s"]), float(n["interval_s"])
        self.rate_est = self.rate

    def reset(self) -> None:
        self.rate_est = self.rate

    def __call__(self, s, cfg: dict, since_switch: float) -> tuple[np.ndarray, dict]:
        spec = self.spec
        window = s.window_s if s.window_s > 0 else self.interval_s
        if s.steps or s.arrivals:
            self.rate_est = 0.5 * self.rate_est + 0.5 * (s.arrivals / window)
        counts = s.exit_counts
        total = sum(counts)
        hist = [0.0] * EXIT_BUCKETS
        if total > 0:
            n = len(counts)
            for i, c in enumerate(counts):
                if c:
                    hist[min(i * EXIT_BUCKETS // n, EXIT_BUCKETS - 1)] += c / total
        budget = s.budget_bytes or 0
        headroom = (budget - s.resident_bytes) / budget if budget else 1.0
        raw = {"arrival_rate": self.rate_est, "queue": s.waiting, "running": s.running, "breach_rate": s.breach_rate,
               "confidence": s.conf_mean, "ttft_p95": s.ttft_p95, "tpot_p95": s.tpot_p95,
               "memory_headroom": headroom, "tokens_per_s": s.tokens_per_s, "model": cfg["model"],
               "depth": cfg["depth"], "batch": cfg["batch"], "threshold": cfg["threshold"],
               "since_switch": since_switch}
        thr = cfg["threshold"] if cfg["threshold"] is not None else self.default_threshold
        cap = spec.cap
        vec = ([self.rate_est / (2 * self.rate), s.waiting / cap, s.running / cap] + hist
               + [s.breach_rate, s.conf_mean, s.ttft_p95 / (2 * self.ttft_s), s.tpot_p95 / (2 * self.tpot_s),
                  headroom, s.tokens_per_s / (2 * self.demand_tps)]
               + [1.0 if m == cfg["model"] else 0.0 for m in spec.models]
               + [cfg["depth"] / spec.num_layers[cfg["model"]], cfg["batch"] / cap, thr,
                  since_switch / (20 * self.interval_s)])
        # clip to [0, 1]; NaN (v != v) -> 0
        obs = np.array([(0.0 if v != v or v < 0.0 else 1.0 if v > 1.0 else v) for v in vec], dtype=np.float32)
        return obs, raw
