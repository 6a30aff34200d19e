"""``HeliosServingEnv``: one Gymnasium step = one control interval of the serving loop.

At a step boundary the action is applied (model, loaded depth, batch cap, exit threshold; each with
a "keep" value), the backend serves ``interval_s`` seconds of (virtual) serving time, and the
interval's telemetry becomes the observation (normalised to [0, 1]; raw values in
``info["obs_raw"]`` and ``info["telemetry"]``) and the reward (every term in
``info["reward_terms"]``). ``terminated`` only on a real serving failure; the horizon and the end
of the trace give ``truncated``.

Actions: ``MultiDiscrete([models+1, depths+1, batches+1, thresholds+1])`` where 0 keeps the current
value; depth and batch buckets are absolute (depth: each model's quarter depths, batch: powers of
two up to the engine's cap). ``action_masks()`` follows sb3-contrib's MaskablePPO convention and
masks what the current model and memory budget cannot take; a model change in the same action is
resolved by clamping depth and batch to what the new model admits (``info["adjusted"]``).
``action_mode="flat"`` gives a ``Discrete`` space over every feasible (model, depth, batch,
threshold) tuple plus 0 = keep, for algorithms without masking (DQN).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from helios_rl.engine.config import ServingConfig
from helios_rl.env.backend import Interval

DEFAULT_THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95)
DEFAULT_WEIGHTS = {"breach": 0.5, "agreement": 1.0, "slo": 0.5, "switch": 0.5, "adjusted": 0.05, "failure": 10.0}
EXIT_BUCKETS = 4
ENV_OBJECTIVES = ("throughput", "goodput", "latency", "energy")


class HeliosServingEnv(gym.Env):
    """Adaptive early-exit serving as an MDP (see module docstring).

    Args:
        scenario: a scenario YAML path (or a loaded :class:`~helios_rl.scenario.Scenario`).
        backend: ``sim`` (needs ``profile``) or ``live`` (default: the scenario's ``backend.kind``).
        profile: simulator profile JSON from ``helios-rl calibrate``.
        interval_s: control interval (default ``backend.interval_s``); horizon: steps before truncation.
        objective: throughput / goodput / latency / energy (default: the scenario's SLO objective).
        reward_weights: penalty weights over :data:`DEFAULT_WEIGHTS`.
        noise, randomize: simulator noise and domain randomisation (relative scale of the step-time model).
        clock, timing: live backend's clock (virtual / wall) and cost timing (cpu / wall / modeled).
        record: a folder; each finished episode is written there as JSONL (see :mod:`.recording`).
    """

    metadata = {"render_modes": []}

    def __init__(self, scenario: Any, backend: str | None = None, profile: str | None = None,
                 interval_s: float | None = None, horizon: int | None = None, objective: str | None = None,
                 reward_weights: dict | None = None, thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS,
                 depth_buckets: int = 4, action_mode: str = "multi", noise: bool = True, randomize: float = 0.0,
                 clock: str | None = None, timing: str | None = None, record: str | None = None) -> None:
        from helios_rl.scenario import Scenario

        self.kwargs = {k: v for k, v in dict(backend=backend, profile=profile, interval_s=interval_s, horizon=horizon,
                                             objective=objective, reward_weights=reward_weights,
                                             thresholds=list(thresholds), depth_buckets=depth_buckets,
                                             action_mode=action_mode, noise=noise, randomize=randomize, clock=clock,
                                             timing=timing).items() if v is not None}
        self.scenario = scenario if isinstance(scenario, Scenario) else Scenario.from_yaml(scenario)
        sc = self.scenario
        self.scenario_path = str(scenario) if not isinstance(scenario, Scenario) else sc.path
        kind = backend or sc.backend.kind
        if kind not in ("sim", "live"):
            raise ValueError(f"backend must be 'sim' or 'live', got {kind!r}")
        if action_mode not in ("multi", "flat"):
            raise ValueError(f"action_mode must be 'multi' or 'flat', got {action_mode!r}")
        self.objective = objective or sc.slo.objective
        if self.objective not in ENV_OBJECTIVES:
            raise ValueError(f"objective must be one of {ENV_OBJECTIVES}, got {self.objective!r}")
        unknown = set(reward_weights or {}) - set(DEFAULT_WEIGHTS)
        if unknown:
            raise ValueError(f"unknown reward weight(s) {sorted(unknown)}; known: {sorted(DEFAULT_WEIGHTS)}")
        self.weights = {**DEFAULT_WEIGHTS, **(reward_weights or {})}
        self.interval_s = float(interval_s or sc.backend.interval_s)
        self.horizon = int(horizon) if horizon else None
        self.kind, self.action_mode = kind, action_mode
        from helios_rl.env.workload import EpisodeWorkload

        self.workload = EpisodeWorkload(sc)
        if kind == "sim":
            from helios_rl.env.profile import SimProfile
            from helios_rl.env.sim import SimBackend

            if profile is None:
                raise ValueError("the sim backend needs profile=PATH (write one with `helios-rl calibrate "
                                 f"{self.scenario_path} --out PROFILE.json`)")
            prof = SimProfile.load(profile)
            prof.check(sc, str(profile))
            self.backend = SimBackend(prof, sc, self.workload, noise=noise, randomize=randomize)
        else:
            from helios_rl.env.live import LiveBackend

            self.backend = LiveBackend(sc, self.workload, clock=clock or sc.backend.clock,
                                       timing=timing or sc.backend.timing, profile=profile)
        self.models = tuple(sc.models)
        self.L = {m: self.backend.num_layers[m] for m in self.models}
        self.depth_values = sorted({max(1, math.ceil(f * L)) for L in self.L.values()
                                    for f in np.linspace(1 / depth_buckets, 1.0, depth_buckets)})
        cap = sc.engine.max_batch
        self.batch_values = sorted({2 ** i for i in range(int(math.log2(cap)) + 1)} | {cap})
        self.thresholds = tuple(float(t) for t in thresholds)
        self.cap = cap
        dims = [len(self.models) + 1, len(self.depth_values) + 1, len(self.batch_values) + 1, len(self.thresholds) + 1]
        self.dims = dims
        self.tuples = [(m, d, b, t) for m in self.models for d in self.depth_values if d <= self.L[m]
                       and self.backend.admissible(m, d) >= 1 for b in self.batch_values
                       if b <= self.backend.admissible(m, d) for t in self.thresholds]
        if not self.tuples:
            raise ValueError(f"{self.scenario_path}: no (model, depth, batch) fits the memory budget")
        self.action_space = spaces.MultiDiscrete(dims) if action_mode == "multi" else spaces.Discrete(len(self.tuples) + 1)
        self.obs_names = (["arrival_rate", "queue", "running"] + [f"exit_q{i}" for i in range(EXIT_BUCKETS)]
                          + ["breach_rate", "confidence", "ttft_p95_slo", "tpot_p95_slo", "memory_headroom",
                             "tokens_per_s"] + [f"model_{m}" for m in self.models]
                          + ["depth", "batch", "threshold", "since_switch", "progress"])
        n = len(self.obs_names)
        self.observation_space = spaces.Box(0.0, 1.0, shape=(n,), dtype=np.float32)
        self.record_dir = Path(record) if record else None
        self._episode: list[dict] = []
        self._episodes = 0
        self._seed = 0
        self._cfg: dict | None = None
        self._masks: dict[tuple, np.ndarray] = {}  # (model, depth) -> mask (the budget is fixed per episode)
        self.steps = 0

    # ------------------------------------------------------------------ episode
    def _initial(self) -> dict:
        sc = self.scenario
        st = sc.controllers.get("static")
        model = (st.model if st is not None and st.model else None) or self.models[0]
        if self.backend.admissible(model, 1) < 1:
            model = next(m for m in self.models if self.backend.admissible(m, 1) >= 1)
        depth = (st.depth if st is not None and st.depth else None) or self.L[model]
        while depth > 1 and self.backend.admissible(model, depth) < 1:
            depth -= 1
        return {"model": model, "depth": depth, "batch": self.backend.admissible(model, depth),
                "threshold": sc.exits.threshold}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self._seed = int(seed)
        self._flush()
        cfg = self._initial()
        self.backend.reset(self._seed, ServingConfig(model=cfg["model"], depth=cfg["depth"], max_batch=cfg["batch"],
                                                     threshold=cfg["threshold"]))
        self._cfg = cfg
        self.rate, self.new_tokens = self.workload.rates(self._seed)
        self.demand_tps = max(self.rate * self.new_tokens, 1e-9)
        self.steps = 0
        self.last_switch = 0.0
        self.rate_est = self.rate
        self._total = len(self.workload.arrays(self._seed)[0])
        self._served = 0
        self._episode = [{"header": True, "scenario": self.scenario_path, "backend": self.kind, "seed": self._seed,
                          "kwargs": self.kwargs}]
        from helios_rl.engine.telemetry import TelemetrySnapshot

        snap = TelemetrySnapshot(model=cfg["model"], depth=cfg["depth"], num_layers=self.L[cfg["model"]],
                                 max_batch=cfg["batch"])
        obs, raw = self._observe(Interval(snap))
        return obs, {"obs_raw": raw, "config": dict(cfg), "seed": self._seed}

    def _check_action(self, action):
        """The action as ints; ValueError naming the space when it is outside it."""
        try:
            if self.action_mode == "multi":
                a = np.asarray(action)
                ok = a.shape == (4,) and (a.dtype.kind in "iu" or (a.dtype.kind == "f" and np.all(a == np.round(a))))
                vals = [int(x) for x in a.tolist()] if ok else []
                ok = ok and all(0 <= v < n for v, n in zip(vals, self.dims))
                out = vals
            else:
                ok = np.ndim(action) == 0 and float(action).is_integer() and 0 <= int(action) < self.action_space.n
                out = int(action) if ok else None
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"action {action!r} is outside the action space {self.action_space}")
        return out

    def _decode(self, action) -> tuple[dict, bool]:
        cur = self._cfg
        if self.action_mode == "flat":
            if int(action) == 0:
                return dict(cur), False
            m, d, b, t = self.tuples[int(action) - 1]
            return {"model": m, "depth": d, "batch": b, "threshold": t}, False
        a = action
        model = self.models[a[0] - 1] if a[0] else cur["model"]
        depth = self.depth_values[a[1] - 1] if a[1] else cur["depth"]
        batch = self.batch_values[a[2] - 1] if a[2] else cur["batch"]
        thr = self.thresholds[a[3] - 1] if a[3] else cur["threshold"]
        adjusted = False
        if depth > self.L[model]:
            depth, adjusted = self.L[model], True
        while depth > 1 and self.backend.admissible(model, depth) < 1:
            depth, adjusted = depth - 1, True
        adm = self.backend.admissible(model, depth)
        if adm < 1:
            return dict(cur), True
        if batch > adm:
            batch, adjusted = adm, True
        return {"model": model, "depth": depth, "batch": batch, "threshold": thr}, adjusted

    def step(self, action):
        if self._cfg is None:
            raise RuntimeError("call reset() before step()")
        action = self._check_action(action)
        cfg, adjusted = self._decode(action)
        cost, rejected = 0.0, None
        if cfg != self._cfg:
            try:
                cost = self.backend.apply(ServingConfig(model=cfg["model"], depth=cfg["depth"], max_batch=cfg["batch"],
                                                        threshold=cfg["threshold"]))
                if cfg["model"] != self._cfg["model"] or cfg["depth"] != self._cfg["depth"]:
                    self.last_switch = self.backend.now
                self._cfg = cfg
            except ValueError as exc:
                rejected, adjusted = str(exc), True
        iv = self.backend.advance(self.interval_s)
        self.steps += 1
        self._served += iv.snapshot.requests_finished
        terms = self._reward(iv, cost, adjusted)
        reward = float(sum(terms.values()))
        obs, raw = self._observe(iv)
        terminated = iv.failure is not None
        truncated = (not terminated) and (self.backend.finished or (self.horizon is not None and self.steps >= self.horizon))
        telemetry = dict(iv.snapshot.__dict__)
        telemetry["exit_counts"] = list(telemetry["exit_counts"])
        info = {"reward_terms": terms, "obs_raw": raw, "telemetry": telemetry, "config": dict(self._cfg),
                "adjusted": adjusted, "rejected": rejected, "switch_cost_s": cost, "agreement": iv.agreement,
                "slo_met": iv.slo_met, "slo_missed": iv.slo_missed, "failure": iv.failure}
        if self.record_dir is not None:
            self._episode.append({"step": self.steps, "action": action, "reward": reward, "terms": terms,
                                  "config": dict(self._cfg), "telemetry": telemetry})
        if terminated or truncated:
            info["episode_summary"] = self.backend.summary()
            self._flush()
        return obs, reward, terminated, truncated, info

    # ------------------------------------------------------------------ reward, observation, masks
    def _reward(self, iv: Interval, cost: float, adjusted: bool) -> dict[str, float]:
        s, w, dt = iv.snapshot, self.weights, self.interval_s
        if self.objective == "throughput":
            obj = s.output_tokens / dt / self.demand_tps
        elif self.objective == "goodput":
            obj = iv.slo_met / dt / self.rate
        elif self.objective == "latency":
            obj = -(s.ttft_p95 / self.scenario.slo.ttft_s) if s.requests_finished else 0.0
        else:  # energy: tokens per busy second, relative to the demand
            obj = (s.output_tokens / max(iv.busy_s, 1e-9) / self.demand_tps) if s.output_tokens else 0.0
        done = iv.slo_met + iv.slo_missed
        return {"objective": float(obj), "breach": -w["breach"] * float(s.breach_rate),
                "agreement": -w["agreement"] * (1.0 - iv.agreement) if iv.agreement is not None else 0.0,
                "slo": -w["slo"] * (iv.slo_missed / done if done else 0.0), "switch": -w["switch"] * cost / dt,
                "adjusted": -w["adjusted"] if adjusted else 0.0,
                "failure": -w["failure"] if iv.failure is not None else 0.0}

    def _observe(self, iv: Interval) -> tuple[np.ndarray, dict]:
        s, slo, cfg = iv.snapshot, self.scenario.slo, self._cfg
        window = s.window_s if s.window_s > 0 else self.interval_s
        self.rate_est = 0.5 * self.rate_est + 0.5 * (s.arrivals / window) if s.steps or s.arrivals else self.rate_est
        counts = s.exit_counts
        total = sum(counts)
        hist = [0.0] * EXIT_BUCKETS
        if total > 0:
            n = len(counts)
            for i, c in enumerate(counts):
                if c:
                    hist[min(i * EXIT_BUCKETS // n, EXIT_BUCKETS - 1)] += c / total
        budget = s.budget_bytes or 0
        raw = {"arrival_rate": self.rate_est, "queue": s.waiting, "running": s.running, "breach_rate": s.breach_rate,
               "confidence": s.conf_mean, "ttft_p95": s.ttft_p95, "tpot_p95": s.tpot_p95,
               "memory_headroom": (budget - s.resident_bytes) / budget if budget else 1.0,
               "tokens_per_s": s.tokens_per_s, "model": cfg["model"], "depth": cfg["depth"], "batch": cfg["batch"],
               "threshold": cfg["threshold"], "since_switch": self.backend.now - self.last_switch,
               "progress": self._served / max(self._total, 1)}
        thr = cfg["threshold"] if cfg["threshold"] is not None else self.scenario.exits.default_threshold
        vec = ([self.rate_est / (2 * self.rate), s.waiting / self.cap, s.running / self.cap] + hist
               + [s.breach_rate, s.conf_mean, s.ttft_p95 / (2 * slo.ttft_s), s.tpot_p95 / (2 * slo.tpot_s),
                  raw["memory_headroom"], s.tokens_per_s / (2 * self.demand_tps)]
               + [1.0 if m == cfg["model"] else 0.0 for m in self.models]
               + [cfg["depth"] / self.L[cfg["model"]], cfg["batch"] / self.cap, thr,
                  raw["since_switch"] / (20 * self.interval_s), raw["progress"]])
        # clip to [0, 1]; NaN (v != v) -> 0
        obs = np.array([(0.0 if v != v or v < 0.0 else 1.0 if v > 1.0 else v) for v in vec], dtype=np.float32)
        return obs, raw

    def action_masks(self) -> np.ndarray:
        """Flat bool mask (MaskablePPO convention: the dimensions' masks concatenated)."""
        if self.action_mode == "flat":
            return np.ones(len(self.tuples) + 1, dtype=bool)
        cur = self._cfg or self._initial()
        key = (cur["model"], cur["depth"])
        cached = self._masks.get(key)
        if cached is not None:
            return cached.copy()
        m, adm = cur["model"], self.backend.admissible
        parts = [[True] + [adm(x, 1) >= 1 for x in self.models],
                 [True] + [d <= self.L[m] and adm(m, d) >= 1 for d in self.depth_values],
                 [True] + [b <= adm(m, cur["depth"]) for b in self.batch_values],
                 [True] * (len(self.thresholds) + 1)]
        self._masks[key] = np.concatenate([np.asarray(p, dtype=bool) for p in parts])
        return self._masks[key].copy()

    # ------------------------------------------------------------------ recording, closing
    def _flush(self) -> None:
        if self.record_dir is None or len(self._episode) <= 1:
            return
        from helios_rl.env.recording import write_episode

        write_episode(self.record_dir / f"episode-{self._episodes:05d}.jsonl", self._episode)
        self._episodes += 1
        self._episode = self._episode[:1]

    def close(self) -> None:
        self._flush()
        if getattr(self, "backend", None) is not None:
            self.backend.close()
        super().close()
