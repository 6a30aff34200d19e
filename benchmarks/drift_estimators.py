"""Which speed estimate from the probes charges repeats of one episode most alike? Replayed offline.

``benchmarks/drift_split.py --log-probes --interval I`` records, for every episode, each probe sample and each
charged cost in the order they happened (development seeds only). This script replays those records under other
estimators of the machine's speed: the window's median (the library's; 3 samples), longer windows, a lower
quantile or the minimum (the probe's samples have a hard floor and right-skewed spikes), and fewer samples (every
k-th sample of each probe: the cadence a longer ``backend.drift_interval_s`` would give). For each, per (method, seed), the spread
over repeats of the charged seconds; pooled over (method, seed) as the standard deviation of log charged seconds.
A lower figure means the same work is charged more alike when the machine's speed differs. (The replay keeps the
schedule the episodes ran; an estimator changes the charges, and through the clock, the schedule: what a
replay cannot show.)

    python benchmarks/drift_estimators.py a.json b.json

Output: JSON on stdout, one entry per estimator, best first.
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def _estimate(kind: str, window: list[float]) -> float:
    w = np.asarray(window, dtype=float)
    if kind == "median":
        return float(np.median(w))
    if kind == "mean":
        return float(w.mean())
    if kind == "min":
        return float(w.min())
    if kind.startswith("q"):  # q25: the 25th percentile
        return float(np.percentile(w, int(kind[1:])))
    raise ValueError(f"unknown estimator {kind!r}")


def replay(rows: list[dict], cal_d: float, cal_p: float, kind: str, window: int, every: int,
           split: bool = True, every_prefill: int | None = None) -> list[float]:
    """Charged seconds of each row's episode (rows in the order one process ran them: the window carries over
    episodes, as the library's does) under estimator ``kind`` over the last ``window`` samples, keeping every
    ``every``-th periodic decode-probe sample and every ``every_prefill``-th (default ``every``) prefill-probe
    sample (an episode's forced first samples are always kept)."""
    keep = {"d": every, "p": every if every_prefill is None else every_prefill}
    d: list[float] = []
    p: list[float] = []
    out = []
    for r in rows:
        seen = {"d": 0, "p": 0}
        fd = (cal_d / _estimate(kind, d[-window:])) if d else 1.0
        fp = (cal_p / _estimate(kind, p[-window:])) if p else 1.0
        charged = 0.0
        started = False
        for e in r["log"]:
            if e[0] == "c":
                started = True
                cost, pre = e[1], min(max(0.0, e[2]), e[1])
                charged += (cost - pre) * fd + pre * (fp if split else fd)
                continue
            if started:  # a periodic sample: keep every ``every``-th of its kind (the cadence it would have)
                seen[e[0]] += 1
                if (seen[e[0]] - 1) % keep[e[0]]:
                    continue
            if e[0] == "d":
                d.append(e[1])
                fd = cal_d / _estimate(kind, d[-window:])
            else:
                p.append(e[1])
                fp = cal_p / _estimate(kind, p[-window:])
        out.append(charged)
    return out


def pooled(rows: list[dict], charged: list[float]) -> tuple[float, float]:
    """Pooled SD of log charged seconds within (method, seed), and the largest relative range."""
    groups: dict = {}
    for r, c in zip(rows, charged):
        groups.setdefault((r["method"], r["seed"]), []).append(c)
    variances, ranges = [], []
    for v in groups.values():
        if len(v) > 1:
            variances.append(np.var(np.log(v), ddof=1))
            ranges.append(float(np.ptp(v) / np.mean(v)))
    return float(np.sqrt(np.mean(variances))), float(max(ranges))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", help="drift_split.py --log-probes outputs (one per process)")
    ap.add_argument("--calibrated", nargs=2, type=float, default=None, metavar=("DECODE_S", "PREFILL_S"),
                    help="the profile's probe times (default: read from the recorded episodes)")
    a = ap.parse_args()
    data = [json.load(open(f)) for f in a.files]
    for f, dj in zip(a.files, data):
        if not all("log" in r for r in dj["rows"]):
            ap.error(f"{f}: no probe log in its episodes (record them with drift_split.py --log-probes)")
    if a.calibrated is None and "calibrated" not in data[0]:
        ap.error(f"{a.files[0]} does not say the profile's probe times (recorded before drift_split.py wrote "
                 "them): give them with --calibrated DECODE_S PREFILL_S")
    cal = a.calibrated or (data[0]["calibrated"]["s"], data[0]["calibrated"]["prefill_s"])
    interval = data[0].get("interval_s")  # the recorded cadence: decode probes this often, and prefill every
    pre = data[0].get("prefill_every", 2)  # ... this many decode probes (2 in recordings before it was recorded)
    cadences = ((1, 1), (1, 2), (1, 4), (2, 1), (2, 2), (4, 4))  # (every k-th decode, every k-th prefill sample)
    grid = [(k, w, c, s) for k in ("median", "mean", "q25", "min") for w in (3, 5, 9, 15) for c in cadences
            for s in (True, False)]
    results = []
    for kind, window, (every_d, every_p), split in grid:
        rows, charged = [], []
        for dj in data:
            rows += dj["rows"]
            charged += replay(dj["rows"], cal[0], cal[1], kind, window, every_d, split, every_p)
        sd, rng = pooled(rows, charged)
        results.append({"estimator": kind, "window": window, "decode_every": every_d, "prefill_every": every_p,
                        **({"decode_s": interval * every_d, "prefill_s": pre * interval * every_p} if interval else {}),
                        "split": split, "pooled_sd_log": round(sd, 5), "max_range": round(rng, 4)})
    raw = pooled([r for dj in data for r in dj["rows"]], [r["measured_s"] for dj in data for r in dj["rows"]])
    results.append({"estimator": "none (measured seconds)", "pooled_sd_log": round(raw[0], 5),
                    "max_range": round(raw[1], 4)})
    results.sort(key=lambda r: r["pooled_sd_log"])
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
