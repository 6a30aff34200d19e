"""Has this machine's speed moved since a scenario was calibrated, and by the same factor at every batch?

Times the scenario's speed probe (``helios_rl.evaluation.probe``: the SLO reference model's full-depth decode
step at batch 8) against the probe its profile recorded, and real full-depth decode steps (exits off, after an
untimed prefill) at several batches against the profile's fitted step time at that batch and context. Where the machine
slows or speeds up uniformly, every ratio equals the probe's factor; where it does not, one probe mis-states
the change at some batches (``backend.drift: probe`` corrects by the one factor). The profile's step time is a
fit and the probe a measurement, so ratios at batch 8 and the probe factor also differ by the fit's error.

    python benchmarks/drift_check.py envs/suite/steady.yaml [--profile PATH] [--rounds 3] [--batches 1 8 16 32]

Output: JSON on stdout, one row per round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scenario")
    ap.add_argument("--profile", default=None, help="calibrated profile (default: the scenario's cached one)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16, 32])
    ap.add_argument("--steps", type=int, default=5, help="timed decode steps per batch and round (median)")
    args = ap.parse_args()

    from helios_rl.engine.config import ServingConfig
    from helios_rl.engine.engine import Engine
    from helios_rl.engine.request import SamplingParams
    from helios_rl.env.profile import SimProfile, default_profile_path
    from helios_rl.evaluation.probe import PROBE_TEXT, SpeedProbe
    from helios_rl.evaluation.runtime import Timer, VirtualClock, set_threads
    from helios_rl.scenario import load_scenario

    sc = load_scenario(args.scenario)
    set_threads(sc.engine.threads)
    path = args.profile or str(default_profile_path(sc))
    prof = SimProfile.load(path)
    prof.check(sc, path)
    cal = (prof.meta.get("speed_probe") or {}).get("s")
    if not cal:
        raise SystemExit(f"{path}: no speed probe recorded (calibrated before backend.drift existed): re-calibrate")
    timer = Timer(prof.timing)
    probe = SpeedProbe(sc, timer)
    settings = replace(sc.engine.settings(sc.exits.measure, sc.exits.default_threshold), memory_budget_bytes=None,
                       max_batch=max(args.batches))
    eng = Engine(probe.model, settings, loader=None, clock=VirtualClock(0.0))
    eng.apply(ServingConfig(max_batch=max(args.batches), threshold=1.0, exit_layers=()))
    fit = prof.models[probe.model_name]
    rows = []
    for r in range(args.rounds):
        p = probe.measure(args.steps)
        row = {"round": r, "time": time.strftime("%H:%M:%S"), "probe_s": round(p, 5), "probe_factor": round(cal / p, 3),
               "batches": {}}
        for b in args.batches:
            ids = [eng.add_request(PROBE_TEXT, SamplingParams(max_new_tokens=args.steps + 1, ignore_eos=True))
                   for _ in range(b)]
            eng.step()  # prefill: not timed
            ts, ctx = [], []
            while eng.has_unfinished():
                ctx.append(statistics.fmean(r.seq_len for r in eng.running))
                t0 = timer.start()
                eng.step()
                ts.append(timer.elapsed(t0))
            for i in ids:
                eng.release(i)
            now, pred = statistics.median(ts), fit.step_time(b, ctx_tokens=statistics.fmean(ctx))
            row["batches"][str(b)] = {"now_s": round(now, 5), "profile_s": round(pred, 5),
                                      "profile_over_now": round(pred / now, 3), "context": round(statistics.fmean(ctx), 1)}
        rows.append(row)
    probe.close()
    print(json.dumps({"scenario": sc.name, "profile": path, "model": probe.model_name, "calibrated_probe_s": cal,
                      "profile_created": prof.meta.get("created"), "rounds": rows}, indent=1))


if __name__ == "__main__":
    main()
