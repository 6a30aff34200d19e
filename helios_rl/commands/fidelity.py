"""``helios-rl fidelity SCENARIO --profile PROFILE``: the simulator against the live engine on one trace."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fidelity", help="run controllers on the live engine, replay their configs on the simulator, "
                                        "report relative errors of throughput, TTFT p95 and TPOT p95")
    p.add_argument("scenario", help="scenario YAML (see envs/README.md)")
    p.add_argument("--profile", required=True, help="simulator profile from `helios-rl calibrate`")
    p.add_argument("--controllers", default="static,helios,random", help="comma-separated controllers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the full report as JSON here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from helios_rl.controllers import CONTROLLERS
    from helios_rl.env.fidelity import fidelity
    from helios_rl.scenario import Scenario
    from helios_rl.utils.io import atomic_write_json

    names = tuple(c.strip() for c in args.controllers.split(",") if c.strip())
    for c in names:
        if c not in CONTROLLERS:
            raise ValueError(f"--controllers: unknown controller {c!r}; known: {sorted(CONTROLLERS)}")
    sc = Scenario.from_yaml(args.scenario)
    rep = fidelity(sc, args.profile, names, seed=args.seed, say=lambda s: print(s, file=sys.stderr))
    print(f"{'controller':<10} {'metric':<10} {'live':>10} {'sim':>10} {'rel err':>8}")
    for name, c in rep["controllers"].items():
        for k, key in (("throughput", "tokens_per_s"), ("ttft_p95", "ttft_p95"), ("tpot_p95", "tpot_p95")):
            print(f"{name:<10} {k:<10} {c['live'][key]:>10.4g} {c['sim'][key]:>10.4g} {c['rel_err'][k]:>8.1%}")
    print("mean relative error: " + ", ".join(f"{k} {v:.1%}" for k, v in rep["mean_rel_err"].items()))
    if args.out:
        atomic_write_json(args.out, json.loads(json.dumps(rep, default=float)))
    return 0
