"""How noisy is one speed-probe sample? The decode and prefill probes back to back, a fixed pause apart.

Times the scenario's decode probe (the SLO reference model's full-depth step at batch 8) and prefill probe (96
prompt tokens) ``--samples`` times, ``--pause`` seconds apart, with the scenario's timing, and prints the samples
and their summary: log standard deviation of one sample, of a median of 3 and of 5 consecutive samples, and the
lag-1 correlation (how much of the noise is the machine's speed moving rather than a sample's own). Run two at once
to load both cores as a benchmark's two workers do:

    OMP_NUM_THREADS=1 python benchmarks/probe_noise.py envs/suite/steady.yaml > a.json &
    OMP_NUM_THREADS=1 python benchmarks/probe_noise.py envs/suite/steady.yaml > b.json

Output: JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def summary(samples: list[float]) -> dict:
    x = np.log(np.asarray(samples, dtype=float))
    out = {"n": len(x), "median_s": round(float(np.exp(np.median(x))), 5),
           "p5_s": round(float(np.exp(np.percentile(x, 5))), 5), "p95_s": round(float(np.exp(np.percentile(x, 95))), 5),
           "sd_log": round(float(x.std(ddof=1)), 4),
           "lag1_r": round(float(np.corrcoef(x[:-1], x[1:])[0, 1]), 3) if len(x) > 2 else None}
    for w in (3, 5):
        if len(x) > w:
            med = [np.median(x[i - w + 1:i + 1]) for i in range(w - 1, len(x))]
            out[f"median_of_{w}_sd_log"] = round(float(np.std(med, ddof=1)), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scenario")
    ap.add_argument("--samples", type=int, default=150)
    ap.add_argument("--pause", type=float, default=0.5, help="seconds between one pair of samples and the next")
    a = ap.parse_args()
    from helios_rl.evaluation.probe import PrefillProbe, SpeedProbe
    from helios_rl.evaluation.runtime import Timer
    from helios_rl.scenario import load_scenario

    sc = load_scenario(a.scenario)
    probe = SpeedProbe(sc, Timer(sc.backend.timing if sc.backend.timing != "modeled" else "cpu"))
    prefill = PrefillProbe(probe)
    probe.measure(3)
    prefill.measure(2)  # warm
    decode, pre, t = [], [], []
    t0 = time.time()
    for _ in range(a.samples):
        decode.append(probe.step())
        pre.append(prefill.step())
        t.append(round(time.time() - t0, 3))
        time.sleep(a.pause)
    prefill.close()
    probe.close()
    print(json.dumps({"scenario": sc.name, "timing": probe.timer.mode,
                      "decode": summary(decode), "prefill": summary(pre),
                      "samples": {"decode": decode, "prefill": pre, "t": t}}, indent=1))


if __name__ == "__main__":
    main()
