"""Benchmark: what the exit heads buy when served, by wall clock, and how far it is from what they allow.

Serves held-out real prompts (news/wiki completion, summarisation, ShareGPT chat; never seen by
``tune-exits``) greedily with EOS ignored, at full depth and at every calibrated precision target,
under both KV strategies for skipped layers (``recompute``: exact, deferred; ``copy``: CALM's K/V
projections of the exit state), at batch 1 and batch 8. Configs run interleaved and repeated, so a
shared CPU's load hits each alike; the median is reported.

Headline figures (what a user feels):

* ``speedup_wall_at_target``: tokens per wall-clock second at the target over full depth.
* ``free_running_agreement_at_target``: share of served tokens equal to the full model's *own*
  greedy continuation at the same position. ``teacher_forced_agreement_at_target`` (each token vs
  the full model's argmax on the same prefix) is reported beside it, labelled.

Diagnostics:

* ``ideal_speedup`` (modelled): what the measured exit histogram allows with the measured per-layer,
  exit-evaluation and LM-head costs (fastest-of-rounds timings at the same batch), if an exited
  token cost only its layers and exit evaluations; ``exit_efficiency`` = measured / ideal.
* ``row_positions_ratio``: positions run per layer with exits over the full-depth run of the same
  prompts and token counts (largest over layers; <= 1 means exits never add layer work).

    python benchmarks/exits.py --model smollm2-135m --out smollm2.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", required=True, help="JSON results file")
    p.add_argument("--heads", default="auto", help="auto (yours, else the shipped heads), shipped, or a heads folder")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-prompt-tokens", type=int, default=96)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batches", default="1,8", help="comma-separated batch caps")
    p.add_argument("--target", type=float, default=0.95, help="the precision target the summary reports")
    p.add_argument("--strategies", default="recompute,copy", help="KV strategies for skipped layers")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is steadiest on a shared CPU)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def ideal_speedup(counts: np.ndarray, layers: list[int], c1, cb, batch: int, L: int) -> float:
    """What the measured exit histogram allows (modelled): full-depth step time over the step time if
    every exited row cost nothing after its exit, with the measured costs of a layer, an exit
    evaluation and the LM head at batch 1 (``c1``) and at ``batch`` (``cb``), linear in the rows in
    between (a row fraction below one costs its share of batch 1)."""
    p = counts / max(counts.sum(), 1)

    def cost(one: float, many: float, n: float) -> float:
        if n <= 1 or batch == 1:
            return one * n
        return one + (many - one) * (n - 1) / (batch - 1)

    alive, t = float(batch), 0.0
    for layer in range(L):
        t += cost(c1.layer, cb.layer, alive)
        if layer in layers and layer < L - 1:
            t += cost(c1.exit_eval, cb.exit_eval, alive)
            alive -= batch * float(p[layer])
    t += cost(c1.final_head, cb.final_head, alive)
    full = L * cb.layer + cb.final_head if batch > 1 else L * c1.layer + c1.final_head
    return full / t if t > 0 else 1.0


def serve(engine, prompts, cfg, new_tokens):
    """Serve ``prompts`` under ``cfg``; (requests, wall seconds, cpu seconds, row positions per layer)."""
    from helios_rl.engine.request import SamplingParams

    engine.apply(cfg)
    since = engine.clock()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    reqs = engine.generate(list(prompts), SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    rows = np.asarray(engine.snapshot(since=since).row_positions, dtype=np.int64)
    for r in reqs:
        engine.release(r.request_id)
    return reqs, wall, cpu, rows


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from helios_rl.engine.config import EngineSettings, ServingConfig
    from helios_rl.engine.engine import Engine
    from helios_rl.exits.heads import TunedExitHeads
    from helios_rl.exits.profile import free_running_match, heldout_prompts, teacher_forced_agreement
    from helios_rl.exits.tune import measure_costs
    from helios_rl.models.registry import load_model
    from helios_rl.utils.provenance import git_revision

    model = load_model(args.model, heads=args.heads)
    if not isinstance(model.heads, TunedExitHeads) or not model.heads.targets:
        print(f"{args.model}: no exit heads with calibrated targets (run `helios-rl tune-exits {args.model}`)",
              file=sys.stderr)
        return 2
    heads = model.heads
    targets = sorted(heads.targets, reverse=True)
    if args.target not in targets:
        print(f"target {args.target} is not calibrated (have {targets})", file=sys.stderr)
        return 2
    prompts = heldout_prompts(model, args.prompts, args.max_prompt_tokens, args.seed)
    strategies = [s for s in args.strategies.split(",") if s]
    configs = {"full": ServingConfig(exit_layers=(), threshold=1.0)}
    configs.update({f"target={t:g}": ServingConfig(target=t) for t in targets})
    max_len = args.max_prompt_tokens + args.max_new_tokens + 64
    results: dict = {}
    c1 = measure_costs(model, heads, max(heads.adapters), batch=1)
    for batch in [int(b) for b in args.batches.split(",")]:
        costs = c1 if batch == 1 else measure_costs(model, heads, max(heads.adapters), batch=batch)
        engines = {s: Engine(model, EngineSettings(max_batch=batch, max_model_len=max_len, kv_strategy=s))
                   for s in strategies}
        for eng in engines.values():  # warm-up: first calls allocate and dispatch slowly
            serve(eng, prompts[:2], configs["full"], 4)
        runs: dict[tuple[str, str], list] = {}
        for rep in range(args.repeats):
            for s, eng in engines.items():
                for name, cfg in configs.items():
                    if name == "full" and s != strategies[0]:
                        continue  # full depth exits nowhere: the strategy changes nothing
                    reqs, wall, cpu, rows = serve(eng, prompts, cfg, args.max_new_tokens)
                    runs.setdefault((s, name), []).append((reqs, wall, cpu, rows))
                    tokens = sum(r.num_generated for r in reqs)
                    print(f"batch {batch} rep {rep} {s:>9} {name:>12}: {tokens / wall:6.2f} tok/s wall, "
                          f"{tokens / cpu:6.2f} tok/cpu-s", flush=True)
        full_reqs, *_ = runs[(strategies[0], "full")][0]
        full_out = [list(r.output_ids) for r in full_reqs]
        full_rows = runs[(strategies[0], "full")][0][3]
        full_tps = statistics.median(sum(r.num_generated for r in q) / w for q, w, _, _ in runs[(strategies[0], "full")])
        full_cps = statistics.median(sum(r.num_generated for r in q) / c for q, _, c, _ in runs[(strategies[0], "full")])
        rows_out = {}
        for (s, name), rr in runs.items():
            reqs, _, _, rows = rr[0]
            tokens = sum(r.num_generated for r in reqs)
            tps = statistics.median(sum(r.num_generated for r in q) / w for q, w, _, _ in rr)
            cps = statistics.median(sum(r.num_generated for r in q) / c for q, _, c, _ in rr)
            counts = np.zeros(model.num_layers, dtype=np.int64)
            for r in reqs:
                np.add.at(counts, np.asarray(r.exit_layers[1:], dtype=np.int64), 1)  # decode tokens only
            good, total = teacher_forced_agreement(model, reqs) if name != "full" else (tokens, tokens)
            layers = list(heads.target(float(name.split("=")[1])).layers) if name != "full" else []
            ideal = ideal_speedup(counts, layers, c1, costs, batch, model.num_layers) if name != "full" else 1.0
            speedup = tps / full_tps
            ratio = rows / np.maximum(full_rows, 1)
            rows_out[f"{s}/{name}"] = {
                "kv_strategy": s, "config": name, "tokens": tokens,
                "tokens_per_s": round(tps, 3), "tokens_per_s_runs": [round(sum(r.num_generated for r in q) / w, 3)
                                                                      for q, w, _, _ in rr],
                "tokens_per_cpu_s": round(cps, 3), "speedup_wall": round(speedup, 4),
                "speedup_cpu": round(cps / full_cps, 4),
                "free_running_agreement": round(free_running_match([list(r.output_ids) for r in reqs], full_out), 4),
                "teacher_forced_agreement": round(good / max(total, 1), 4),
                "exit_rate": round(float(counts[: model.num_layers - 1].sum() / max(counts.sum(), 1)), 4),
                "mean_exit_layer": round(float((counts * np.arange(len(counts))).sum() / max(counts.sum(), 1)), 3),
                "exit_counts": counts.tolist(), "exit_layers": layers,
                "ideal_speedup_modelled": round(ideal, 4), "exit_efficiency": round(speedup / ideal, 4),
                "row_positions": rows.tolist(), "row_positions_ratio_max": round(float(ratio.max()), 4),
                "row_positions_ratio_total": round(float(rows.sum() / max(full_rows.sum(), 1)), 4),
            }
        results[str(batch)] = {"costs_ms_modelled_inputs": {k: round(v, 4) if isinstance(v, float) else v
                                                           for k, v in vars(costs).items()},
                               "rows": rows_out}
    key = f"target={args.target:g}"
    pick = lambda b, s: results[b]["rows"].get(f"{s}/{key}", {})  # noqa: E731
    b1 = next(iter(results))
    best_strategy = max(strategies, key=lambda s: (pick(b1, s).get("free_running_agreement", 0) >= 0.95,
                                                   pick(b1, s).get("speedup_wall", 0)))
    main_rows = {b: pick(b, strategies[0]) for b in results}
    summary = {
        "model": args.model, "target": args.target, "kv_strategy": strategies[0],
        "heads_shipped": heads.origin == "shipped", "heads_source": heads.source,
        "speedup_wall_at_target": {f"batch{b}": r.get("speedup_wall") for b, r in main_rows.items()},
        "speedup_cpu_at_target": {f"batch{b}": r.get("speedup_cpu") for b, r in main_rows.items()},
        "free_running_agreement_at_target": main_rows[b1].get("free_running_agreement"),
        "teacher_forced_agreement_at_target": main_rows[b1].get("teacher_forced_agreement"),
        "ideal_speedup": {f"batch{b}": r.get("ideal_speedup_modelled") for b, r in main_rows.items()},
        "exit_efficiency": {f"batch{b}": r.get("exit_efficiency") for b, r in main_rows.items()},
        "row_positions_ratio": max(r["row_positions_ratio_max"] for b in results for r in results[b]["rows"].values()),
        "exit_rate_at_target": main_rows[b1].get("exit_rate"),
        "mean_exit_layer_at_target": main_rows[b1].get("mean_exit_layer"),
        "num_layers": model.num_layers,
        "frontier": {f"{t:g}": {f"batch{b}": {s: {k: results[b]["rows"].get(f"{s}/target={t:g}", {}).get(k)
                                                   for k in ("exit_rate", "speedup_wall", "free_running_agreement",
                                                             "teacher_forced_agreement")}
                                               for s in strategies} for b in results} for t in targets},
        "kv_strategy_comparison_at_target": {s: {f"batch{b}": {k: pick(b, s).get(k) for k in
                                                               ("speedup_wall", "free_running_agreement")}
                                                 for b in results} for s in strategies},
        "best_kv_strategy_at_target": best_strategy,
        "gap_to_1_5x": {f"batch{b}": round(1.5 - (r.get("speedup_wall") or 0), 4) for b, r in main_rows.items()},
    }
    out = {
        "summary": summary, "results_by_batch": results,
        "heads": {k: heads.manifest.get(k) for k in ("layers", "candidates", "head", "costs_ms", "seed", "provenance")},
        "targets": heads.manifest.get("targets"),
        "setup": {"model": args.model, "prompts": len(prompts), "max_prompt_tokens": args.max_prompt_tokens,
                  "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "threads": args.threads,
                  "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
                  "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                  "git_revision": git_revision(), "command": "python " + " ".join(sys.argv)},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    t0 = time.perf_counter()
    rc = main()
    print(f"done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    sys.exit(rc)
