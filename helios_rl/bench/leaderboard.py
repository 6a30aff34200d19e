"""From finished evaluation shards to the leaderboard: statistics per scenario and backend, tables, plots.

The score is goodput over the workload's SLO window: output tokens of requests that met the SLO and the quality
floors, per second of the window in which any of the seed's requests could still meet the SLO (latest arrival +
TTFT target + (max new tokens - 1) x TPOT target; fixed by the workload and the SLO, the same for every method).
It is proportional to the good tokens served. Goodput over the episode's own length is printed beside it, and is
not the score: on a closed workload a method raises it by finishing the requests that miss their targets fast and
badly. Per scenario, backend and repeat, each method's scores form a ``(runs, test seeds)`` matrix
(a trained agent has one run per training seed; a baseline one); see :mod:`helios_rl.agents.stats`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from helios_rl.agents.stats import iqm, method_stats, performance_profile, prob_improvement
from helios_rl.utils.provenance import short_revision

METRIC = "goodput_tps"


def score_matrices(shards: list[dict], methods: dict[str, int]) -> dict[str, np.ndarray]:
    """``{method: (runs, seeds)}`` from the shards of one scenario, backend and repeat (seeds sorted)."""
    seeds = sorted(s["seed"] for s in shards)
    by_seed = {s["seed"]: s["episodes"] for s in shards}
    out = {}
    for method, runs in methods.items():
        out[method] = np.array([[by_seed[sd][f"{method}#{r}"][METRIC] for sd in seeds] for r in range(runs)])
    return out


# what the score leaves out, per method (median over its episodes): the share of the tokens served that were served
# well, goodput over the episode's own length, and throughput; with their formats
EPISODE_MEDIANS = {"good_token_share": "{:.3f}", "goodput_elapsed_tps": "{:.2f}", "tokens_per_s": "{:.2f}"}


def episode_medians(shards: list[dict], methods: dict[str, int]) -> dict[str, dict[str, float | None]]:
    """``{method: {field: median over its episodes}}`` for :data:`EPISODE_MEDIANS` (None where no episode has it)."""
    out = {}
    for method, runs in methods.items():
        eps = [s["episodes"][f"{method}#{r}"] for s in shards for r in range(runs)]
        vals = {k: [e[k] for e in eps if e.get(k) is not None] for k in EPISODE_MEDIANS}
        out[method] = {k: float(np.median(v)) if v else None for k, v in vals.items()}
    return out


def _fmt(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def same_behaviour(shards: list[dict], methods: dict[str, int]) -> list[list[str]]:
    """Groups (of two or more) of methods that served every episode of these shards identically: the same
    sequence of configs in force (``behaviour`` digest) on every run and test seed. HELIOS, for example,
    keeps the static config on models whose exits it cannot use. Their score differences are timing noise."""
    seeds = sorted(s["seed"] for s in shards)
    by_seed = {s["seed"]: s["episodes"] for s in shards}
    sig = {}
    for method, runs in methods.items():
        digests = tuple(by_seed[sd][f"{method}#{r}"].get("behaviour") for r in range(runs) for sd in seeds)
        if all(d is not None for d in digests):
            sig.setdefault(digests, []).append(method)
    return [sorted(g) for g in sig.values() if len(g) > 1]


def scenario_stats(scores: dict[str, np.ndarray], agents: list[str], baselines: list[str], reps: int = 2000,
                   seed: int = 0, groups: list[list[str]] | None = None) -> dict:
    """IQMs with CIs, the best agent against the best baseline (paired CI), P(improvement) matrix, profiles.

    ``groups``: methods that served identically (:func:`same_behaviour`); ``ranking_groups`` is the ranking
    with each such group as one entry (``"helios=static"``), the order whose stability repeats can test."""
    iq = {m: iqm(s) for m, s in scores.items()}
    best_base = max((b for b in baselines if b in scores), key=lambda b: iq[b])
    best_agent = max((a for a in agents if a in scores), key=lambda a: iq[a]) if any(a in scores for a in agents) \
        else None
    stats = method_stats(scores, best_base, reps=reps, seed=seed)
    names = list(scores)
    pim = {a: {b: (prob_improvement(scores[a], scores[b]) if a != b else None) for b in names} for a in names}
    ref = iq[best_base] or 1.0
    taus = np.linspace(0.0, 2.0, 41)
    profile = performance_profile({m: s / ref for m, s in scores.items()}, taus)
    out = {"methods": stats, "best_baseline": best_base, "best_agent": best_agent,
           "ranking": sorted(names, key=lambda m: -iq[m]), "prob_improvement": pim,
           "same_behaviour": groups or [], "ranking_groups": _group_ranking(names, iq, groups or []),
           "performance_profile": {"tau": taus.round(3).tolist(), "share_above": profile}}
    if best_agent is not None:
        row = stats[best_agent]
        out["best_agent_vs_best_baseline_iqm"] = {"value": row[f"vs_{best_base}_iqm_ratio"],
                                                  "ci": row[f"vs_{best_base}_ci"],
                                                  "ci_method": row[f"vs_{best_base}_ci_method"],
                                                  "prob_improvement": row[f"prob_improvement_vs_{best_base}"]}
        lo = row[f"vs_{best_base}_ci"][0]
        out["agent_wins"] = bool(row[f"vs_{best_base}_iqm_ratio"] >= 1.15 and lo > 1.0)
    return out


def _group_ranking(names: list[str], iq: dict[str, float], groups: list[list[str]]) -> list[str]:
    member = {m: "=".join(sorted(g)) for g in groups for m in g}
    best: dict[str, float] = {}
    for m in names:
        key = member.get(m, m)
        best[key] = max(best.get(key, -np.inf), iq[m])
    return sorted(best, key=lambda k: (-best[k], k))


def leaderboard_row(results: dict) -> str:
    """One leaderboard row from a ``helios-rl compare`` result: the best agent against the best baseline
    (IQM ratio, paired CI), as the benchmark reports it."""
    eps = results["episodes"]
    agents = [m for m in eps if m.startswith("policy:")]
    baselines = [m for m in eps if not m.startswith("policy:")]
    seeds = results["seeds"]
    scores = {m: np.array([[e["goodput_tps"] for e in eps[m]]]) for m in eps}
    if len(seeds) and any(len(v[0]) != len(seeds) for v in scores.values()):
        raise ValueError("every method must be scored on the same seeds")
    st = scenario_stats(scores, agents, baselines, reps=2000)
    head = st.get("best_agent_vs_best_baseline_iqm")
    if head is None:
        return f"| {results['scenario']} | {results['backend']} | (no agent) | {st['best_baseline']} | - | - |"
    return (f"| {results['scenario']} | {results['backend']} | {st['best_agent']} | {st['best_baseline']} | "
            f"{head['value']:.3f} | [{head['ci'][0]:.3f}, {head['ci'][1]:.3f}] |")


LEADERBOARD_HEADER = ("| scenario | backend | best agent | best baseline | IQM goodput ratio | 95 % CI (paired) |\n"
                      "|---|---|---|---|---|---|")


# A ratio's run-to-run spread is relative to its mean, but never to less than this: a method that serves under a
# tenth of the best baseline's goodput (an agent that has not learned, say 0, 0.01, 0 of it) would otherwise
# report a spread of 3.0 for differences of 1 % of the baseline. Fixed on 2026-12-05 before the run it was
# first used in; ``repro_spread_unfloored`` keeps the plain relative figure beside it.
SPREAD_FLOOR = 0.1


def repro(per_repeat: list[dict]) -> dict:
    """Run-to-run spread of every method's IQM ratio to the best baseline (max - min over repeats, relative to
    the mean ratio, floored at :data:`SPREAD_FLOOR`), and whether the ranking held."""
    if len(per_repeat) < 2:
        return {"repeats": len(per_repeat), "repro_spread": None, "ranking_stable": None}
    spreads, unfloored = {}, {}
    for m in per_repeat[0]["methods"]:
        vals = []
        for rep in per_repeat:
            b = rep["best_baseline"]
            vals.append(1.0 if m == b else rep["methods"][m].get(f"vs_{b}_iqm_ratio", float("nan")))
        vals = np.asarray(vals, dtype=float)
        if np.all(np.isfinite(vals)):
            width, mean = float(vals.max() - vals.min()), float(vals.mean())
            spreads[m] = width / max(mean, SPREAD_FLOOR)
            if mean > 0:
                unfloored[m] = width / mean
    strict = [tuple(r["ranking"]) for r in per_repeat]
    # methods that served identically in every repeat rank as one entry: their order is timing noise
    tied = [set(g) for g in per_repeat[0].get("same_behaviour", [])
            if all(any(set(g) == set(h) for h in r.get("same_behaviour", [])) for r in per_repeat)]
    rankings = [tuple(_group_ranking(r["ranking"], {m: r["methods"][m]["iqm"] for m in r["ranking"]},
                                     [sorted(g) for g in tied])) for r in per_repeat]
    # which entries changed places, and how far apart they were: a flip between two methods within 1 % of
    # each other is a near-tie that timing decides; one between methods 20 % apart is a finding
    iqms = [{k: max(r["methods"][m]["iqm"] for m in k.split("=")) for k in rk} for r, rk in zip(per_repeat, rankings)]
    pos = [{k: i for i, k in enumerate(rk)} for rk in rankings]
    flips = []
    names = rankings[0]
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if len({p[a] < p[b] for p in pos if a in p and b in p}) > 1:
                gaps = [abs(q[a] - q[b]) / max(abs(q[a] + q[b]) / 2, 1e-12) for q in iqms]
                flips.append({"pair": [a, b], "largest_relative_gap": float(max(gaps))})
    worst = max(spreads, key=spreads.get) if spreads else None
    spread = spreads[worst] if worst else None
    if spread == 0.0:
        worst = None  # every ratio repeated exactly: no method is the worst
    return {"repeats": len(per_repeat), "repro_spread": spread,
            "repro_spread_method": worst, "spread_floor": SPREAD_FLOOR,
            "repro_spread_unfloored": max(unfloored.values()) if unfloored else None,
            "spread_by_method": spreads, "ranking_stable": all(r == rankings[0] for r in rankings),
            "ranking_flips": flips,
            "rankings": [list(r) for r in rankings], "tied_identical": [sorted(g) for g in tied],
            "strict_ranking_stable": all(r == strict[0] for r in strict), "strict_rankings": [list(r) for r in strict]}


def drift_range(episodes: list[dict]) -> dict | None:
    """How far the machine's speed moved from calibration over a backend's episodes (``backend.drift: probe``):
    the range of the factors their costs were corrected by (1: as calibrated; 0.6: 1.7x slower)."""
    if not episodes:
        return None
    out = {"episodes": len(episodes), "factor_min": min(d["factor_min"] for d in episodes),
           "factor_max": max(d["factor_max"] for d in episodes),
           "factor_median": float(np.median([d["factor_mean"] for d in episodes])),
           "calibrated_probe_s": episodes[0]["calibrated_probe_s"]}
    settings = {(d.get("interval_s"), d.get("window"), d.get("prefill_every")) for d in episodes if "window" in d}
    if settings:  # how the episodes probed: every interval_s wall seconds (the prefill probe every prefill_every-th
        # time), the median of the last window samples
        if len(settings) > 1:
            raise ValueError(f"the episodes probed the machine with different settings {sorted(settings, key=str)}: "
                             "their corrections are not one measurement")
        out["interval_s"], out["window"], out["prefill_every"] = next(iter(settings))
    pre = [d for d in episodes if "prefill_factor_mean" in d]
    if pre:  # the prefill probe's factors, which priced the steps' prefill passes
        out.update({"prefill_factor_min": min(d["prefill_factor_min"] for d in pre),
                    "prefill_factor_max": max(d["prefill_factor_max"] for d in pre),
                    "prefill_factor_median": float(np.median([d["prefill_factor_mean"] for d in pre])),
                    "calibrated_prefill_probe_s": pre[0]["calibrated_prefill_probe_s"]})
    return out


def _ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 4th, ..., 11th-13th, 21st."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def markdown(board: dict) -> str:
    lines = [f"# Leaderboard: {board['suite']}", "",
             f"- run `{board['run']}`; git {short_revision(board.get('git'))}; {board['date']}; "
             f"machine {board.get('machine')}; Ray {board.get('ray', {}).get('address')}",
             "- trials by the revision they ran at: " + (", ".join(
                 f"{short_revision(rev)} ({n})" for rev, n in (board.get("trial_revisions") or {}).items()) or "-"),
             f"- {board['config']['train_seeds']} training seeds (runs) x {board['config']['test_seeds']} test "
             f"seeds (>= 1,000,000, never used for training or tuning); repeats: {board['config']['repeat']}"
             + (" (QUICK configuration)" if board['config'].get('quick') else ""),
             "- score: goodput over the workload's SLO window (tokens of requests meeting the SLO and the quality "
             "floors, per second of the window in which the seed's requests could meet it: fixed per seed, so "
             "proportional to the good tokens served); IQM with 95 % CIs (stratified bootstrap over runs; ratios "
             "paired over test seeds, rliable's protocol). `good share`: median share of the tokens served that were "
             "served well; `own-length goodput`: median good tokens per second of the episode's own length (not "
             "the score: a shorter episode alone raises it)", ""]
    for key, sc in board["scenarios"].items():
        lines += [f"## {key}", "", f"SLO: {sc.get('slo')}", ""]
        for label, k in (("best-static", "best_static"), ("tuned-aimd", "tuned_aimd")):
            if sc.get(k):
                lines.append(f"- `{label}` (searched on development seeds, simulator): "
                             + ", ".join(f"{n}={v}" for n, v in sc[k]["point"].items() if v is not None)
                             + f"; {sc[k]['goodput_tps']:.2f} tok/s there")
        lines.append("")
        lines += ["| method | runs | IQM goodput | 95 % CI | vs best baseline | 95 % CI | P(improve) | good share | "
                  "own-length goodput | tok/s |", "|---|---|---|---|---|---|---|---|---|---|"]
        side = sc.get("episode_medians") or {}
        st = sc["stats"]
        b = st["best_baseline"]
        for m in st["ranking"]:
            r = st["methods"][m]
            ratio, ci = r.get(f"vs_{b}_iqm_ratio"), r.get(f"vs_{b}_ci")
            lines.append(f"| {m}{' (best baseline)' if m == b else ''} | {r['runs']} | {r['iqm']:.2f} | "
                         f"[{r['iqm_ci'][0]:.2f}, {r['iqm_ci'][1]:.2f}] | "
                         + (f"{ratio:.3f} | [{ci[0]:.3f}, {ci[1]:.3f}] | {r[f'prob_improvement_vs_{b}']:.2f} |"
                            if ratio is not None else "1 | - | - |")
                         + "".join(f" {_fmt(side.get(m, {}).get(k), f)} |" for k, f in EPISODE_MEDIANS.items()))
        head = st.get("best_agent_vs_best_baseline_iqm")
        rp = sc.get("repro", {})
        if head:
            verdict = "wins" if st.get("agent_wins") else "does not win (needs IQM ratio >= 1.15 and CI low > 1)"
            lines += ["", f"Best agent `{st['best_agent']}` vs best baseline `{b}`: {head['value']:.3f} "
                          f"[{head['ci'][0]:.3f}, {head['ci'][1]:.3f}]: the agent {verdict}."]
        tied = rp.get("tied_identical") or []
        spread = rp.get("repro_spread")
        if spread is None:
            what = "not measured (one repeat; `--repeat 3` measures it)"
        else:
            who = (f"`{rp['repro_spread_method']}`" if rp.get("repro_spread_method")
                   else "every method's ratio repeated exactly")
            what = (f"{round(spread, 4)} ({who}; relative to the mean ratio, at least {rp.get('spread_floor')}; "
                    f"unfloored {round(rp.get('repro_spread_unfloored') or 0.0, 4)})")
        lines += [f"Reproducibility over {rp.get('repeats')} repeat(s): spread {what}"
                  + f", ranking stable: {rp.get('ranking_stable')}"
                  + (f" (methods that served identically in every repeat rank as one: "
                     f"{', '.join('='.join(g) for g in tied)}; strict order stable: {rp.get('strict_ranking_stable')})"
                     if tied else "") + "."]
        d = sc.get("drift")
        if d:
            how = (f"; probed every {d['interval_s']:g} s, median of the last {d['window']}" if "window" in d else "")
            if d.get("prefill_every"):
                how += f", the prefill probe every {_ordinal(d['prefill_every'])} time"
            lines.append(f"Machine speed against calibration (live costs corrected by calibrated / measured probe "
                         f"time, {d['calibrated_probe_s'] * 1000:.0f} ms at calibration{how}): factors "
                         f"{d['factor_min']:.2f}-{d['factor_max']:.2f}, median episode {d['factor_median']:.2f} "
                         f"over {d['episodes']} episodes"
                         + (f"; prefill passes by the prefill probe ({d['calibrated_prefill_probe_s'] * 1000:.0f} ms): "
                            f"{d['prefill_factor_min']:.2f}-{d['prefill_factor_max']:.2f}, median "
                            f"{d['prefill_factor_median']:.2f}" if "prefill_factor_min" in d else "") + ".")
        if len(rp.get("repeat_windows") or []) > 1:
            lines.append("Repeats ran " + "; ".join(
                f"r{w['repeat']} {w['finished_first']} to {w['finished_last']} on {', '.join(w['hosts'])} (git "
                f"{', '.join(g[:8] for g in w['git'])})" for w in rp["repeat_windows"]) + " (shards' finish times).")
        for f in rp.get("ranking_flips") or []:
            lines.append(f"- `{f['pair'][0]}` and `{f['pair'][1]}` changed places between repeats (IQMs at most "
                         f"{100 * f['largest_relative_gap']:.1f} % apart in any repeat).")
        lines.append("")
    return "\n".join(lines)


def plots(board: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key, sc in board["scenarios"].items():
        st = sc["stats"]
        names = st["ranking"]
        fig, axes = plt.subplots(1, 3, figsize=(17, 4.2))
        iq = [st["methods"][m]["iqm"] for m in names]
        lo = [st["methods"][m]["iqm"] - st["methods"][m]["iqm_ci"][0] for m in names]
        hi = [st["methods"][m]["iqm_ci"][1] - st["methods"][m]["iqm"] for m in names]
        axes[0].bar(range(len(names)), iq, yerr=[lo, hi], capsize=4, color="#4c72b0")
        axes[0].set_xticks(range(len(names)), names, rotation=30, fontsize=8)
        axes[0].set_ylabel("IQM goodput (tok/s), 95 % CI")
        prof = st["performance_profile"]
        for m in names:
            axes[1].plot(prof["tau"], prof["share_above"][m], label=m)
        axes[1].set_xlabel("goodput / best baseline IQM (tau)")
        axes[1].set_ylabel("share of runs x seeds above tau")
        axes[1].legend(fontsize=7)
        pim = np.array([[st["prob_improvement"][a][b] if a != b else np.nan for b in names] for a in names], float)
        im = axes[2].imshow(pim, vmin=0, vmax=1, cmap="RdBu")
        axes[2].set_xticks(range(len(names)), names, rotation=60, fontsize=7)
        axes[2].set_yticks(range(len(names)), names, fontsize=7)
        axes[2].set_title("P(row beats column)")
        fig.colorbar(im, ax=axes[2], fraction=0.046)
        fig.suptitle(key)
        fig.tight_layout()
        p = out / f"{key.replace('/', '__')}.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p.name)
    return paths
