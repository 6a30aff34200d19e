"""``helios-rl train --env SCENARIO --agent agents/ppo.yaml --seed S``: train one SB3 agent."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a Stable-Baselines3 agent on a scenario (sim or live backend)")
    p.add_argument("--env", default="default", help="scenario YAML (default: the embedded default)")
    p.add_argument("--agent", required=True, help="agent hyperparameters, e.g. agents/ppo.yaml")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=("sim", "live"), default="sim")
    p.add_argument("--timesteps", type=int, default=None, help="override the agent file's n_timesteps")
    p.add_argument("--n-envs", type=int, default=None, help="override the agent file's n_envs")
    p.add_argument("--out", default="runs", help="parent folder of the run folder (default: runs/)")
    p.add_argument("--profile", default="auto", help="simulator profile (default: the scenario's cached one)")
    p.add_argument("--resume", default=None, metavar="RUN", help="continue RUN from its last checkpoint")
    p.add_argument("--wandb", choices=("offline", "online", "disabled"), default=None,
                   help="W&B mode (default: $WANDB_MODE, else offline)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from helios_rl.agents.train import train

    if args.timesteps is not None and args.timesteps < 1:
        raise ValueError(f"--timesteps must be >= 1, got {args.timesteps}")
    m = train(args.env, args.agent, seed=args.seed, backend=args.backend, timesteps=args.timesteps, out=args.out,
              profile=args.profile, resume=args.resume, wandb_mode=args.wandb, n_envs=args.n_envs,
              progress=not args.no_progress)
    best = m.get("eval_mean_reward_best")
    print(f"trained {m['timesteps']} steps in {m['train_wall_s']} s ({m['steps_per_s']} steps/s); "
          f"best eval reward {best:.3f}" if best is not None else f"trained {m['timesteps']} steps")
    print(f"run folder: {m['run_dir']}  (deploy: --controller policy:{m['run_dir']})")
    return 0
