"""``helios-rl train``: one Stable-Baselines3 agent on one scenario, reproducible and resumable.

A run folder ``<out>/<scenario>__<agent>__<seed>__<unix time>/`` (CleanRL's naming) holds:

- ``config.json``: scenario (path and a copy as ``scenario.yaml``), agent hyperparameters, seed,
  backend, environment id and kwargs, git revision, package versions, the command;
- ``spaces.json``: the observation/action schema a deployed policy is checked against;
- ``policy.zip`` (final), ``best_model.zip`` (best evaluation), ``vecnormalize.pkl`` when used;
- ``checkpoints/`` (``rl_model_<steps>_steps.zip`` + replay buffer / VecNormalize statistics), from
  which ``--resume RUN`` continues after a kill;
- ``evaluations.npz`` (EvalCallback on a separate environment), ``monitor/``, TensorBoard logs under
  ``tb/``, a W&B run under ``wandb/`` (offline unless ``WANDB_MODE`` says otherwise);
- ``metrics.json``: timesteps, wall time, evaluation curve, final and best mean evaluation reward.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from helios_rl.agents.config import AgentConfig, load_agent
from helios_rl.controllers.policy import algo_class
from helios_rl.utils.io import atomic_write_json
from helios_rl.seeds import dev_seed
from helios_rl.utils.provenance import package_versions

CHECKPOINT_RE = re.compile(r"rl_model_(\d+)_steps\.zip$")
EVAL_SEED_OFFSET = 7919  # the evaluation env's seed relative to the training seed


def run_id(scenario_name: str, agent: AgentConfig, seed: int) -> str:
    return f"{scenario_name}__{Path(agent.path).stem}__{seed}__{int(time.time())}"


def last_checkpoint(run_dir: Path) -> tuple[Path, int] | None:
    best = None
    for f in (run_dir / "checkpoints").glob("rl_model_*_steps.zip"):
        m = CHECKPOINT_RE.search(f.name)
        if m and (best is None or int(m.group(1)) > best[1]):
            best = (f, int(m.group(1)))
    return best


def _save_atomic(model, path: Path) -> None:
    tmp = path.with_name(path.stem + ".tmp.zip")
    model.save(tmp)
    os.replace(tmp, path)


def make_env_fn(env_kwargs: dict) -> Callable:
    """A picklable-by-reference factory for one environment (works under SubprocVecEnv spawn)."""
    return _EnvFactory(dict(env_kwargs))


class _EnvFactory:
    def __init__(self, kwargs: dict) -> None:
        self.kwargs = kwargs

    def __call__(self):
        from helios_rl.env.env import HeliosServingEnv

        return HeliosServingEnv(**self.kwargs)


def _vec_env(env_kwargs: dict, n_envs: int, seed: int, kind: str, monitor_dir: Path | None):
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

    cls = SubprocVecEnv if (kind == "subproc" and n_envs > 1) else DummyVecEnv
    vkw = {"start_method": "spawn"} if cls is SubprocVecEnv else None
    return make_vec_env(make_env_fn(env_kwargs), n_envs=n_envs, seed=seed, vec_env_cls=cls, vec_env_kwargs=vkw,
                        monitor_dir=str(monitor_dir) if monitor_dir else None)


def _wandb_run(run_dir: Path, name: str, config: dict, mode: str | None, group: str | None = None):
    """A W&B run (offline unless WANDB_MODE / ``mode`` says otherwise) or None when disabled/unavailable."""
    mode = mode or os.environ.get("WANDB_MODE") or "offline"
    if mode == "disabled":
        return None
    try:
        import wandb
    except ImportError:
        return None
    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "helios_rl"), name=name, id=name.replace("/", "-"),
                      dir=str(run_dir), config=config, mode=mode, sync_tensorboard=True, resume="allow", group=group,
                      settings=wandb.Settings(console="off", x_disable_stats=True))


def train(env: str | None, agent: str | Path, seed: int = 0, backend: str = "sim", timesteps: int | None = None,
          out: str | Path = "runs", profile: str | None = None, resume: str | Path | None = None,
          wandb_mode: str | None = None, n_envs: int | None = None, progress: bool = True,
          device: str = "cpu", say: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
          wandb_group: str | None = None) -> dict[str, Any]:
    """Train (or resume) one agent; returns the metrics written to ``metrics.json``. ``wandb_group``
    groups the W&B run with others (e.g. every trial of one ``helios-rl benchmark``)."""
    import torch
    from stable_baselines3.common.callbacks import CallbackList, CheckpointCallback
    from stable_baselines3.common.vec_env import VecNormalize

    from helios_rl.utils.provenance import git_revision
    from helios_rl.scenario import load_scenario

    if backend not in ("sim", "live"):
        raise ValueError(f"--backend must be 'sim' or 'live', got {backend!r}")
    dev_seed(seed, "helios-rl train --seed")
    dev_seed(seed + EVAL_SEED_OFFSET, "helios-rl train (its evaluation environment)")
    sc = load_scenario(env)
    cfg = load_agent(agent, backend)
    if n_envs:
        cfg.n_envs = int(n_envs)
    if backend == "live" and cfg.n_envs > 1:
        say(f"live backend: {cfg.n_envs} environments each load the real models; using 1")
        cfg.n_envs = 1
    total = int(timesteps or cfg.n_timesteps)

    if resume:
        run_dir = Path(resume)
        if not (run_dir / "config.json").exists():
            raise FileNotFoundError(f"--resume {run_dir}: not a run folder (no config.json)")
        saved = json.loads((run_dir / "config.json").read_text())
        seed, total = int(saved["seed"]), int(saved["timesteps"])
        env_kwargs = saved["env_kwargs"]
    else:
        run_dir = Path(out) / run_id(sc.name, cfg, seed)
        run_dir.mkdir(parents=True, exist_ok=False)
        env_kwargs = {"scenario": str(Path(sc.path).resolve()) if sc.path != "<dict>" else None, "backend": backend,
                      "action_mode": cfg.action_mode}
        if cfg.helios.get("horizon"):
            env_kwargs["horizon"] = int(cfg.helios["horizon"])
        if cfg.helios.get("reward_weights"):  # the agent file's penalty weights (recorded with the run)
            env_kwargs["reward_weights"] = dict(cfg.helios["reward_weights"])
        if backend == "sim":
            if profile in (None, "auto"):
                from helios_rl.env.profile import ensure_profile

                profile = str(ensure_profile(sc, say=say))
            env_kwargs["profile"] = str(Path(profile).resolve())
        else:
            if profile not in (None, "auto"):
                env_kwargs["profile"] = str(Path(profile).resolve())
            # live: the reward reads the free-running agreement (and a perplexity floor where the SLO has one);
            # the secondary figures (a full-depth pass per served output) would only slow training
            env_kwargs["score"] = "agreement"
    torch.manual_seed(seed)
    np.random.seed(seed)

    ckpt = last_checkpoint(run_dir) if resume else None
    venv = _vec_env(env_kwargs, cfg.n_envs, seed, cfg.helios["vec_env"], run_dir / "monitor")
    eval_env = _vec_env(env_kwargs, 1, seed + EVAL_SEED_OFFSET, "dummy", None)
    schema = eval_env.env_method("schema")[0]
    norm_kw = cfg.normalize if isinstance(cfg.normalize, dict) else ({} if cfg.normalize else None)
    if norm_kw is not None:
        stats = run_dir / "vecnormalize.pkl"
        ckpt_stats = run_dir / "checkpoints" / f"rl_model_vecnormalize_{ckpt[1]}_steps.pkl" if ckpt else None
        if ckpt_stats is not None and ckpt_stats.exists():
            venv = VecNormalize.load(str(ckpt_stats), venv)
        elif resume and stats.exists():
            venv = VecNormalize.load(str(stats), venv)
        else:
            venv = VecNormalize(venv, **norm_kw)
        eval_env = VecNormalize(eval_env, training=False, norm_reward=False, **{k: v for k, v in norm_kw.items()
                                                                                if k not in ("norm_reward",)})

    config = {"run_id": run_dir.name, "algo": cfg.algo, "agent": cfg.to_dict(), "scenario_path": sc.path,
              "scenario": sc.name, "seed": seed, "backend": backend, "timesteps": total, "env_id": cfg.env_id,
              "env_kwargs": env_kwargs, "git": git_revision(), "versions": package_versions(),
              "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    if not resume:
        atomic_write_json(run_dir / "config.json", config)
        atomic_write_json(run_dir / "spaces.json", schema)
        if sc.path != "<dict>" and Path(sc.path).exists():
            shutil.copyfile(sc.path, run_dir / "scenario.yaml")

    cls = algo_class(cfg.algo)
    done = 0
    if resume and ckpt is None:
        say(f"--resume {run_dir}: no checkpoint yet; starting from scratch")
    if ckpt is not None:
        from helios_rl.controllers.policy import load_sb3

        model = load_sb3(cfg.algo, ckpt[0], device=device)
        model.set_env(venv)
        done = int(model.num_timesteps)
        buf = run_dir / "checkpoints" / f"rl_model_replay_buffer_{ckpt[1]}_steps.pkl"
        if hasattr(model, "load_replay_buffer") and buf.exists():
            model.load_replay_buffer(buf)
        say(f"resuming {run_dir.name} from {ckpt[0].name} ({done}/{total} steps)")
    else:
        model = cls(cfg.policy, venv, seed=seed, device=device, tensorboard_log=str(run_dir / "tb"), verbose=0,
                    **cfg.algorithm_kwargs())

    h = cfg.helios
    eval_freq = max(1, int(h["eval_freq"]) // cfg.n_envs)
    if cfg.maskable:
        from sb3_contrib.common.maskable.callbacks import MaskableEvalCallback as EvalCls
    else:
        from stable_baselines3.common.callbacks import EvalCallback as EvalCls
    callbacks = [CheckpointCallback(save_freq=max(1, int(h["checkpoint_freq"]) // cfg.n_envs),
                                    save_path=str(run_dir / "checkpoints"), name_prefix="rl_model",
                                    save_replay_buffer=hasattr(model, "replay_buffer"),
                                    save_vecnormalize=norm_kw is not None),
                 EvalCls(eval_env, n_eval_episodes=int(h["eval_episodes"]), eval_freq=eval_freq,
                         best_model_save_path=str(run_dir), log_path=str(run_dir), deterministic=True, verbose=0)]
    wb = _wandb_run(run_dir, run_dir.name, config, wandb_mode, wandb_group)
    if wb is not None:
        from wandb.integration.sb3 import WandbCallback

        callbacks.append(WandbCallback(verbose=0))
    t0 = time.perf_counter()
    remaining = max(0, total - done)
    try:
        if remaining:
            model.learn(total_timesteps=remaining, callback=CallbackList(callbacks), progress_bar=progress,
                        reset_num_timesteps=ckpt is None, tb_log_name="tb")
    finally:
        wall = time.perf_counter() - t0
        _save_atomic(model, run_dir / "policy.zip")
        if norm_kw is not None:
            venv.save(str(run_dir / "vecnormalize.pkl"))
        venv.close()
        eval_env.close()
    metrics = _metrics(run_dir, model, wall, total)
    if wb is not None:
        wb.summary.update({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        wb.finish()
        metrics["wandb_dir"] = str(Path(wb.dir).parent) if getattr(wb, "dir", None) else None
    atomic_write_json(run_dir / "metrics.json", metrics)
    metrics["run_dir"] = str(run_dir)
    return metrics


def _metrics(run_dir: Path, model, wall_s: float, total: int) -> dict:
    out: dict[str, Any] = {"timesteps": int(model.num_timesteps), "target_timesteps": total,
                           "train_wall_s": round(wall_s, 2), "steps_per_s": round(model.num_timesteps / wall_s, 1)
                           if wall_s > 0 else None}
    ev = run_dir / "evaluations.npz"
    if ev.exists():
        data = np.load(ev)
        means = data["results"].mean(axis=1)
        out["eval_curve"] = [{"timesteps": int(t), "mean_reward": float(m), "std_reward": float(s)}
                             for t, m, s in zip(data["timesteps"], means, data["results"].std(axis=1))]
        out["eval_mean_reward_final"] = float(means[-1])
        out["eval_mean_reward_best"] = float(means.max())
    return out
