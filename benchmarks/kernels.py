"""Decode step time with and without the measured linear plan (``helios_rl.models.kernels``), on the CPU.

For each model and batch: full-depth decode steps (exits off, after an untimed prefill of real news
prompts), plain ``F.linear`` everywhere (``HELIOS_RL_LINEAR_PLAN=off``; or with ``--baseline no-onednn`` the
plan without oneDNN's kernel) against the machine's plan,
alternating within one process, ``--rounds`` rounds of ``--steps`` timed steps each (median). Also
whether both produced the same greedy tokens (the orientations sum in another order).

    python benchmarks/kernels.py [--models smollm2-135m gemma3-270m] [--batches 1 4 8 12 16 24 32]

Output: JSON on stdout (wall-clock seconds per decode step, tokens/s, speedup, plan rows, tokens equal).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 12, 16, 24, 32])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--baseline", choices=["off", "no-onednn"], default="off",
                    help="HELIOS_RL_LINEAR_PLAN of the A side: plain F.linear, or the plan without oneDNN")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from helios_rl.engine.config import EngineSettings, ServingConfig
    from helios_rl.engine.engine import Engine
    from helios_rl.engine.request import SamplingParams
    from helios_rl.models import kernels
    from helios_rl.models.registry import load_model

    def use(mode: str) -> None:
        os.environ["HELIOS_RL_LINEAR_PLAN"] = mode
        kernels._plan_for.cache_clear()

    use("auto")
    active = kernels.plan_rows()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from engine import real_prompts  # benchmarks/engine.py: news passages of 24-96 tokens

    from helios_rl.evaluation.harness import machine_info

    out = {"machine": machine_info(),
           "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                 cwd=Path(__file__).parent).stdout.strip(),
           "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "plan_rows": active, "baseline": args.baseline,
           "plan_file": str(kernels.plan_path()), "models": {}}
    for name in args.models:
        model = load_model(name)
        prompts = real_prompts(model.tokenizer, max(args.batches))
        eng = Engine(model, EngineSettings(max_batch=max(args.batches), max_model_len=256))
        eng.apply(ServingConfig(max_batch=max(args.batches), threshold=1.0, exit_layers=()))
        rows = {}
        for b in args.batches:
            times = {"off": [], "auto": []}
            tokens = {}
            for r in range(args.rounds):
                for mode in (("off", "auto") if r % 2 == 0 else ("auto", "off")):
                    use(args.baseline if mode == "off" else mode)
                    ids = [eng.add_request(p, SamplingParams(max_new_tokens=args.steps + 2, ignore_eos=True))
                           for p in prompts[:b]]
                    eng.step()  # prefill: not timed
                    eng.step()  # first decode step after prefill: not timed either
                    ts = []
                    while eng.has_unfinished():
                        t = time.perf_counter()
                        eng.step()
                        ts.append(time.perf_counter() - t)
                    times[mode].append(statistics.median(ts))
                    tokens.setdefault(mode, [list(eng.requests[i].output_ids) for i in ids])
                    for i in ids:
                        eng.release(i)
            off, auto = statistics.median(times["off"]), statistics.median(times["auto"])
            rows[str(b)] = {"step_s_off": round(off, 5), "step_s_plan": round(auto, 5),
                            "tok_s_off": round(b / off, 2), "tok_s_plan": round(b / auto, 2),
                            "speedup": round(off / auto, 3), "same_tokens": tokens["off"] == tokens["auto"],
                            "rounds_off": [round(x, 5) for x in times["off"]],
                            "rounds_plan": [round(x, 5) for x in times["auto"]]}
            print(f"{name} batch {b}: {off * 1e3:.1f} -> {auto * 1e3:.1f} ms/step ({off / auto:.2f}x), "
                  f"same tokens {rows[str(b)]['same_tokens']}", flush=True, file=sys.stderr)
        out["models"][name] = rows
        del eng, model
    use("auto")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
