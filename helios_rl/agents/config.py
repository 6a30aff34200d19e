"""Agent hyperparameter files (``agents/*.yaml``), in the RL Baselines3 Zoo's format.

A file is named after its algorithm (``ppo.yaml``, ``a2c.yaml``, ``dqn.yaml``, ``maskable_ppo.yaml``)
and maps environment ids to hyperparameters, exactly as the Zoo's ``hyperparams/<algo>.yml``, so the
same file works with ``python -m rl_zoo3.train --conf-file agents/ppo.yaml``::

    helios_rl/Serving-Sim-v0:
      policy: MlpPolicy
      n_timesteps: 20000
      n_envs: 4
      learning_rate: lin_3e-4       # Zoo schedules: lin_<initial>
      policy_kwargs: "dict(net_arch=[64, 64])"

Zoo keys handled here: ``policy``, ``n_timesteps``, ``n_envs``, ``normalize`` (bool or VecNormalize
kwargs), ``policy_kwargs`` (mapping or the Zoo's ``dict(...)`` string); the rest go to the algorithm's
constructor. A top-level ``helios:`` mapping (ignored by the Zoo) holds this project's training
settings: ``eval_freq``, ``eval_episodes``, ``checkpoint_freq``, ``vec_env`` (dummy | subproc),
``horizon``, ``algo`` (overrides the file name), ``reward_weights`` (the environment's penalty weights over its
defaults, ``{name: weight >= 0}``; for example all 0 to train on the scenario's objective alone).
"""

from __future__ import annotations

import ast
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from helios_rl.controllers.policy import ALGOS, algo_class

ZOO_KEYS = ("policy", "n_timesteps", "n_envs", "normalize", "policy_kwargs")
UNSUPPORTED_ZOO_KEYS = ("env_wrapper", "frame_stack", "callback", "vec_env_wrapper")
HELIOS_DEFAULTS = {"eval_freq": 2000, "eval_episodes": 3, "checkpoint_freq": 5000, "vec_env": "dummy",
                   "horizon": None, "algo": None, "reward_weights": None}
FLAT_ALGOS = ("dqn",)  # algorithms that need the Discrete (flat) action space


class AgentConfigError(ValueError):
    """An agent file that cannot be used: unknown algorithm, missing env id, bad hyperparameter."""


@dataclass
class AgentConfig:
    algo: str
    env_id: str
    path: str
    policy: str = "MlpPolicy"
    n_timesteps: int = 10_000
    n_envs: int = 1
    normalize: bool | dict = False
    policy_kwargs: dict = field(default_factory=dict)
    hyperparams: dict = field(default_factory=dict)  # passed to the algorithm's constructor
    helios: dict = field(default_factory=dict)

    @property
    def action_mode(self) -> str:
        return "flat" if self.algo in FLAT_ALGOS else "multi"

    @property
    def maskable(self) -> bool:
        return self.algo == "maskable_ppo"

    def to_dict(self) -> dict:
        return {"algo": self.algo, "env_id": self.env_id, "path": self.path, "policy": self.policy,
                "n_timesteps": self.n_timesteps, "n_envs": self.n_envs, "normalize": self.normalize,
                "policy_kwargs": {k: (v.__name__ if isinstance(v, type) else v) for k, v in self.policy_kwargs.items()},
                "hyperparams": self.hyperparams, "helios": self.helios}

    def algorithm_kwargs(self) -> dict:
        """Constructor kwargs with Zoo schedules and policy_kwargs resolved."""
        kw = {k: _schedule(v) if k in ("learning_rate", "clip_range") else v for k, v in self.hyperparams.items()}
        if self.policy_kwargs:
            kw["policy_kwargs"] = dict(self.policy_kwargs)
        return kw


def env_id_for(backend: str, algo: str) -> str:
    from helios_rl.env import ENV_IDS

    return ENV_IDS[(backend, "flat" if algo in FLAT_ALGOS else "multi")]


def load_agent(path: str | Path, backend: str = "sim", algo: str | None = None) -> AgentConfig:
    """Read an agent file for ``backend``'s environment id (see module docstring)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise AgentConfigError(f"{path}: cannot read agent file: {exc}") from None
    if not isinstance(data, dict):
        raise AgentConfigError(f"{path}: expected a mapping of environment ids to hyperparameters")
    helios = dict(HELIOS_DEFAULTS)
    extra = data.get("helios") or {}
    if not isinstance(extra, dict):
        raise AgentConfigError(f"{path}: helios: expected a mapping")
    unknown = set(extra) - set(HELIOS_DEFAULTS)
    if unknown:
        raise AgentConfigError(f"{path}: helios: unknown key(s) {sorted(unknown)}; known: {sorted(HELIOS_DEFAULTS)}")
    helios.update(extra)
    name = (algo or helios["algo"] or path.stem).lower().replace("-", "_")
    if name not in ALGOS:
        raise AgentConfigError(f"{path}: unknown algorithm {name!r} (from the file name or helios.algo); "
                               f"known: {list(ALGOS)}")
    if helios["vec_env"] not in ("dummy", "subproc"):
        raise AgentConfigError(f"{path}: helios.vec_env must be 'dummy' or 'subproc', got {helios['vec_env']!r}")
    if helios["reward_weights"] is not None:
        from helios_rl.env.env import DEFAULT_WEIGHTS

        rw = helios["reward_weights"]
        if not isinstance(rw, dict):
            raise AgentConfigError(f"{path}: helios.reward_weights: expected a mapping {{name: weight}}")
        bad = sorted(set(rw) - set(DEFAULT_WEIGHTS))
        if bad:
            raise AgentConfigError(f"{path}: helios.reward_weights: unknown weight(s) {bad}; known: "
                                   f"{sorted(DEFAULT_WEIGHTS)}")
        for k, v in rw.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise AgentConfigError(f"{path}: helios.reward_weights.{k}: must be a number >= 0, got {v!r}")
        helios["reward_weights"] = {k: float(v) for k, v in rw.items()}
    env_id = env_id_for(backend, name)
    if env_id not in data:
        have = [k for k in data if k != "helios"]
        raise AgentConfigError(f"{path}: no hyperparameters for {env_id} (the {backend} backend, "
                               f"{'flat' if name in FLAT_ALGOS else 'MultiDiscrete'} actions); the file has {have}")
    hp = dict(data[env_id] or {})
    for key in UNSUPPORTED_ZOO_KEYS:
        if key in hp:
            raise AgentConfigError(f"{path}: {env_id}.{key}: not supported by helios-rl train")
    cfg = AgentConfig(algo=name, env_id=env_id, path=str(path), helios=helios)
    cfg.policy = str(hp.pop("policy", "MlpPolicy"))
    try:
        cfg.n_timesteps = int(float(hp.pop("n_timesteps", 10_000)))
        cfg.n_envs = int(hp.pop("n_envs", 1))
    except (TypeError, ValueError) as exc:
        raise AgentConfigError(f"{path}: {env_id}: n_timesteps / n_envs must be numbers: {exc}") from None
    if cfg.n_timesteps < 1 or cfg.n_envs < 1:
        raise AgentConfigError(f"{path}: {env_id}: n_timesteps and n_envs must be >= 1")
    cfg.normalize = hp.pop("normalize", False)
    cfg.policy_kwargs = _policy_kwargs(hp.pop("policy_kwargs", {}), f"{path}: {env_id}.policy_kwargs")
    accepted = set(inspect.signature(algo_class(name).__init__).parameters) - {"self", "policy", "env"}
    bad = sorted(set(hp) - accepted)
    if bad:
        raise AgentConfigError(f"{path}: {env_id}: unknown hyperparameter(s) {bad} for {name}")
    for key in ("learning_rate", "clip_range"):
        if key in hp:
            try:
                _schedule(hp[key])
            except ValueError as exc:
                raise AgentConfigError(f"{path}: {env_id}.{key}: {exc}") from None
    cfg.hyperparams = hp
    return cfg


def _schedule(value: Any):
    """A constant, or the Zoo's ``lin_<x>`` linear schedule from x to 0."""
    if isinstance(value, str):
        if value.startswith("lin_"):
            start = float(value[4:])
            return lambda progress_remaining: progress_remaining * start
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"expected a number or lin_<number>, got {value!r}") from None
    return value


def _policy_kwargs(value: Any, where: str) -> dict:
    """A mapping, or the Zoo's ``"dict(net_arch=[64, 64], activation_fn=nn.Tanh)"`` string, parsed
    without eval: keyword literals, plus ``nn.<Activation>`` names."""
    if isinstance(value, dict):
        return dict(value)
    if not isinstance(value, str):
        raise AgentConfigError(f"{where}: expected a mapping or a dict(...) string")
    try:
        node = ast.parse(value.strip(), mode="eval").body
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args):
            raise ValueError("expected dict(key=value, ...)")
        out = {}
        for kw in node.keywords:
            v = kw.value
            if isinstance(v, ast.Attribute) and isinstance(v.value, ast.Name) and v.value.id == "nn":
                import torch.nn as nn

                out[kw.arg] = getattr(nn, v.attr)
            else:
                out[kw.arg] = ast.literal_eval(v)
        return out
    except (SyntaxError, ValueError, AttributeError) as exc:
        raise AgentConfigError(f"{where}: cannot parse {value!r}: {exc}") from None
