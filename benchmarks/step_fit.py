"""Does the simulator's step-time model price what the live engine serves? One config, one development seed.

Serves a fixed config (``--model --depth --batch --setting``) for a whole episode of the scenario on the live
backend, then replays it on the simulator without noise (``helios_rl.env.fidelity.replay_configs``), and prices
every live step with the profile's fitted step-time model at that step's own rows, exits, context and prefill
(``helios_rl.env.profile.step_features``). Reports live against simulated throughput and TPOT, and the ratio of
what each live step was charged (measured time, drift-corrected where the scenario says so) to the fit's price:
decode-only steps by batch, steps carrying a prefill, and those carrying a prefill beside decoding rows.

    python benchmarks/step_fit.py envs/suite/steady.yaml --profile P --seed 500000 \\
        --model smollm2-135m --depth 30 --batch 26 --setting 0.99

Output: JSON on stdout. Development seeds only (a test seed is refused, helios_rl.seeds).
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scenario")
    ap.add_argument("--profile", default=None, help="calibrated profile (default: the scenario's cached one)")
    ap.add_argument("--seed", type=int, default=500_000, help="development workload seed")
    ap.add_argument("--model", required=True)
    ap.add_argument("--depth", type=int, required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--setting", default=None, help="precision target (target mode) or threshold")
    args = ap.parse_args()

    import numpy as np

    from helios_rl.engine.config import ServingConfig
    from helios_rl.env.fidelity import replay_configs
    from helios_rl.env.live import LiveBackend
    from helios_rl.env.profile import SimProfile, default_profile_path, record_features, resolve_scenario, step_cost
    from helios_rl.env.sim import SimBackend
    from helios_rl.env.workload import EpisodeWorkload
    from helios_rl.evaluation.harness import machine_info
    from helios_rl.evaluation.runtime import set_threads
    from helios_rl.scenario import load_scenario
    from helios_rl.seeds import dev_seed
    from helios_rl.utils.provenance import git_revision

    seed = dev_seed(args.seed, "step_fit")
    sc0 = load_scenario(args.scenario)
    path = args.profile or str(default_profile_path(sc0))
    prof = SimProfile.load(path)
    prof.check(sc0, path)
    sc, reference = resolve_scenario(sc0, prof)
    knob = {}
    if args.setting is not None:
        knob = {"target": float(args.setting)} if sc.exits.mode == "target" else {"threshold": float(args.setting)}
    cfg = ServingConfig(model=args.model, depth=args.depth, max_batch=args.batch, **knob)
    ms = prof.models[args.model]
    layers = ms.layers_for(float(args.setting) if args.setting is not None else None)
    work = EpisodeWorkload(sc)
    set_threads(sc.engine.threads)
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    live = LiveBackend(sc, work, profile=path)
    steps = []
    measure = live.timer.step_cost

    def record(t0, rec):  # the live backend's own step costing, with what the fit needs to price the step
        cost = measure(t0, rec)
        rows = list(live.engine.running)
        feats = record_features(rec, layers, float(np.mean([r.seq_len for r in rows])) if rows else 0.0)
        steps.append({"charged": live._cost(cost), "decode_rows": int(rec.exit_counts.sum()) - rec.prefill_done,
                      "prefill": rec.prefill_tokens, "price": step_cost(ms.step_coef, feats)})
        return cost

    live.timer.step_cost = record
    seq = [cfg]
    live.reset(seed, cfg)
    while not live.finished:
        live.advance(sc.backend.interval_s)
        seq.append(None)
    live_summary, live_tpot = live.summary(), list(live.tpots)
    live.close()
    sim = SimBackend(prof, sc, work, noise=False)
    sim_summary = replay_configs(sim, seq, sc.backend.interval_s, seed)
    sim_tpot = list(sim.tpots)

    def q(a, p):
        return round(float(np.percentile(a, p)), 4) if len(a) else None

    def group(sel) -> dict | None:
        g = [s for s in steps if sel(s)]
        if not g:
            return None
        ch, pr = np.array([s["charged"] for s in g]), np.array([s["price"] for s in g])
        return {"steps": len(g), "charged_mean_s": round(float(ch.mean()), 4), "fit_mean_s": round(float(pr.mean()), 4),
                "ratio_median": round(float(np.median(ch / pr)), 3), "ratio_total": round(float(ch.sum() / pr.sum()), 3)}

    decode_only = [s for s in steps if s["prefill"] == 0]
    bins = sorted({(s["decode_rows"] - 1) // 4 * 4 + 1 for s in decode_only if s["decode_rows"]})
    out = {"scenario": sc.name, "profile": path, "seed": seed, "config": {"model": cfg.model, "depth": cfg.depth,
           "max_batch": cfg.max_batch, "setting": args.setting},
           "slo_tpot_s": round(sc.slo.tpot_s, 4), "slo_reference": reference,
           "live": {"tokens_per_s": round(live_summary["tokens_per_s"], 3), "tpot_p50_s": q(live_tpot, 50),
                    "tpot_p95_s": q(live_tpot, 95), "drift": live_summary.get("drift")},
           "sim": {"tokens_per_s": round(sim_summary["tokens_per_s"], 3), "tpot_p50_s": q(sim_tpot, 50),
                   "tpot_p95_s": q(sim_tpot, 95)},
           "charged_over_fit": {
               "all": group(lambda s: True),
               "decode_only": group(lambda s: s["prefill"] == 0),
               "with_prefill": group(lambda s: s["prefill"] > 0),
               "prefill_beside_decode": group(lambda s: s["prefill"] > 0 and s["decode_rows"] > 0),
               "decode_by_batch": {f"{b}-{b + 3}": group(lambda s, b=b: s["prefill"] == 0 and b <= s["decode_rows"] <= b + 3)
                                   for b in bins}},
           "step_fit_residual": ms.residual_sigma, "machine": machine_info(), "git": git_revision(),
           "started": started, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
