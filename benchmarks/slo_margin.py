"""Where a suite's relative SLOs cut the baselines' measured latency distributions (development seeds).

A goodput score counts a request only if its TTFT and TPOT meet the SLO, so a target that sits inside the
mass of the per-request TPOTs turns a 1 % change in step time into a large change of goodput: a leaderboard
on such a scenario cannot repeat. This runs the scenario's baseline controllers on the **live** engine on
development seeds only (never test seeds), and prints, per scenario, every request's TPOT and TTFT in units
of the scenario's reference step (the full-depth decode step at the batch its SLO names, from the calibrated
profile) and, for a grid of candidate multiples, the share of requests meeting each and the share lying
within +-5 % of it (the *edge share*: the requests a 5 % timing wobble moves across the target).

    python benchmarks/slo_margin.py envs/suite --seeds 2 --out runs/slo_margin.json

Output: JSON on stdout (and ``--out``); a rich table per scenario on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

TPOT_GRID = (1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)
TTFT_GRID = (20.0, 40.0, 60.0, 120.0, 200.0, 300.0, 400.0, 600.0)


def shares(values: np.ndarray, grid, band: float = 0.05) -> list[dict]:
    out = []
    for m in grid:
        met = float(np.mean(values <= m)) if len(values) else None
        edge = float(np.mean(np.abs(values - m) <= band * m)) if len(values) else None
        out.append({"multiple": m, "met": met, "edge": edge})
    return out


def probe(path: str, methods: list[str], seeds: list[int], min_tokens: int, say) -> dict:
    from helios_rl.agents.compare import run_episode
    from helios_rl.bench.trials import _context, _env, _profile
    from helios_rl.controllers import make_controller
    from helios_rl.scenario import load_scenario, step_reference_model

    sc = load_scenario(path)
    rel = {name: (mult, batch) for name, mult, batch in sc.slo.relative}
    if "tpot_s" not in rel or "ttft_s" not in rel:
        raise ValueError(f"{path}: both SLOs must be relative (x_step) for a margin probe")
    profile = _profile(sc, {"calib_min_tokens": min_tokens})
    env = _env(path, "live", profile)
    ctx = _context(env, sc)
    slo = env.scenario.slo  # resolved on this machine
    ref = {"tpot_s": slo.tpot_s / rel["tpot_s"][0], "ttft_s": slo.ttft_s / rel["ttft_s"][0]}
    per_method, tp_all, tt_all = {}, [], []
    for name in methods:
        tps, tts, eps = [], [], []
        for s in seeds:
            t0 = time.perf_counter()
            ep = run_episode(env, make_controller(name, ctx, sc.params(name)), s)
            tps += [t / ref["tpot_s"] for t in env.backend.tpots]
            tts += [t / ref["ttft_s"] for t in env.backend.ttfts]
            eps.append({"seed": s, "goodput_tps": ep["goodput_tps"], "tokens_per_s": ep["tokens_per_s"],
                        "served": ep["served"], "agreement": ep["agreement"], "wall_s": time.perf_counter() - t0})
            say(f"{sc.name} {name} seed {s}: {ep['tokens_per_s']:.2f} tok/s, goodput {ep['goodput_tps']:.2f}")
        tp, tt = np.asarray(tps), np.asarray(tts)
        if not len(tp) or not len(tt):
            raise RuntimeError(f"{sc.name}: {name} finished no request with a TPOT on seeds {seeds}: nothing to place "
                               f"an SLO against")
        tp_all.append(tp)
        tt_all.append(tt)
        q = (50, 90, 95, 99, 100)
        per_method[name] = {"episodes": eps, "requests": int(len(tp)),
                            "tpot_x_step": dict(zip([f"p{k}" for k in q], np.percentile(tp, q).round(3).tolist())),
                            "ttft_x_step": dict(zip([f"p{k}" for k in q], np.percentile(tt, q).round(2).tolist()))}
    tp, tt = np.concatenate(tp_all), np.concatenate(tt_all)
    return {"scenario": sc.name, "path": path, "reference_step_s": ref,
            "reference": {k: {"model": step_reference_model(sc), "batch": v[1], "multiple_now": v[0]} for k, v in rel.items()},
            "methods": per_method, "tpot_grid": shares(tp, TPOT_GRID), "ttft_grid": shares(tt, TTFT_GRID)}


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    from helios_rl.bench.plan import suite_scenarios
    from helios_rl.seeds import dev_eval_seeds, dev_seed

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("suite", help="a suite folder or one scenario file")
    ap.add_argument("--methods", default="static,helios,aimd", help="baseline controllers (comma-separated)")
    ap.add_argument("--seeds", type=int, default=2, help="development evaluation seeds per method")
    ap.add_argument("--min-tokens", type=int, default=300, help="calibration tokens per point (the quick benchmark's)")
    ap.add_argument("--only", default=None, help="comma-separated scenario stems to probe")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    err = Console(stderr=True)
    files = suite_scenarios(a.suite)
    if a.only:
        keep = set(a.only.split(","))
        files = [f for f in files if Path(f).stem in keep]
    seeds = [dev_seed(s, "SLO margin probe") for s in dev_eval_seeds(a.seeds)]
    from helios_rl.evaluation.harness import machine_info
    from helios_rl.utils.provenance import git_revision

    res = {"command": " ".join(["python benchmarks/slo_margin.py", *(argv or sys.argv[1:])]), "git": git_revision(),
           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine_info(), "dev_seeds": seeds,
           "timing": "measured (the live engine, the scenario's backend timing)", "scenarios": {}}
    for f in files:
        r = probe(f, a.methods.split(","), seeds, a.min_tokens, lambda m: err.print(m))
        res["scenarios"][Path(f).stem] = r
        t = Table(title=f"{r['scenario']}: per-request latency in reference steps (dev seeds {seeds})")
        for c in ("method", "requests", "TPOT p50", "p95", "p99", "max", "TTFT p95", "max"):
            t.add_column(c)
        for m, v in r["methods"].items():
            t.add_row(m, str(v["requests"]), *(f"{v['tpot_x_step'][k]:.2f}" for k in ("p50", "p95", "p99", "p100")),
                      *(f"{v['ttft_x_step'][k]:.1f}" for k in ("p95", "p100")))
        err.print(t)
        g = Table(title="TPOT multiple: share met, share within +-5 % (edge)")
        for c in ("multiple", "met", "edge"):
            g.add_column(c)
        for row in r["tpot_grid"]:
            g.add_row(f"{row['multiple']:g}", f"{row['met']:.3f}", f"{row['edge']:.3f}")
        err.print(g)
        if a.out:  # after every scenario: a failure later loses nothing measured so far
            from helios_rl.utils.io import atomic_write_text

            atomic_write_text(Path(a.out), json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
