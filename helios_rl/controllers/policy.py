"""A trained RL policy as a controller: ``policy:runs/<id>`` anywhere a controller is named.

A run folder written by ``helios-rl train`` holds ``config.json`` (algorithm, scenario, seed),
``spaces.json`` (the :class:`~helios_rl.env.spaces.SpaceSpec` the policy was trained on: models,
depth/batch/threshold buckets, observation names, normalisers, the initial config) and
``policy.zip`` (Stable-Baselines3). :func:`load_policy` checks the folder against the controller
context it is deployed on and refuses, naming the difference, a policy trained for other spaces; the
controller then builds the same observation the environment built (shared
:class:`~helios_rl.env.spaces.ObservationBuilder`) and decodes actions the same way
(:class:`~helios_rl.env.spaces.ActionCodec`), masking what the budget cannot hold.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from helios_rl.controllers.base import Controller, ControllerContext
from helios_rl.engine.config import ServingConfig
from helios_rl.engine.telemetry import TelemetrySnapshot

ALGOS = ("ppo", "a2c", "dqn", "maskable_ppo")


class PolicyError(ValueError):
    """A run folder that cannot serve as a controller here (missing file, corrupt, other spaces)."""


def algo_class(name: str):
    """The Stable-Baselines3 (or sb3-contrib) class of algorithm ``name``."""
    name = name.lower()
    if name == "ppo":
        from stable_baselines3 import PPO as cls
    elif name == "a2c":
        from stable_baselines3 import A2C as cls
    elif name == "dqn":
        from stable_baselines3 import DQN as cls
    elif name == "maskable_ppo":
        from sb3_contrib import MaskablePPO as cls
    else:
        raise PolicyError(f"unknown algorithm {name!r}; known: {list(ALGOS)}")
    return cls


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise PolicyError(f"{path}: missing (not a run folder written by `helios-rl train`?)")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PolicyError(f"{path}: unreadable JSON: {exc}") from None


def load_sb3(algo: str, path: Path, device: str = "cpu"):
    """Load an SB3 archive, turning a corrupt or truncated file into a :class:`PolicyError`."""
    if not path.exists():
        raise PolicyError(f"{path}: missing policy archive")
    if not zipfile.is_zipfile(path):
        raise PolicyError(f"{path}: not a zip archive (corrupt or truncated policy file)")
    try:
        return algo_class(algo).load(path, device=device)
    except PolicyError:
        raise
    except Exception as exc:  # noqa: BLE001 - SB3 raises many types for a damaged archive
        raise PolicyError(f"{path}: cannot load {algo} policy: {type(exc).__name__}: {exc}") from None


class TrainedRun:
    """The parts of a run folder a deployed policy needs (see module docstring)."""

    def __init__(self, run_dir: str | Path, which: str = "auto") -> None:
        from helios_rl.env.spaces import SpaceSpec

        self.dir = Path(run_dir)
        if not self.dir.is_dir():
            raise FileNotFoundError(f"{self.dir}: no such run folder")
        self.config = _read_json(self.dir / "config.json")
        schema = _read_json(self.dir / "spaces.json")
        try:
            self.spec = SpaceSpec.from_dict(schema["spec"])
            self.initial = dict(schema["initial"])
            self.default_threshold = float(schema.get("default_threshold", 0.9))
        except (KeyError, TypeError, ValueError) as exc:
            raise PolicyError(f"{self.dir / 'spaces.json'}: malformed space schema: {exc}") from None
        self.algo = str(self.config.get("algo", ""))
        algo_class(self.algo)  # unknown algorithm: a clear error before loading anything
        if which == "auto":  # the evaluation callback's best model when there is one (SB3/Zoo practice)
            which = "best" if (self.dir / "best_model.zip").exists() else "policy"
        name = {"policy": "policy.zip", "best": "best_model.zip"}.get(which, which)
        self.policy_path = self.dir / name
        self.model = load_sb3(self.algo, self.policy_path)
        self._check_model_spaces()
        self.obs_norm = self._obs_normaliser()

    def _obs_normaliser(self):
        """The training run's VecNormalize observation statistics, when it normalised observations."""
        path = self.dir / "vecnormalize.pkl"
        if not path.exists():
            return None
        import pickle

        try:
            with path.open("rb") as fh:
                vn = pickle.load(fh)
        except Exception as exc:  # noqa: BLE001
            raise PolicyError(f"{path}: unreadable VecNormalize statistics: {exc}") from None
        if not getattr(vn, "norm_obs", False):
            return None
        mean, var = np.asarray(vn.obs_rms.mean), np.asarray(vn.obs_rms.var)
        eps, clip = float(vn.epsilon), float(vn.clip_obs)
        return lambda obs: np.clip((obs - mean) / np.sqrt(var + eps), -clip, clip).astype(np.float32)

    def _check_model_spaces(self) -> None:
        from gymnasium import spaces

        spec = self.spec
        obs = self.model.observation_space
        n_obs = len(spec.obs_names)
        if not isinstance(obs, spaces.Box) or obs.shape != (n_obs,):
            raise PolicyError(f"{self.policy_path}: observation space {obs} does not match the schema's "
                              f"{n_obs} observations")
        act = self.model.action_space
        if spec.action_mode == "multi":
            want = [len(spec.models) + 1, len(spec.depth_values) + 1, len(spec.batch_values) + 1, len(spec.thresholds) + 1]
            ok = isinstance(act, spaces.MultiDiscrete) and list(act.nvec) == want
        else:
            want = len(spec.tuples) + 1
            ok = isinstance(act, spaces.Discrete) and int(act.n) == want
        if not ok:
            raise PolicyError(f"{self.policy_path}: action space {act} does not match the schema ({want})")

    @property
    def maskable(self) -> bool:
        return self.algo == "maskable_ppo"


class PolicyController(Controller):
    """Runs a trained policy once per control interval (see module docstring)."""

    name = "policy"

    def __init__(self, ctx: ControllerContext, run: TrainedRun, deterministic: bool = True) -> None:
        from helios_rl.env.spaces import ActionCodec, ObservationBuilder, build_spec

        super().__init__(ctx, None)
        spec = run.spec
        problems = []
        if list(ctx.candidates) != list(spec.models):
            problems.append(f"models: policy has {spec.models}, scenario gives {list(ctx.candidates)}")
        else:
            here = build_spec(ctx.candidates, {m: ctx.profile(m).num_layers for m in ctx.candidates},
                              ctx.memory.max_batch, ctx.admissible, spec.thresholds,
                              spec.depth_buckets, spec.action_mode, spec.norm)
            problems = spec.mismatch(here)
        if problems:
            raise PolicyError(f"{run.dir}: the policy was trained for other spaces: " + "; ".join(problems))
        self.run, self.spec, self.deterministic = run, spec, deterministic
        self.codec = ActionCodec(spec, ctx.admissible)
        self.observer = ObservationBuilder(spec, run.default_threshold)
        self.cfg: dict | None = None
        self.last_switch = 0.0
        self.decisions = 0

    def reset(self, seed: int | None = None) -> None:
        super().reset(seed)
        self.cfg = None
        self.last_switch = 0.0
        self.observer.reset()

    def initial(self) -> dict:
        """The training environment's first config, clamped to what this budget holds."""
        cfg = dict(self.run.initial)
        model = cfg["model"]
        if self.ctx.admissible(model, 1) < 1:
            model = next(m for m in self.spec.models if self.ctx.admissible(m, 1) >= 1)
            cfg["depth"] = self.spec.num_layers[model]
        out, _ = self.codec.clamp(model, int(cfg["depth"]), int(cfg["batch"]), cfg.get("threshold"), cfg)
        return out

    def _config(self, cfg: dict) -> ServingConfig:
        return ServingConfig(model=cfg["model"], depth=int(cfg["depth"]), max_batch=int(cfg["batch"]),
                             **self.ctx.exit_kwargs(cfg["threshold"]),
                             exit_layers=tuple(self.ctx.profile(cfg["model"]).exit_layers), measure=self.ctx.measure)

    def act(self, obs: np.ndarray) -> Any:
        if self.run.obs_norm is not None:
            obs = self.run.obs_norm(obs)
        masks = self.codec.masks(self.cfg) if self.run.maskable else None
        if masks is not None:
            action, _ = self.run.model.predict(obs, deterministic=self.deterministic, action_masks=masks)
        else:
            action, _ = self.run.model.predict(obs, deterministic=self.deterministic)
        return action

    def decide(self, telemetry: TelemetrySnapshot) -> ServingConfig | None:
        self.time = telemetry.time
        if self.cfg is None:
            self.cfg = self.initial()
            self.note("initial", **self.cfg)
            return self._config(self.cfg)
        if telemetry.model and (telemetry.model != self.cfg["model"] or telemetry.depth != self.cfg["depth"]):
            # another decision (a fallback, an operator override) is in force: observe what really runs
            self.cfg = {**self.cfg, "model": telemetry.model, "depth": telemetry.depth,
                        "batch": telemetry.max_batch or self.cfg["batch"]}
        obs, _ = self.observer(telemetry, self.cfg, telemetry.time - self.last_switch)
        action = self.codec.check(self.act(obs))
        new, adjusted = self.codec.decode(action, self.cfg)
        self.decisions += 1
        if new == self.cfg:
            return None
        if new["model"] != self.cfg["model"] or new["depth"] != self.cfg["depth"]:
            self.last_switch = telemetry.time
        self.note("act", action=list(np.atleast_1d(action).tolist()), adjusted=adjusted, **new)
        self.cfg = new
        return self._config(new)


def load_policy(run_dir: str | Path, ctx: ControllerContext, which: str = "auto",
                deterministic: bool = True) -> PolicyController:
    """``policy:<run_dir>``: the trained policy of a ``helios-rl train`` run folder as a controller.

    ``which``: ``auto`` (``best_model.zip``, the evaluation callback's best, when present, else the
    final ``policy.zip``), ``best``, ``policy`` or a file name in the run folder."""
    return PolicyController(ctx, TrainedRun(run_dir, which), deterministic)
