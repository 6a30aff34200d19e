"""``helios-rl train --env SCENARIO --agent agents/ppo.yaml --seed 0 1 2``: train an SB3 agent, one run per seed.

A trained agent's result is over several training seeds (runs): ``--seed 0 1 2 3 4`` (or ``--seeds 5``) trains
one run per seed in turn; ``helios-rl compare --policies`` pools the runs (IQM, stratified bootstrap over runs).
Training seeds are development seeds: a test seed is refused before anything trains.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a Stable-Baselines3 agent on a scenario (sim or live backend)")
    p.add_argument("--env", default="default", help="scenario YAML (default: the embedded default)")
    p.add_argument("--agent", required=True, help="agent hyperparameters, e.g. agents/ppo.yaml")
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, nargs="+", default=None, metavar="S",
                       help="training seed(s); one run per seed (default: 0)")
    seeds.add_argument("--seeds", type=int, default=None, metavar="N", help="train N runs, seeds 0 .. N-1")
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
    from helios_rl.seeds import dev_seed

    if args.timesteps is not None and args.timesteps < 1:
        raise ValueError(f"--timesteps must be >= 1, got {args.timesteps}")
    if args.seeds is not None and args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    seeds = list(range(args.seeds)) if args.seeds is not None else (args.seed or [0])
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seed: repeated seed in {seeds}")
    for s in seeds:  # every seed checked before the first run starts
        dev_seed(s, "helios-rl train --seed")
    if args.resume and len(seeds) > 1:
        raise ValueError("--resume continues one run: give a single --seed")
    dirs = []
    for s in seeds:
        m = train(args.env, args.agent, seed=s, backend=args.backend, timesteps=args.timesteps, out=args.out,
                  profile=args.profile, resume=args.resume, wandb_mode=args.wandb, n_envs=args.n_envs,
                  progress=not args.no_progress)
        best = m.get("eval_mean_reward_best")
        print(f"seed {s}: trained {m['timesteps']} steps in {m['train_wall_s']} s ({m['steps_per_s']} steps/s); "
              f"best eval reward {best:.3f}" if best is not None else f"seed {s}: trained {m['timesteps']} steps")
        print(f"run folder: {m['run_dir']}  (deploy: --controller policy:{m['run_dir']})")
        dirs.append(str(m["run_dir"]))
    if len(dirs) > 1:
        print(f"{len(dirs)} runs; pool them: helios-rl compare --policies {','.join(dirs)}")
    return 0
