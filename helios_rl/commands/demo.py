"""``helios-rl demo``: the whole story on the embedded default, on the bundled offline models.

1. prepare the bundled SmolLM2-135M and Gemma3-270M (converted once, cached);
2. calibrate the simulator on the live engine (once per scenario and engine version, cached);
3. train a short PPO in the simulator (``helios_rl/agents/presets/ppo.yaml``);
4. compare it with the static, HELIOS and AIMD baselines on the live engine, on held-out test seeds;
5. print the table, the share of tokens that left before the last layer, and the scenario's leaderboard
   row (best agent against best baseline, IQM ratio with a paired CI); results.json, results.md and
   plots land in the run folder.

The scenario is ``helios_rl/scenarios/default.yaml`` (a load and task-mix shift under a 1 GiB budget).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

PRESET = Path(__file__).resolve().parent.parent / "agents" / "presets" / "ppo.yaml"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the embedded default end to end: models, calibration, PPO in sim, "
                                    "live comparison with static and HELIOS")
    p.add_argument("--env", default="default", help="scenario YAML (default: the embedded default)")
    p.add_argument("--agent", default=str(PRESET), help="agent hyperparameters (default: the demo's PPO preset)")
    p.add_argument("--timesteps", type=int, default=None, help="PPO timesteps (default: the agent file's)")
    p.add_argument("--seeds", type=int, default=2, help="held-out seeds of the live comparison")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--out", default="runs", help="parent folder of the run folders")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    import numpy as np

    from helios_rl.agents.compare import compare, markdown
    from helios_rl.bench.leaderboard import LEADERBOARD_HEADER, leaderboard_row
    from helios_rl.agents.train import train
    from helios_rl.controllers.repository import checkpoint_facts
    from helios_rl.env.profile import ensure_profile
    from helios_rl.scenario import load_scenario

    console = Console(stderr=True)
    say = lambda s: console.print(f"[dim]{s}[/]")  # noqa: E731
    t0 = time.perf_counter()
    stamps = {}
    sc = load_scenario(args.env)
    console.rule(f"1/4 models: {', '.join(sc.models)}")
    for m in sc.models:
        f = checkpoint_facts(m, 4)
        say(f"{m}: {f.num_layers} layers, {(f.non_layer_bytes + sum(f.layer_bytes)) / 2**20:.0f} MiB of fp32 weights")
    stamps["models"] = time.perf_counter() - t0
    console.rule("2/4 simulator calibration (cached after the first run)")
    profile = ensure_profile(sc, say=say)
    say(f"profile: {profile}")
    stamps["calibrate"] = time.perf_counter() - t0
    console.rule("3/4 PPO in the simulator")
    m = train(args.env, args.agent, seed=args.seed, backend="sim", timesteps=args.timesteps, out=args.out,
              profile=str(profile), say=say)
    say(f"trained {m['timesteps']} steps in {m['train_wall_s']} s; run folder {m['run_dir']}")
    stamps["train"] = time.perf_counter() - t0
    console.rule(f"4/4 live comparison: PPO vs static vs HELIOS, {args.seeds} held-out seeds")
    out = Path(args.out) / f"{sc.name}__compare__{int(time.time())}"
    res = compare(args.env, [m["run_dir"]], ["static", "helios", "aimd"], seeds=args.seeds, backend="live", out=out,
                  profile=str(profile), say=say)
    stamps["compare"] = time.perf_counter() - t0
    print(markdown(res))
    share = {mth: round(float(np.mean([e["early_exit_share"] for e in eps])), 3) for mth, eps in res["episodes"].items()}
    print(f"tokens leaving before the last layer (live): {share}")
    print("\nLeaderboard row (the default scenario, live, held-out seeds; `helios-rl benchmark envs/suite` for the "
          "suite):\n" + LEADERBOARD_HEADER + "\n" + leaderboard_row(res))
    print(f"plots: {', '.join(str(out / p) for p in res['plots'])}")
    print(f"deploy the policy: helios-rl serve {sc.path} --controller policy:{m['run_dir']}")
    print("elapsed: " + ", ".join(f"{k} done at {v:.0f} s" for k, v in stamps.items()), file=sys.stderr)
    return 0
