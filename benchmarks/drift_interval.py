"""Does probing the machine's speed more often steady live throughput? An A/B of ``backend.drift_interval_s`` on
development seeds only (never test seeds).

Per repeat, per interval (each with its own DriftCorrection state, so neither inherits the other's samples), per
method, per development seed: one live episode of the scenario, interleaved. Prints JSON: every episode, and per
interval the relative range over repeats ((max - min) / mean) of throughput as charged and of measured serving time,
per (method, seed), with median and mean.

    OMP_NUM_THREADS=1 python benchmarks/drift_interval.py envs/suite/steady.yaml --repeats 3 --intervals 5,2 \
        --methods static,helios > drift_ab.json
"""
import argparse
import dataclasses
import json
import sys
import time

import numpy as np
from helios_rl.agents.compare import run_episode
from helios_rl.bench.trials import _context, _env, _profile
from helios_rl.controllers import make_controller
from helios_rl.evaluation.drift import DriftCorrection
from helios_rl.scenario import load_scenario
from helios_rl.seeds import dev_eval_seeds, dev_seed

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("scenario")
ap.add_argument("--repeats", type=int, default=3)
ap.add_argument("--intervals", default="5,2", help="drift_interval_s values (wall seconds between probes)")
ap.add_argument("--methods", default="static,helios")
a = ap.parse_args()
path, repeats = a.scenario, a.repeats
intervals = [float(x) for x in a.intervals.split(",")]
methods = a.methods.split(",")
sc = load_scenario(path)
profile = _profile(sc, {"calib_min_tokens": 300})
env = _env(path, "live", profile)
ctx = _context(env, sc)
seeds = [dev_seed(s, "drift interval A/B") for s in dev_eval_seeds(2)]
be = env.backend
base_sc = be.scenario
cal = be.drift.calibrated_s
states = {iv: DriftCorrection(cal) for iv in intervals}
rows = []
t0 = time.time()
for rep in range(repeats):
    for iv in intervals:
        be.scenario = dataclasses.replace(base_sc, backend=dataclasses.replace(base_sc.backend, drift_interval_s=iv))
        be.drift = states[iv]
        for m in methods:
            for s in seeds:
                ep = run_episode(env, make_controller(m, ctx, sc.params(m)), s)
                d = ep.get("drift") or {}
                rows.append({"rep": rep, "interval": iv, "method": m, "seed": s, "tps": ep["tokens_per_s"],
                             "goodput": ep["goodput_tps"], "factor_mean": d.get("factor_mean"), "probes": d.get("probes"),
                             "measured_s": d.get("measured_s"), "charged_s": d.get("charged_s")})
                print(json.dumps(rows[-1]), f"t={time.time()-t0:.0f}s", file=sys.stderr, flush=True)
out = {"scenario": sc.name, "seeds": seeds, "rows": rows, "summary": {}}
for iv in intervals:
    spreads = {}
    for m in methods:
        for s in seeds:
            for key in ("tps", "measured_s"):
                v = np.array([r[key] for r in rows if r["interval"] == iv and r["method"] == m and r["seed"] == s])
                spreads.setdefault(key, []).append(float(np.ptp(v) / v.mean()))
    out["summary"][str(iv)] = {k: {"median": float(np.median(v)), "mean": float(np.mean(v)), "each": v} for k, v in spreads.items()}
print(json.dumps(out, indent=1))
