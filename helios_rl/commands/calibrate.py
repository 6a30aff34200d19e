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
    p.add_argument("--thresholds", default=None,
                   help="exit settings of the grid (comma-separated; default: the scenario's own: its precision "
                        "targets in target mode, else raw thresholds)")
    p.add_argument("--batches", default=None, help="batch sizes of the step-time sweep (default: 1,4,16)")
    p.add_argument("--depth-buckets", type=int, default=None,
                   help="depths per model: its 1/n, 2/n, ..., full depth (default: 4)")
    p.add_argument("--prompts", type=int, default=None, help="prompts per timing point (default: 4)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated per prompt (default: 24)")
    p.add_argument("--min-tokens", type=int, default=None,
                   help="served tokens behind each accuracy point, stratified by task (default: 1000)")
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
    kw: dict = {}  # only what the user set: the defaults are calibrate()'s, the same as train's and compare's
    if args.thresholds is not None:
        kw["thresholds"] = _floats(args.thresholds, "--thresholds")
        if any(not 0 <= t <= 1 for t in kw["thresholds"]):
            raise ValueError(f"--thresholds must be in [0, 1], got {args.thresholds}")
    if args.batches is not None:
        kw["batches"] = tuple(int(b) for b in _floats(args.batches, "--batches"))
        if not kw["batches"] or any(b < 1 for b in kw["batches"]):
            raise ValueError(f"--batches must be >= 1, got {args.batches}")
    for key, low in (("depth_buckets", 1), ("prompts", 1), ("new_tokens", 2), ("min_tokens", 1)):
        v = getattr(args, key)
        if v is not None:
            if v < low:
                raise ValueError(f"--{key.replace('_', '-')} must be >= {low}, got {v}")
            kw[key] = v
    prof = calibrate(sc, say=lambda s: print(s, file=sys.stderr), **kw)
    if args.out is None:  # the cache path train/compare look up for these settings
        from helios_rl.env.profile import default_profile_path

        args.out = str(default_profile_path(sc, kw))
    prof.save(args.out)
    want, got = prof.meta["min_tokens_per_point"], prof.meta["calibration_tokens_min"]
    if got < want:  # a thinner sample than asked for is said, never passed off as the asked-for one
        print(f"warning: the smallest accuracy point rests on {got} served tokens, below --min-tokens {want}: the "
              f"scenario's workload has too few distinct prompts or too little room in max_model_len "
              f"(engine.max_model_len {sc.engine.max_model_len}) for longer continuations", file=sys.stderr)
    for name, m in prof.models.items():
        coef = ", ".join(f"{k}={v:.3g}" for k, v in m.step_coef.items() if v)
        print(f"{name}: {m.num_layers} layers, step time {coef} (residual {m.residual_sigma:.1%}), "
              f"{len(m.exits)} exit points")
    print(f"wrote {args.out} ({prof.meta['calibration_s']} s)")
    return 0
