"""Benchmark: engine throughput and agreement with trained exit heads vs full depth (issue #3).

Generates greedily (EOS ignored) from held-out real prompts (news/wiki completion, summarisation,
ShareGPT chat; never seen by ``tune-exits``) at full depth and with the tuned exits at several
calibrated agreement targets (and optional uniform thresholds), same prompts, same batch cap, runs
interleaved and repeated so a shared CPU's load hits every config alike (median tokens/s reported).
Agreement is teacher-forced: each generated token is compared with the full model's argmax given
the same prefix. Throughput is reported two ways: engine tokens per wall-clock second, and tokens per
second of the process's CPU time (single-threaded by default), which other users' load on a shared
CPU distorts much less; the summary's ``speedup_at_target`` uses the CPU-time figure and
``speedup_at_target_wall`` the wall-clock one.

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

import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", required=True, help="JSON results file")
    p.add_argument("--heads", default="auto", help="auto (the model's tuned heads) or a heads folder")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-prompt-tokens", type=int, default=96)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batches", default="1", help="comma-separated batch caps; the first is the summary's")
    p.add_argument("--targets", default="0.9,0.95,0.98", help="calibrated agreement targets to run")
    p.add_argument("--target", type=float, default=0.95, help="the target the summary reports")
    p.add_argument("--uniform", default="", help="comma-separated uniform thresholds to run as well")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is steadiest on a shared CPU)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def what_limits(manifest: dict, num_layers: int) -> dict:
    """The batch-1 cost model from ``tune-exits``' timings: where a token's time goes at full depth, what
    an exit at each selected layer saves, and the what-if of an exit at the last layer."""
    c = manifest.get("costs_ms") or {}
    if not c:
        return {}
    full = num_layers * c["layer"] + c["final_head"]
    out = {"full_token_ms": round(full, 2), "lm_head_share": round(c["final_head"] / full, 3),
           "exit_eval_in_layers": round(c["exit_eval"] / c["layer"], 2),
           "saving_if_exit_at": {str(l): round(1 - ((l + 1) * c["layer"] + c["exit_eval"]) / full, 3)
                                 for l in manifest.get("layers", [])}}
    what_if = manifest.get("metrics", {}).get("last_layer_exit_what_if")
    if what_if:
        out["last_layer_exit_what_if"] = what_if
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from helios_rl.engine.config import EngineSettings, ServingConfig
    from helios_rl.engine.engine import Engine
    from helios_rl.exits.heads import TunedExitHeads
    from helios_rl.exits.heads_io import enabled_layers
    from helios_rl.exits.profile import exit_profile, heldout_prompts
    from helios_rl.models.registry import load_model

    model = load_model(args.model, heads=args.heads)
    if not isinstance(model.heads, TunedExitHeads):
        print(f"{args.model}: no tuned exit heads; run `helios-rl tune-exits {args.model}` first", file=sys.stderr)
        return 2
    manifest = model.heads.manifest
    layers = enabled_layers(model)
    prompts = heldout_prompts(model, args.prompts, args.max_prompt_tokens, args.seed)
    targets = [float(t) for t in args.targets.split(",") if t]
    if args.target not in targets:
        targets.append(args.target)
    by_target = manifest.get("thresholds_by_target", {})
    configs: dict[str, ServingConfig] = {"full": ServingConfig(exit_layers=())}
    for t in targets:
        table = by_target.get(str(t), {}).get("max_prob")
        if table is None:
            print(f"manifest has no thresholds for target {t}; skipped", file=sys.stderr)
            continue
        thr = {int(l): v for l, v in table.items() if v < 1.0}
        configs[f"target={t}"] = ServingConfig(exit_layers=tuple(sorted(thr)), threshold=thr or None)
    for u in [float(x) for x in args.uniform.split(",") if x]:
        configs[f"uniform={u}"] = ServingConfig(exit_layers=layers or tuple(sorted(model.heads.adapters)), threshold=u)
    results: dict = {}
    for batch in [int(b) for b in args.batches.split(",")]:
        engine = Engine(model, EngineSettings(max_batch=batch, max_model_len=args.max_prompt_tokens + args.max_new_tokens + 64))
        exit_profile(engine, prompts[:2], configs["full"], max_new_tokens=4)  # warm-up
        runs: dict[str, list] = {name: [] for name in configs}
        for rep in range(args.repeats):
            for name, cfg in configs.items():
                prof = exit_profile(engine, prompts, cfg, max_new_tokens=args.max_new_tokens,
                                    measure_agreement=(rep == 0 and name != "full"))
                runs[name].append(prof)
                print(f"batch {batch} rep {rep} {name:>14}: {prof.tokens_per_s:6.2f} tok/s wall, "
                      f"{prof.tokens_per_cpu_s:6.2f} tok/cpu-s, mean exit layer "
                      f"{prof.mean_exit_layer:5.2f}, exit rate {prof.exit_rate:.3f}, agreement {prof.agreement}",
                      flush=True)
        full_out = runs["full"][0].outputs
        rows = {}
        for name, profs in runs.items():
            p0 = profs[0]
            same = sum(a == b for o, f in zip(p0.outputs, full_out) for a, b in zip(o, f))
            rows[name] = {
                "tokens_per_s": statistics.median(p.tokens_per_s for p in profs),
                "tokens_per_s_runs": [round(p.tokens_per_s, 3) for p in profs],
                "tokens_per_cpu_s": statistics.median(p.tokens_per_cpu_s for p in profs),
                "tokens_per_cpu_s_runs": [round(p.tokens_per_cpu_s, 3) for p in profs],
                "agreement_teacher_forced": 1.0 if name == "full" else p0.agreement,
                "same_as_full_output": same / max(p0.tokens, 1),
                "mean_exit_layer": p0.mean_exit_layer, "exit_rate": p0.exit_rate, "exit_counts": p0.exit_counts,
                "exit_layers": p0.exit_layers, "thresholds": {str(k): v for k, v in p0.thresholds.items()},
                "tokens": p0.tokens,
            }
            full = rows.get("full", rows[name])
            rows[name]["speedup_wall"] = rows[name]["tokens_per_s"] / full["tokens_per_s"]
            rows[name]["speedup"] = rows[name]["tokens_per_cpu_s"] / full["tokens_per_cpu_s"]
        results[str(batch)] = rows
    first = results[args.batches.split(",")[0]]
    at = first.get(f"target={args.target}", {})
    summary = {
        "speedup_at_target": round(at.get("speedup", float("nan")), 4),
        "speedup_at_target_wall": round(at.get("speedup_wall", float("nan")), 4),
        "agreement_at_target": at.get("agreement_teacher_forced"),
        "mean_exit_layer": at.get("mean_exit_layer"),
        "exit_rate_at_target": at.get("exit_rate"),
        "precision_gain_vs_shared": manifest.get("metrics", {}).get("precision_gain_vs_shared"),
        "target": args.target, "batch": int(args.batches.split(",")[0]),
        "full_tokens_per_s": first["full"]["tokens_per_s"], "target_tokens_per_s": at.get("tokens_per_s"),
        "full_tokens_per_cpu_s": first["full"]["tokens_per_cpu_s"], "target_tokens_per_cpu_s": at.get("tokens_per_cpu_s"),
        "exit_layers": at.get("exit_layers"), "num_layers": model.num_layers,
    }
    out = {
        "summary": summary,
        "results_by_batch": results,
        "heads": {k: manifest.get(k) for k in ("layers", "candidates", "head", "costs_ms", "seed")},
        "heads_metrics": {k: v for k, v in manifest.get("metrics", {}).items() if k not in ("per_layer",)},
        "what_limits": what_limits(manifest, model.num_layers),
        "setup": {"model": args.model, "prompts": len(prompts), "max_prompt_tokens": args.max_prompt_tokens,
                  "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "threads": args.threads,
                  "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
                  "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                  "command": "python " + " ".join(sys.argv)},
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
