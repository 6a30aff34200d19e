"""``helios-rl compare --env SCENARIO --policies runs/A,runs/B --baselines static,helios --seeds 5``.

Several run folders (one agent, several training seeds) pool as the method ``rl``: one row per run, so its
IQM and stratified-bootstrap CI are over runs x held-out seeds (rliable's protocol).
"""

from __future__ import annotations

import argparse
import time


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="evaluate trained policies against baselines on held-out seeds "
                                       "(IQM, bootstrap CIs, probability of improvement)")
    p.add_argument("--env", default="default", help="scenario YAML (default: the embedded default)")
    p.add_argument("--policies", default="", help="comma-separated run folders of `helios-rl train`")
    p.add_argument("--baselines", default="static,helios", help="comma-separated: static, helios, aimd, random")
    p.add_argument("--seeds", type=int, default=5, help="held-out workload seeds")
    p.add_argument("--backend", choices=("live", "sim"), default="live")
    p.add_argument("--trace", default=None, help="replay arrivals from an Azure-format trace CSV")
    p.add_argument("--trace-start", type=float, default=None, help="start (s) of the held-out trace segment")
    p.add_argument("--profile", default="auto", help="simulator profile (sim backend; predicted agreement)")
    p.add_argument("--reps", type=int, default=2000, help="bootstrap resamples")
    p.add_argument("--out", default=None, help="output folder (default: runs/<scenario>__compare__<time>)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from helios_rl.agents.compare import compare, markdown
    from helios_rl.scenario import load_scenario

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    for p in policies:
        if not Path(p).is_dir():
            raise FileNotFoundError(f"--policies: {p}: no such run folder")
    baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    out = args.out or str(Path("runs") / f"{load_scenario(args.env).name}__compare__{int(time.time())}")
    res = compare(args.env, policies, baselines, seeds=args.seeds, backend=args.backend, trace=args.trace,
                  trace_start_s=args.trace_start, out=out, profile=args.profile, reps=args.reps)
    print(markdown(res))
    print(f"wrote {out}/results.json, results.md, " + ", ".join(res["plots"]))
    return 0
