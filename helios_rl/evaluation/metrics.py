"""Per-run metrics from a :class:`ReplayResult`, seed aggregation and the HELIOS-vs-static summary.

Times are virtual seconds (measured compute; see :mod:`.runtime`). Definitions:

* ``tokens_per_s`` / ``requests_per_s``: output tokens (requests) served over the makespan, first
  arrival to last finish.
* ``goodput_rps`` / ``goodput_tokens_per_s``: requests (output tokens) that met the SLO (TTFT <= ``slo.ttft_s``
  and TPOT <= ``slo.tpot_s``) per second of the workload's SLO window: first arrival to the latest moment any
  request could still meet the SLO (its arrival + ``ttft_s`` + (max new tokens - 1) x ``tpot_s``). The window is
  fixed by the workload and the SLO, so these are proportional to what was served well; over the makespan
  (``goodput_rps_makespan``, printed beside) a controller that finishes the requests it will miss fast and badly
  shortens the run and raises the rate without serving one more request well. ``slo_attainment`` is their share.
* ``batch_mean`` / ``batch_max``: rows per decode step actually run; ``batch_cap_max``: the largest
  batch cap in force (what the budget admitted for the chosen config).
* ``resident_*``: weights + KV held, time-weighted mean and peak.
* ``agreement`` (free-running): share of output tokens equal to the serving model's own full-depth
  greedy continuation; ``teacher_forced_agreement``: equal to its greedy choice on the same prefix;
  ``reference_ppl``: perplexity of the served text under the scenario's reference model (see
  :mod:`.scorer`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from helios_rl.controllers.base import SLO
from helios_rl.evaluation.accuracy import Accuracy
from helios_rl.evaluation.replay import ReplayResult


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def slo_window_s(requests: list, slo: SLO) -> float:
    """Seconds from the first arrival to the latest moment any of ``requests`` could still meet ``slo`` (its
    arrival + ``ttft_s`` + (max new tokens - 1) x ``tpot_s``): the goodput window, the same for every controller
    on a workload (see the module docstring)."""
    if not requests:
        raise ValueError("no requests: the SLO window is undefined")
    missing = [r.request_id for r in requests if r.max_new_tokens is None]
    if missing:
        raise ValueError(f"requests {missing[:3]} carry no max_new_tokens: the SLO window cannot be computed")
    arrivals = [r.arrival for r in requests]
    return slo.window_end_s(arrivals, [r.max_new_tokens for r in requests]) - min(arrivals)


def run_metrics(res: ReplayResult, slo: SLO, accuracy: Accuracy | None = None) -> dict[str, Any]:
    """Metrics of one replay; ``accuracy`` when the output was scored against the full models."""
    served = [r for r in res.requests if r.error is None and r.finish is not None]
    out: dict[str, Any] = {"requests": len(res.requests), "served": len(served),
                           "rejected": sum(1 for r in res.requests if r.error is not None)}
    if served:
        t0 = min(r.arrival for r in res.requests)
        span = max(max(r.finish for r in served) - t0, 1e-9)
    else:
        span = float("nan")
    tokens = sum(r.output_tokens for r in served)
    ok = [r for r in served if (r.ttft or 0.0) <= slo.ttft_s and (r.tpot is None or r.tpot <= slo.tpot_s)]
    ttft = [r.ttft for r in served if r.ttft is not None]
    tpot = [r.tpot for r in served if r.tpot is not None]
    lat = [r.latency for r in served]
    window = slo_window_s(res.requests, slo)
    out.update(makespan_s=span, output_tokens=tokens, tokens_per_s=tokens / span, requests_per_s=len(served) / span,
               slo_window_s=window, goodput_rps=len(ok) / window,
               goodput_tokens_per_s=sum(r.output_tokens for r in ok) / window, goodput_rps_makespan=len(ok) / span,
               slo_attainment=len(ok) / len(served) if served else float("nan"))
    for name, vals in (("ttft", ttft), ("tpot", tpot), ("latency", lat)):
        for q in (50, 95, 99):
            out[f"{name}_p{q}"] = _pct(vals, q)
    batches = [s["tokens"] for s in res.steps if s["tokens"]]
    out["batch_mean"] = float(np.mean(batches)) if batches else 0.0
    out["batch_max"] = int(max(batches)) if batches else 0
    out["batch_cap_max"] = int(max(e["max_batch"] for e in res.timeline))
    out.update(_memory(res.timeline, res.virtual_s))
    e = res.energy
    out.update(energy_j=e["joules"], tokens_per_joule=tokens / e["joules"] if e["joules"] > 0 else float("nan"),
               cpu_s=e["cpu_s"], energy_method=e["method"])
    out["switches"] = int(res.telemetry.get("switches", 0))
    out["loads"] = int(res.telemetry.get("loads", 0))
    out["preemptions"] = int(sum(r.preemptions for r in served))
    out["breaches"] = int(sum(s["breaches"] for s in res.steps))
    out["breach_rate"] = out["breaches"] / max(1, sum(s["tokens"] for s in res.steps))
    exits = {}
    for model, counts in res.exit_counts.items():
        c = np.asarray(counts, dtype=float)
        exits[model] = {"tokens": int(c.sum()), "mean_exit_layer": float((c * np.arange(c.size)).sum() / c.sum())
                        if c.sum() else float("nan"), "num_layers": int(c.size)}
    out["exits"] = exits
    if accuracy is not None:  # the accuracy contract (helios_rl.evaluation.scorer)
        n = accuracy.tokens
        nan = float("nan")
        out.update(agreement=accuracy.match / n if n else nan,
                   teacher_forced_agreement=accuracy.teacher_forced if accuracy.teacher_forced is not None else nan,
                   reference_ppl=accuracy.reference_ppl if accuracy.reference_ppl is not None else nan,
                   scored_tokens=n)
    out["wall_s"] = res.wall_s
    out["virtual_s"] = res.virtual_s
    return out


def _memory(timeline: list[dict], end: float) -> dict[str, float]:
    """Time-weighted mean and peak of resident bytes (piecewise constant between samples)."""
    if not timeline:
        return {"resident_mean_bytes": 0.0, "resident_peak_bytes": 0, "weight_mean_bytes": 0.0, "kv_mean_bytes": 0.0}
    out = {}
    for key in ("resident_bytes", "weight_bytes", "kv_bytes"):
        total = dur = 0.0
        for a, b in zip(timeline, timeline[1:] + [{"t": max(end, timeline[-1]["t"])}]):
            dt = max(0.0, b["t"] - a["t"])
            total += a[key] * dt
            dur += dt
        out[key.replace("_bytes", "_mean_bytes")] = total / dur if dur > 0 else float(timeline[-1][key])
    out["resident_peak_bytes"] = int(max(e["resident_bytes"] for e in timeline))
    return out


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean of every numeric metric over seeds (``<key>_std`` alongside when there are several)."""
    out: dict[str, Any] = {}
    for key, val in runs[0].items():
        if isinstance(val, (int, float)) and not isinstance(val, bool):
            vals = np.asarray([r[key] for r in runs], dtype=float)
            out[key] = float(np.nanmean(vals)) if not np.all(np.isnan(vals)) else float("nan")
            if len(runs) > 1:
                out[f"{key}_std"] = float(np.nanstd(vals))
        else:
            out[key] = val  # non-numeric (method strings, per-model exit stats): the first seed's
    out["seeds"] = len(runs)
    return out


def summary(per_controller: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Ratios of HELIOS to the static baseline (and the best static), when both were run."""
    out: dict[str, Any] = {}
    h, s = per_controller.get("helios"), per_controller.get("static")
    for name, m in per_controller.items():
        if "agreement" in m:
            out[f"{name.replace('-', '_')}_agreement"] = m["agreement"]
    if h is None or s is None:
        return out

    def ratio(a: float, b: float) -> float:
        return a / b if b and not math.isnan(b) and not math.isnan(a) else float("nan")

    out["helios_vs_static_throughput"] = ratio(h["tokens_per_s"], s["tokens_per_s"])
    out["helios_vs_static_max_batch"] = ratio(h["batch_max"], s["batch_max"])
    out["helios_vs_static_batch_cap"] = ratio(h["batch_cap_max"], s["batch_cap_max"])
    out["helios_vs_static_goodput"] = ratio(h["goodput_rps"], s["goodput_rps"])
    out["helios_vs_static_latency_p50"] = ratio(s["latency_p50"], h["latency_p50"])  # > 1: HELIOS faster
    out["helios_vs_static_energy_efficiency"] = ratio(h["tokens_per_joule"], s["tokens_per_joule"])
    out["helios_vs_static_memory"] = ratio(h["resident_mean_bytes"], s["resident_mean_bytes"])
    if "agreement" in h and "agreement" in s:
        out["agreement_gap"] = s["agreement"] - h["agreement"]
        out["helios_teacher_forced"] = h["teacher_forced_agreement"]
        out["static_teacher_forced"] = s["teacher_forced_agreement"]
    b = per_controller.get("best-static")
    if b is not None:
        out["helios_vs_best_static_throughput"] = ratio(h["tokens_per_s"], b["tokens_per_s"])
    return out
