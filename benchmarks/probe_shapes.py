"""Does a slowdown slow every step shape alike? The drift correction's assumption, tested under induced contention.

The live backend's drift correction (``backend.drift: probe``, helios_rl/evaluation/probe.py) charges each
measured serving cost times ``calibrated probe / recent probes``, where the probe is the SLO reference model's
full-depth decode step at batch 8. That is exact only if a slower machine slows the serving steps and the probe
step by the same factor. This script times several step shapes of the reference model (the probe itself, decode
at larger batches, a prefill step) in the scenario's timing mode, pinned to one core, while the other core runs
nothing, a memory-bandwidth load (numpy copies of arrays larger than the L3) or a compute load (a cache-resident
matmul), interleaved over rounds. Printed: per shape and load, the median step time and its slowdown against
the quiet median, and each shape's log-slowdown over the probe's (1.0: the correction is exact for that shape; 0.7: that
shape slows 0.7 as much, in log terms, so the correction over-charges it).

    OMP_NUM_THREADS=1 python benchmarks/probe_shapes.py envs/suite/steady.yaml --rounds 3 --out F.json

Output: JSON on stdout (and in ``--out``). Run it on an otherwise idle 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import statistics
import time


def _hog(kind: str, stop) -> None:
    import numpy as np

    os.sched_setaffinity(0, {1})
    if kind == "memory":
        a = np.ones(64 * 2**20 // 8 * 4)  # 256 MiB: far beyond the 32 MiB L3
        b = np.empty_like(a)
        while not stop.is_set():
            np.copyto(b, a)
    else:
        a = np.random.rand(128, 128)  # cache-resident: compute, not bandwidth
        while not stop.is_set():
            for _ in range(200):
                a = a @ a
                a /= np.abs(a).max()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scenario")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per shape per round (median)")
    ap.add_argument("--batches", default="8,32", help="decode batches (8 is the probe)")
    ap.add_argument("--prefill", default="4x96", help="a prefill step: REQUESTSxTOKENS")
    ap.add_argument("--loads", default="none,memory,compute")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch

    from helios_rl.engine.request import SamplingParams
    from helios_rl.evaluation.probe import PROBE_TEXT, SpeedProbe
    from helios_rl.evaluation.runtime import Timer
    from helios_rl.scenario import load_scenario

    os.sched_setaffinity(0, {0})
    torch.set_num_threads(1)
    sc = load_scenario(args.scenario)
    timer = Timer(sc.backend.timing if sc.backend.timing != "modeled" else "cpu")
    batches = [int(b) for b in args.batches.split(",")]
    probes = {8: SpeedProbe(sc, timer)}
    for b in batches:
        if b not in probes:
            probes[b] = SpeedProbe(sc, timer, batch=b, model=probes[8].model)
    n_req, n_tok = (int(x) for x in args.prefill.split("x"))
    pre = SpeedProbe(sc, timer, batch=n_req, model=probes[8].model)  # an engine of its own for the prefills
    tok = probes[8].model.tokenizer
    base = tok((PROBE_TEXT + " ") * 8, add_special_tokens=False)["input_ids"]
    calls = [0]

    def prefill_step() -> float:
        # n_req fresh requests of n_tok prompt tokens each (rotated, so no two calls send the same prompt):
        # the timed step is the one that prefills them
        calls[0] += 1
        for i in pre._ids:  # (unfinished after their prefill: aborted, then forgotten)
            pre.engine.abort(i)
            pre.engine.release(i)
        k = calls[0] % 17
        prompt = (base[k:] + base[:k])[:n_tok]
        pre._ids = [pre.engine.add_request(list(prompt), SamplingParams(max_new_tokens=2, ignore_eos=True))
                    for _ in range(n_req)]
        t0 = timer.start()
        pre.engine.step()
        dt = timer.elapsed(t0)
        assert pre.engine.telemetry.steps[-1].prefill_tokens == n_req * n_tok, "the timed step was not the prefill"
        return dt

    shapes = {f"decode_b{b}": probes[b].step for b in batches}
    shapes[f"prefill_{args.prefill}"] = prefill_step
    loads = args.loads.split(",")
    times: dict[str, dict[str, list[float]]] = {lo: {s: [] for s in shapes} for lo in loads}
    for s, fn in shapes.items():  # warm-up
        fn(), fn()
    for r in range(args.rounds):
        for lo in loads:
            stop = mp.Event()
            proc = None
            if lo != "none":
                proc = mp.Process(target=_hog, args=(lo, stop), daemon=True)
                proc.start()
                time.sleep(1.0)
            for s, fn in shapes.items():
                times[lo][s].append(statistics.median(fn() for _ in range(args.steps)))
            if proc is not None:
                stop.set()
                proc.join(5)
            print(f"round {r + 1} load {lo}: " + ", ".join(f"{s} {times[lo][s][-1] * 1000:.1f} ms"
                                                          for s in shapes), flush=True)
    med = {lo: {s: statistics.median(v) for s, v in d.items()} for lo, d in times.items()}
    probe = "decode_b8"
    out = {"scenario": sc.name, "timing": timer.mode, "rounds": args.rounds, "steps": args.steps,
           "median_s": med, "slowdown": {}, "slowdown_over_probe": {}}
    for lo in loads:
        if lo == "none":
            continue
        sl = {s: med[lo][s] / med["none"][s] for s in shapes}
        out["slowdown"][lo] = {s: round(v, 4) for s, v in sl.items()}
        out["slowdown_over_probe"][lo] = {s: round(math.log(sl[s]) / math.log(sl[probe]), 3)
                                          if abs(math.log(sl[probe])) > 1e-3 else None for s in shapes}
    pre.close()
    for b in sorted(probes, key=lambda b: b == 8):  # the probe owning the model last
        probes[b].close()
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        from helios_rl.utils.io import atomic_write_text

        atomic_write_text(args.out, text)


if __name__ == "__main__":
    main()
