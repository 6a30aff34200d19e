"""``helios-rl calibrate SCENARIO [--out PROFILE]``: profile the live engine for the simulator backend."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="profile the live engine over a (model, depth, batch, threshold) grid "
                                         "and write a simulator profile")
    p.add_argument("scenario", help="scenario YAML (see envs/README.md)")
    p.add_argument("--out", default=None, help="profile JSON to write (default: the scenario's cached profile, "
                                                "which the sim environment, train and compare use)")
    p.add_argument("--thresholds", default="0.5,0.7,0.8,0.9,0.95", help="exit thresholds of the grid (comma-separated)")
    p.add_argument("--batches", default="1,4,16", help="batch sizes of the step-time sweep")
    p.add_argument("--depth-buckets", type=int, default=4, help="depths per model: its 1/n, 2/n, ..., full depth")
    p.add_argument("--prompts", type=int, default=4, help="prompts per grid point")
    p.add_argument("--new-tokens", type=int, default=8, help="tokens generated per prompt")
    p.add_argument("--timing", choices=("cpu", "wall", "modeled"), default=None,
                   help="how step costs are measured (default: the scenario's backend.timing)")
    p.set_defaults(func=run)


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated numbers, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    from helios_rl.env.calibrate import calibrate
    from helios_rl.scenario import Scenario

    sc = Scenario.from_yaml(args.scenario)
    if args.timing:
        sc = replace(sc, backend=replace(sc.backend, timing=args.timing))
    thresholds = _floats(args.thresholds, "--thresholds")
    if any(not 0 <= t <= 1 for t in thresholds):
        raise ValueError(f"--thresholds must be in [0, 1], got {args.thresholds}")
    batches = tuple(int(b) for b in _floats(args.batches, "--batches"))
    if any(b < 1 for b in batches) or args.prompts < 1 or args.new_tokens < 2 or args.depth_buckets < 1:
        raise ValueError("--batches and --prompts must be >= 1, --new-tokens >= 2, --depth-buckets >= 1")
    prof = calibrate(sc, thresholds=thresholds, depth_buckets=args.depth_buckets, batches=batches,
                     prompts=args.prompts, new_tokens=args.new_tokens,
                     say=lambda s: print(s, file=sys.stderr))
    if args.out is None:
        from helios_rl.env.profile import default_profile_path

        args.out = str(default_profile_path(sc))
    prof.save(args.out)
    for name, m in prof.models.items():
        coef = ", ".join(f"{k}={v:.3g}" for k, v in m.step_coef.items() if v)
        print(f"{name}: {m.num_layers} layers, step time {coef} (residual {m.residual_sigma:.1%}), "
              f"{len(m.exits)} exit points")
    print(f"wrote {args.out} ({prof.meta['calibration_s']} s)")
    return 0
