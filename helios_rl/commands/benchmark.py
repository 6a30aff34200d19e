"""``helios-rl benchmark SUITE --out DIR``: train every agent, evaluate every method, write the leaderboard."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "benchmark", help="a reproducible leaderboard for a scenario suite (Ray Tune; resumable)",
        description="Train every agent (simulator, several training seeds), evaluate every method (baselines: "
                    "static, best-static and tuned AIMD searched on development seeds, HELIOS, AIMD, random; every "
                    "trained run) "
                    "on held-out test seeds on the simulator and the live engine, and write leaderboard.md, "
                    "leaderboard.json and plots (IQM with stratified-bootstrap CIs over runs, performance "
                    "profiles, probability of improvement). --quick runs a reduced configuration (the suite's "
                    "steady and exit-lever scenarios, PPO and DQN, 2 training seeds x 2,048 steps, 2 test seeds, the sim "
                    "and live backends on both, calibration on 300 tokens per point; measured on a 2-core CPU: 19 "
                    "minutes, calibrations included (2026-12-04, and 19 min 17 s on 2026-12-05's suite with both "
                    "calibrations cold), and 45-46 minutes with --repeat 3 (2026-12-05, twice, "
                    "with the denser drift probe of that day, which adds wall time to live episodes off their clock); on "
                    "a machine half as fast, about twice that (estimated: loads are relative to its speed)). "
                    "A killed run resumes: run the same command again.")
    p.add_argument("suite", help="a folder of scenario YAML files (envs/suite) or one scenario file")
    p.add_argument("--out", required=True, help="benchmark folder (trials, runs, leaderboard)")
    p.add_argument("--quick", action="store_true", help="the reduced configuration described above")
    p.add_argument("--agents", default="ppo,maskable_ppo,dqn")
    p.add_argument("--baselines", default="static,best-static,helios,aimd,tuned-aimd,random")
    p.add_argument("--train-seeds", type=int, default=5)
    p.add_argument("--test-seeds", type=int, default=5)
    p.add_argument("--timesteps", type=int, default=None, help="per training run (default: each agent file's)")
    p.add_argument("--backends", default="sim,live")
    p.add_argument("--repeat", type=int, default=1,
                   help="evaluate everything this many times: the leaderboard reports the run-to-run spread of "
                        "each headline ratio and whether the ranking held; given to a finished run's --out, a "
                        "larger --repeat adds the repeats it lacks (training and repeats already run are kept)")
    p.add_argument("--address", default=None, help="an existing Ray cluster (default: a local Ray instance)")
    p.add_argument("--workers", type=int, default=2, help="trials at a time")
    p.add_argument("--agents-dir", default="agents")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.console import Console

    from helios_rl.bench.plan import BenchConfig, quick, suite_scenarios
    from helios_rl.bench.runner import run_benchmark

    if args.train_seeds < 1 or args.test_seeds < 1 or args.repeat < 1 or args.workers < 1:
        raise ValueError("--train-seeds, --test-seeds, --repeat and --workers must be >= 1")
    cfg = BenchConfig(scenarios=suite_scenarios(args.suite), agents=tuple(a for a in args.agents.split(",") if a),
                      baselines=tuple(b for b in args.baselines.split(",") if b), train_seeds=args.train_seeds,
                      test_seeds=args.test_seeds, timesteps=args.timesteps,
                      backends=tuple(b for b in args.backends.split(",") if b), repeat=args.repeat,
                      agents_dir=args.agents_dir)
    if args.quick:
        cfg = quick(cfg)
    missing = [a for a in cfg.agents if not (Path(cfg.agents_dir) / f"{a}.yaml").is_file()]
    if missing:
        raise ValueError(f"no agent file for {missing} in {cfg.agents_dir}/ (an agent is <agents-dir>/<name>.yaml)")
    console = Console()
    board = run_benchmark(cfg, args.out, args.suite, args.address, args.workers, say=console.print)
    console.print((Path(args.out) / "leaderboard.md").read_text())
    for key, row in board["summary"].items():
        console.print(f"{key}: {row}")
    return 0
