"""How much a benchmark's live repeats moved, per method: throughput as charged, throughput with the drift
correction taken out, and goodput.

For each live scenario of a ``helios-rl benchmark --repeat N`` folder and each method, the relative spread
(max - min) / mean over the repeats of one test seed, median over seeds. "Uncorrected" divides each episode's
throughput by its mean drift factor (``backend.drift: probe``): approximate, since idle time on the virtual clock
is not scaled. Also the range of the episodes' factors (how far the machine moved from its calibration), and
for the methods that hold one configuration (``--fixed``, default static, best-static, helios) the pooled
within-(method run, seed) standard deviation over repeats of log measured serving seconds, of log charged
seconds, and of what the decode factor alone would have charged: how alike the correction charged the same work.

    python benchmarks/repeat_spread.py DIR

Output: JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics as st
from pathlib import Path


def spread(xs: list[float]) -> float:
    m = st.mean(xs)
    return (max(xs) - min(xs)) / m if m > 0 else 0.0


def pooled_sd(groups: list[list[dict]], key: str) -> float:
    """Pooled standard deviation of log ``key`` within groups (each group: one method run's repeats of a seed)."""
    var = [st.variance([math.log(d[key]) for d in g]) for g in groups]  # every group has 2 or more repeats
    return math.sqrt(sum(var) / len(var))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", help="a benchmark's --out folder")
    ap.add_argument("--fixed", default="static,best-static,helios",
                    help="methods that hold one configuration (their charged seconds should repeat)")
    args = ap.parse_args()
    fixed = set(args.fixed.split(","))
    by: dict[str, dict[str, dict[int, list[dict]]]] = {}
    for f in sorted((Path(args.dir) / "trials").glob("eval__*__live__*.json")):
        r = json.loads(f.read_text())
        r = r.get("result", r)
        for m, ep in r["episodes"].items():
            by.setdefault(r["scenario"], {}).setdefault(m, {}).setdefault(r["seed"], []).append(ep)
    out = {}
    for scen, methods in by.items():
        factors = [ep["drift"]["factor_mean"] for m in methods.values() for eps in m.values() for ep in eps
                   if ep.get("drift")]
        rows = {}
        for m, seeds in sorted(methods.items()):
            reps = [eps for eps in seeds.values() if len(eps) > 1]
            if not reps:
                continue
            row = {"throughput_corrected": st.median(spread([e["tokens_per_s"] for e in eps]) for eps in reps),
                   "goodput": st.median(spread([e["goodput_tps"] for e in eps]) for eps in reps)}
            if all(e.get("drift") for eps in reps for e in eps):
                row["throughput_uncorrected"] = st.median(
                    spread([e["tokens_per_s"] / e["drift"]["factor_mean"] for e in eps]) for eps in reps)
            rows[m] = {k: round(v, 4) for k, v in row.items()}
        med = {k: round(st.median(r[k] for r in rows.values() if k in r), 4)
               for k in ("throughput_corrected", "throughput_uncorrected", "goodput") if any(k in r for r in rows.values())}
        groups = [[ep["drift"] for ep in eps] for m, seeds in methods.items() if m.split("#")[0] in fixed
                  for eps in seeds.values() if len(eps) > 1 and all(ep.get("drift") for ep in eps)]
        pooled = {k: round(pooled_sd(groups, k), 4) for k in ("measured_s", "charged_s", "charged_one_factor_s")
                  if groups and all(k in d for g in groups for d in g)}
        out[scen] = {"methods": rows, "median_over_methods": med,
                     "fixed_pooled_sd_log_seconds": pooled or None,
                     "episode_factors": {"min": min(factors), "max": max(factors), "median": st.median(factors),
                                         "n": len(factors)} if factors else None}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
