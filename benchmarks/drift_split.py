"""Does pricing prefill passes by their own probe steady live costs? An A/B on development seeds only.

Each live episode is charged by the split correction (``backend.drift: probe``: a step's prefill pass by the
prefill probe, the rest by the decode probe) and records what the decode factor alone would have charged
(``charged_one_factor_s``), so both corrections are compared on the same episodes, under the same drift. Per
method and development seed, over ``--repeats`` repeats: the relative range ((max - min) / mean) of the measured
serving seconds, of the decode-only charge and of the split charge, and for the fixed-configuration methods the
log-log slope of measured seconds against the decode factor (1: the serving work slows as the probe does).
Run two of these at once, one per seed, to load both cores as a benchmark's two workers do:

    OMP_NUM_THREADS=1 python benchmarks/drift_split.py envs/suite/steady.yaml --seed-index 0 --repeats 5 > a.json &
    OMP_NUM_THREADS=1 python benchmarks/drift_split.py envs/suite/steady.yaml --seed-index 1 --repeats 5 > b.json
    python benchmarks/drift_split.py --summarise a.json b.json

Output: JSON on stdout (episodes; with --summarise, the spreads).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def rel_range(v) -> float:
    v = np.asarray(v, dtype=float)
    return float(np.ptp(v) / v.mean())


def summarise(files: list[str]) -> dict:
    rows = [r for f in files for r in json.load(open(f))["rows"]]
    out: dict = {"per": {}, "median": {}}
    keys = ("measured_s", "charged_one_factor_s", "charged_s")
    for m in sorted({r["method"] for r in rows}):
        for s in sorted({r["seed"] for r in rows if r["method"] == m}):
            rs = [r for r in rows if r["method"] == m and r["seed"] == s]
            if len(rs) < 2:
                continue
            x = np.log([1 / r["factor_mean"] for r in rs])
            y = np.log([r["measured_s"] for r in rs])
            xc, yc = x - x.mean(), y - y.mean()
            out["per"][f"{m}/{s}"] = {**{k: round(rel_range([r[k] for r in rs]), 4) for k in keys},
                                      "slope": round(float(xc @ yc / (xc @ xc)), 3) if xc @ xc > 0 else None,
                                      "factors": [r["factor_mean"] for r in rs],
                                      "prefill_factors": [r["prefill_factor_mean"] for r in rs]}
    for k in keys:
        out["median"][k] = round(float(np.median([v[k] for v in out["per"].values()])), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scenario", nargs="?")
    ap.add_argument("--seed-index", type=int, default=0, help="which development evaluation seed")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--methods", default="static,aimd")
    ap.add_argument("--summarise", nargs="+", default=None, help="summarise these outputs instead of running")
    a = ap.parse_args()
    if a.summarise:
        print(json.dumps(summarise(a.summarise), indent=1))
        return
    from helios_rl.agents.compare import run_episode
    from helios_rl.bench.trials import _context, _env, _profile
    from helios_rl.controllers import make_controller
    from helios_rl.scenario import load_scenario
    from helios_rl.seeds import dev_eval_seeds, dev_seed

    sc = load_scenario(a.scenario)
    profile = _profile(sc, {"calib_min_tokens": 300})
    env = _env(a.scenario, "live", profile)
    ctx = _context(env, sc)
    seed = dev_seed(dev_eval_seeds(a.seed_index + 1)[a.seed_index], "drift split A/B")
    rows, t0 = [], time.time()
    for rep in range(a.repeats):
        for m in a.methods.split(","):
            ep = run_episode(env, make_controller(m, ctx, sc.params(m)), seed)
            d = ep["drift"]
            rows.append({"rep": rep, "method": m, "seed": seed, "tps": ep["tokens_per_s"], **{
                k: d[k] for k in ("factor_mean", "prefill_factor_mean", "measured_s", "measured_prefill_s",
                                  "charged_s", "charged_one_factor_s")}})
            print(json.dumps(rows[-1]), f"t={time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    print(json.dumps({"scenario": sc.name, "seed": seed, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
