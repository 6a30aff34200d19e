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

With ``--log-probes`` each episode also records every probe sample and every charged cost, in order, for
``benchmarks/drift_estimators.py`` to replay under other probe cadences and windows (``--interval``: probe this
often, so sparser cadences can be replayed by dropping samples).

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


def log_probes(drift, log: list) -> None:
    """Record into ``log`` each probe sample (``["d" | "p", seconds]``) and each charge (``["c", cost,
    prefill part]``) in the order they happened, by wrapping this correction's methods (the script's own
    instrument; the library's correction is unchanged)."""
    add, add_prefill, scale = drift.add, drift.add_prefill, drift.scale

    def _add(seconds):
        log.append(["d", seconds])
        return add(seconds)

    def _add_prefill(seconds):
        log.append(["p", seconds])
        return add_prefill(seconds)

    def _scale(cost, prefill=0.0):
        log.append(["c", cost, prefill])
        return scale(cost, prefill)

    drift.add, drift.add_prefill, drift.scale = _add, _add_prefill, _scale


def schedule(engine) -> dict:
    """What the episode's engine ran, apart from how fast: the step count, the prefill passes and their rows,
    the decode tokens, and the mean running batch. Repeats of one seed that differ here did different work
    (the schedule follows the measured clock), not the same work at another speed."""
    steps = list(engine.telemetry.steps)
    pre = [s for s in steps if s.prefill_rows]
    return {"steps": len(steps), "prefill_passes": len(pre), "prefill_rows": sum(s.prefill_rows for s in pre),
            "prefill_tokens": sum(s.prefill_tokens for s in pre),
            "decode_tokens": sum(s.decode_tokens for s in steps),
            "mean_running": float(np.mean([s.running for s in steps])) if steps else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scenario", nargs="?")
    ap.add_argument("--seed-index", type=int, default=0, help="which development evaluation seed")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--methods", default="static,aimd")
    ap.add_argument("--summarise", nargs="+", default=None, help="summarise these outputs instead of running")
    ap.add_argument("--log-probes", action="store_true",
                    help="record every probe sample and every charged cost (estimators replayed offline by "
                         "benchmarks/drift_estimators.py)")
    ap.add_argument("--interval", type=float, default=None,
                    help="seconds between probes (default: the scenario's backend.drift_interval_s)")
    a = ap.parse_args()
    if a.summarise:
        print(json.dumps(summarise(a.summarise), indent=1))
        return
    from helios_rl.agents.compare import run_episode
    from helios_rl.bench.trials import _context, _env, _profile
    from helios_rl.controllers import make_controller
    from helios_rl.env.live import PREFILL_EVERY
    from helios_rl.scenario import load_scenario
    from helios_rl.seeds import dev_eval_seeds, dev_seed

    sc = load_scenario(a.scenario)
    profile = _profile(sc, {"calib_min_tokens": 300})
    env = _env(a.scenario, "live", profile)
    ctx = _context(env, sc)
    backend = env.backend
    if a.interval is not None:
        from dataclasses import replace

        backend.scenario = replace(backend.scenario, backend=replace(backend.scenario.backend,
                                                                     drift_interval_s=a.interval))
    log: list = []
    if a.log_probes:
        log_probes(backend.drift, log)
    seed = dev_seed(dev_eval_seeds(a.seed_index + 1)[a.seed_index], "drift split A/B")
    rows, t0 = [], time.time()
    for rep in range(a.repeats):
        for m in a.methods.split(","):
            ep = run_episode(env, make_controller(m, ctx, sc.params(m)), seed)
            d = ep["drift"]
            rows.append({"rep": rep, "method": m, "seed": seed, "tps": ep["tokens_per_s"],
                         "goodput_tps": ep["goodput_tps"], **{
                k: d[k] for k in ("factor_mean", "prefill_factor_mean", "measured_s", "measured_prefill_s",
                                  "charged_s", "charged_one_factor_s")}, **schedule(env.backend.engine),
                         **({"log": log[:]} if a.log_probes else {})})
            log.clear()
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "log"}), f"t={time.time() - t0:.0f}s",
                  file=sys.stderr, flush=True)
    cal = {k: v for k, v in backend.sim_profile.meta["speed_probe"].items() if k in ("s", "prefill_s")}
    print(json.dumps({"scenario": sc.name, "seed": seed, "calibrated": cal,
                      "interval_s": backend.scenario.backend.drift_interval_s, "prefill_every": PREFILL_EVERY,
                      "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
