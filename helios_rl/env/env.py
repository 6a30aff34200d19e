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
threshold) tuple plus 0 = keep, for algorithms without masking (DQN). The encodings live in
:mod:`helios_rl.env.spaces`, shared with deployed policies (:mod:`helios_rl.controllers.policy`).

Reward: the objective per interval relative to the trace's nominal demand (throughput: tokens over
demand minus one, so serving a fixed trace sooner pays; goodput: tokens of SLO-meeting requests
under a config that meets the agreement floor), minus weighted penalties (see envs/README.md).
:meth:`HeliosServingEnv.step_config` steps under a controller's ``ServingConfig`` instead of an
action, so baselines and policies are scored by the same function (``helios-rl compare``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from helios_rl.engine.config import ServingConfig
from helios_rl.scenario import exit_setting
from helios_rl.seeds import TEST_SEED_BASE
from helios_rl.env.backend import Interval, slo_window_s
from helios_rl.env.spaces import DEFAULT_THRESHOLDS, EXIT_BUCKETS, ActionCodec, ObservationBuilder, build_spec  # noqa: F401

DEFAULT_WEIGHTS = {"breach": 0.5, "agreement": 1.0, "slo": 0.5, "switch": 0.5, "adjusted": 0.05, "failure": 10.0}
HELDOUT_SEED_BASE = TEST_SEED_BASE  # training draws workload seeds below this; reported figures use seeds from it on
ENV_OBJECTIVES = ("throughput", "goodput", "latency", "energy")


class HeliosServingEnv(gym.Env):
    """Adaptive early-exit serving as an MDP (see module docstring).

    Args:
        scenario: a scenario YAML path, a loaded :class:`~helios_rl.scenario.Scenario`, or None for the
            embedded default (``helios_rl/scenarios/default.yaml``).
        backend: ``sim`` (needs ``profile``) or ``live`` (default: the scenario's ``backend.kind``).
        profile: simulator profile JSON from ``helios-rl calibrate``; ``"auto"`` (default) uses the scenario's
            cached profile and calibrates it on the live engine first when there is none (sim backend); the
            live backend uses a profile only for its predicted agreement.
        interval_s: control interval (default ``backend.interval_s``); horizon: steps before truncation.
        objective: throughput / goodput / latency / energy (default: the scenario's SLO objective).
        reward_weights: penalty weights over :data:`DEFAULT_WEIGHTS`.
        noise, randomize: simulator noise and domain randomisation (relative scale of the step-time model).
        clock, timing: live backend's clock (virtual / wall) and cost timing (cpu / wall / modeled).
        record: a folder; each finished episode is written there as JSONL (see :mod:`.recording`).
        score: what the live backend measures on each finished request (:data:`helios_rl.env.live.SCORES`):
            "all" (default: free-running agreement, teacher-forced agreement, reference perplexity) or
            "agreement" (what goodput and the reward read: the free-running agreement, and the reference
            perplexity where the SLO has a floor on it; the rest is None in ``info["scored"]``).
    """

    metadata = {"render_modes": []}

    def __init__(self, scenario: Any = None, backend: str | None = None, profile: str | None = "auto",
                 interval_s: float | None = None, horizon: int | None = None, objective: str | None = None,
                 reward_weights: dict | None = None, thresholds: tuple[float, ...] | None = None,
                 depth_buckets: int = 4, action_mode: str = "multi", noise: bool = True, randomize: float = 0.0,
                 clock: str | None = None, timing: str | None = None, record: str | None = None,
                 score: str | None = None) -> None:
        from helios_rl.scenario import Scenario, load_scenario

        self.kwargs = {k: v for k, v in dict(backend=backend, profile=profile, interval_s=interval_s, horizon=horizon,
                                             objective=objective, reward_weights=reward_weights,
                                             thresholds=None if thresholds is None else list(thresholds),
                                             depth_buckets=depth_buckets,
                                             action_mode=action_mode, noise=noise, randomize=randomize, clock=clock,
                                             timing=timing, score=score).items() if v is not None}
        self.scenario = load_scenario(scenario)
        ppath = None
        self.slo_reference = None  # the measured reference steps relative SLOs were resolved from (results record it)
        kind = backend or self.scenario.backend.kind
        drift = kind == "live" and self.scenario.backend.drift == "probe"
        if self.scenario.slo.relative or self.scenario.rate_batch is not None or drift:  # relative to this
            # machine: SLOs and arrival rates resolved from the calibrated profile (and its speed probe)
            from helios_rl.env.profile import SimProfile, ensure_profile, resolve_scenario

            ppath = ensure_profile(self.scenario, say=lambda m: print(m, file=sys.stderr, flush=True)) \
                if profile in (None, "auto") else profile
            prof = SimProfile.load(ppath)
            self.scenario, self.slo_reference = resolve_scenario(self.scenario, prof)
        sc = self.scenario
        self.scenario_path = sc.path if isinstance(scenario, Scenario) or scenario is None else str(scenario)
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

            if profile in (None, "auto"):  # the scenario's cached profile, calibrated on the live engine once
                from helios_rl.env.profile import ensure_profile

                # the profile its relative SLOs were resolved from, where they were (the same cached file)
                profile = str(ppath) if ppath is not None else \
                    str(ensure_profile(sc, say=lambda m: print(m, file=sys.stderr, flush=True)))
                self.kwargs["profile"] = profile
            prof = SimProfile.load(profile)
            prof.check(sc, str(profile))
            self.backend = SimBackend(prof, sc, self.workload, noise=noise, randomize=randomize)
        else:
            from helios_rl.env.live import LiveBackend

            self.backend = LiveBackend(sc, self.workload, clock=clock or sc.backend.clock,
                                       timing=timing or sc.backend.timing,
                                       profile=str(ppath) if drift else (None if profile == "auto" else profile),
                                       score=score or "all")
        self.models = tuple(sc.models)
        self.L = {m: self.backend.num_layers[m] for m in self.models}
        self.cap = sc.engine.max_batch
        # normalisers: the scenario's nominal trace (its own seed), the same every episode, so a policy
        # deployed elsewhere (controllers.policy) sees observations on the scale it was trained on
        rate, new_tokens = self.workload.rates(0)
        norm = {"rate": rate, "demand_tps": max(rate * new_tokens, 1e-9), "ttft_s": sc.slo.ttft_s,
                "tpot_s": sc.slo.tpot_s, "interval_s": self.interval_s}
        # the exit dimension: calibrated precision targets (target mode) or raw thresholds (threshold mode)
        choices = tuple(thresholds) if thresholds is not None else sc.exits.choices
        self.space_spec = build_spec(self.models, self.L, self.cap, self.backend.admissible, choices, depth_buckets,
                               action_mode, norm)
        self.codec = ActionCodec(self.space_spec, self.backend.admissible)
        self.observer = ObservationBuilder(self.space_spec, sc.exits.setting)
        self.depth_values, self.batch_values = self.space_spec.depth_values, self.space_spec.batch_values
        self.thresholds = tuple(self.space_spec.thresholds)
        self.dims = self.codec.dims
        self.tuples = [tuple(t) for t in self.space_spec.tuples]
        if action_mode == "flat" and not self.tuples or not any(self.backend.admissible(m, 1) >= 1 for m in self.models):
            raise ValueError(f"{self.scenario_path}: no (model, depth, batch) fits the memory budget")
        self.action_space = spaces.MultiDiscrete(self.dims) if action_mode == "multi" else spaces.Discrete(self.codec.n_flat)
        self.obs_names = list(self.space_spec.obs_names)
        n = len(self.obs_names)
        self.observation_space = spaces.Box(0.0, 1.0, shape=(n,), dtype=np.float32)
        self.record_dir = Path(record) if record else None
        self._episode: list[dict] = []
        self._episodes = 0
        self._seed = 0
        self._started = False
        self._cfg: dict | None = None
        self.steps = 0

    # ------------------------------------------------------------------ episode
    def _initial(self) -> dict:
        return initial_config(self.scenario, self.models, self.L, self.backend.admissible)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Start an episode. ``seed`` fixes the workload (trace, prompts, lengths) and the simulator's
        noise; without it the next workload seed is drawn from the environment's RNG (itself seeded by
        the first seeded reset), so training sees a new trace every episode, reproducibly. Training
        draws seeds below :data:`HELDOUT_SEED_BASE`; evaluation (``helios-rl compare``) uses seeds from it
        on, so its workloads are held out. ``options={"config": {...}}`` starts from a given config
        (model, depth, batch, threshold) instead of the scenario's static default."""
        super().reset(seed=seed)
        if seed is not None:
            self._seed = int(seed)
        elif self._started:
            self._seed = int(self.np_random.integers(0, HELDOUT_SEED_BASE))
        self._started = True
        self._flush()
        cfg = self._initial()
        if options and options.get("config"):
            cfg = {**cfg, **options["config"]}
        self.backend.reset(self._seed, ServingConfig(model=cfg["model"], depth=cfg["depth"], max_batch=cfg["batch"],
                                                     **self.scenario.exits.knob(cfg["threshold"])))
        self._cfg = cfg
        self.steps = 0
        self.last_switch = 0.0
        self.observer.reset()
        self._total = len(self.workload.arrays(self._seed)[0])
        self._served = 0
        self._episode = [{"header": True, "scenario": self.scenario_path, "backend": self.kind, "seed": self._seed,
                          "kwargs": self.kwargs}]
        from helios_rl.engine.telemetry import TelemetrySnapshot

        snap = TelemetrySnapshot(model=cfg["model"], depth=cfg["depth"], num_layers=self.L[cfg["model"]],
                                 max_batch=cfg["batch"])
        self.last_snapshot = snap
        obs, raw = self._observe(Interval(snap))
        return obs, {"obs_raw": raw, "config": dict(cfg), "seed": self._seed}

    def _check_action(self, action):
        """The action as ints; ValueError naming the space when it is outside it."""
        return self.codec.check(action)

    def _decode(self, action) -> tuple[dict, bool]:
        return self.codec.decode(action, self._cfg)

    def step(self, action):
        if self._cfg is None:
            raise RuntimeError("call reset() before step()")
        action = self._check_action(action)
        cfg, adjusted = self._decode(action)
        return self._transition(cfg, adjusted, action)

    def step_config(self, config: ServingConfig | None):
        """One step under a controller's decision instead of an action (None keeps the config).

        Fields the config leaves None keep their current value; a model change without a depth loads
        the new model at full depth (clamped to the budget, as actions are). Rewards and info are those
        of :meth:`step`, so baselines and policies are scored by the same function."""
        if self._cfg is None:
            raise RuntimeError("call reset() before step_config()")
        if config is None:
            return self._transition(dict(self._cfg), False, None)
        cfg, adjusted = self.resolve_config(config, self._cfg)
        return self._transition(cfg, adjusted, None)

    def resolve_config(self, config: ServingConfig, cur: dict) -> tuple[dict, bool]:
        """(config dict, adjusted): ``config``'s set fields over ``cur``, clamped to the model and budget."""
        model = config.model or cur["model"]
        if model not in self.L:
            raise ValueError(f"unknown model {model!r}; the scenario's models are {list(self.models)}")
        same = model == cur["model"]
        depth = config.depth if config.depth is not None else (cur["depth"] if same else self.L[model])
        batch = config.max_batch if config.max_batch is not None else (cur["batch"] if same else None)
        thr = cur["threshold"] if exit_setting(config) is None else exit_setting(config)
        if thr == "calibrated":
            thr = self.scenario.exits.setting
        # a depth beyond the model or a batch beyond the budget is cut silently (controllers ask for
        # "as deep / as large as fits"); a depth the budget cannot hold counts as adjusted
        return self.codec.clamp(model, min(int(depth), self.L[model]), batch, thr, cur, batch_adjusts=False)

    def _transition(self, cfg: dict, adjusted: bool, action):
        cost, rejected = 0.0, None
        if cfg != self._cfg:
            t_decision = self.backend.now
            try:
                cost = self.backend.apply(ServingConfig(model=cfg["model"], depth=cfg["depth"], max_batch=cfg["batch"],
                                                        **self.scenario.exits.knob(cfg["threshold"])))
                if cfg["model"] != self._cfg["model"] or cfg["depth"] != self._cfg["depth"]:
                    self.last_switch = t_decision
                self._cfg = cfg
            except ValueError as exc:
                rejected, adjusted = str(exc), True
        iv = self.backend.advance(self.interval_s)
        self.last_snapshot = iv.snapshot
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
                "agreement_source": iv.extra.get("agreement_source"),
                "predicted_agreement": iv.extra.get("predicted_agreement"), "scored": iv.extra.get("scored"),
                "slo_met": iv.slo_met, "slo_missed": iv.slo_missed, "goodput_tokens": iv.good_tokens,
                "failure": iv.failure}
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
        norm = self.space_spec.norm
        if self.objective == "throughput":
            # minus one per interval: a trace's output is fixed, so the episode's sum (tokens served over
            # the demand, minus intervals used) rewards serving it sooner, not merely serving it
            obj = s.output_tokens / dt / norm["demand_tps"] - 1.0
        elif self.objective == "goodput":  # tokens of requests meeting the SLO and the quality floors
            obj = iv.good_tokens / dt / norm["demand_tps"]
        elif self.objective == "latency":
            obj = -(s.ttft_p95 / self.scenario.slo.ttft_s) if s.requests_finished else 0.0
        else:  # energy: tokens per busy second, relative to the demand
            obj = (s.output_tokens / max(iv.busy_s, 1e-9) / norm["demand_tps"]) if s.output_tokens else 0.0
        done = iv.slo_met + iv.slo_missed
        if iv.agreement is None and done:
            raise RuntimeError(f"{self.kind} backend finished {done} request(s) without an accuracy value: the "
                               f"reward's accuracy term cannot be computed (an interval with output must be scored)")
        # None only when no request finished in the interval: nothing served yet to score, nothing to pay
        return {"objective": float(obj), "breach": -w["breach"] * float(s.breach_rate),
                "agreement": -w["agreement"] * (1.0 - iv.agreement) if iv.agreement is not None else 0.0,
                "slo": -w["slo"] * (iv.slo_missed / done if done else 0.0), "switch": -w["switch"] * cost / dt,
                "adjusted": -w["adjusted"] if adjusted else 0.0,
                "failure": -w["failure"] if iv.failure is not None else 0.0}

    def _observe(self, iv: Interval) -> tuple[np.ndarray, dict]:
        obs, raw = self.observer(iv.snapshot, self._cfg, self.backend.now - self.last_switch)
        raw["progress"] = self._served / max(self._total, 1)
        return obs, raw

    def slo_window_s(self, seed: int) -> float:
        """The seconds within which every good token of workload ``seed`` is served, fixed by the workload and the
        SLO (:func:`helios_rl.env.backend.slo_window_s`): the denominator of the score's goodput."""
        return slo_window_s(self.workload, seed, self.scenario.slo)

    def action_masks(self) -> np.ndarray:
        """Flat bool mask (MaskablePPO convention: the dimensions' masks concatenated)."""
        return self.codec.masks(self._cfg or self._initial())

    def schema(self) -> dict:
        """What a trained policy needs to be deployed as a controller (``spaces.json`` of a run)."""
        return {"spec": self.space_spec.to_dict(), "initial": self._initial(),
                "default_threshold": self.scenario.exits.default_threshold, "scenario": self.scenario.name,
                "objective": self.objective, "reward_weights": self.weights}

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


def initial_config(scenario, models, num_layers: dict, admissible) -> dict:
    """The episode's first config: the static baseline's model and depth (or the first model that
    fits, at the deepest depth that fits), the batch the budget admits, the scenario's threshold."""
    st = scenario.controllers.get("static")
    model = (st.model if st is not None and st.model else None) or models[0]
    if admissible(model, 1) < 1:
        model = next(m for m in models if admissible(m, 1) >= 1)
    depth = (st.depth if st is not None and st.depth else None) or num_layers[model]
    while depth > 1 and admissible(model, depth) < 1:
        depth -= 1
    return {"model": model, "depth": depth, "batch": admissible(model, depth), "threshold": scenario.exits.setting}
