"""Fidelity of the simulator: the same trace, seed and config sequence on both backends.

A controller (static, helios, random) drives the live backend, one ``decide`` per control interval;
the configs it applied, interval by interval, are then replayed on the simulator (no controller:
the same action sequence). Episode throughput, TTFT p95, TPOT p95 and goodput (what a leaderboard
scores: tokens of requests meeting the SLO and the quality floors, per second of the workload's SLO window,
the same on both backends) are compared as relative
errors ``|sim - live| / live``; agreement (free-running, measured on live, predicted by the
simulator) as the absolute difference.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Callable

from helios_rl.engine.config import ServingConfig
from helios_rl.engine.telemetry import TelemetrySnapshot

METRICS = {"throughput": "tokens_per_s", "ttft_p95": "ttft_p95", "tpot_p95": "tpot_p95", "goodput": "goodput_tps"}


def drive_controller(backend, controller, interval_s: float, seed: int, max_intervals: int = 100_000
                     ) -> tuple[dict, list[ServingConfig | None]]:
    """Serve the seed's trace under ``controller``; returns the episode summary and the config sequence."""
    controller.reset(seed)
    first = controller.decide(TelemetrySnapshot(time=0.0))
    if first is None or first.model is None:
        raise ValueError(f"controller {controller.name!r} must return a complete config first")
    backend.reset(seed, first)
    seq: list[ServingConfig | None] = [first]
    good = 0
    for _ in range(max_intervals):
        if backend.finished:
            break
        iv = backend.advance(interval_s)
        if iv.failure:
            raise RuntimeError(f"live backend failed: {iv.failure}")
        good += iv.good_tokens
        cfg = controller.decide(iv.snapshot)
        seq.append(cfg)
        if cfg is not None:
            try:
                backend.apply(cfg)
            except ValueError:
                seq[-1] = None  # the engine rejected it: the replay keeps the config too
    return _with_goodput(backend, seed, good), seq


def _with_goodput(backend, seed: int, good_tokens: float) -> dict:
    """The backend's summary with the episode's goodput: tokens of requests meeting the SLO and the quality floors,
    per second of the seed's SLO window (:func:`~helios_rl.env.backend.slo_window_s`)."""
    from helios_rl.env.backend import slo_window_s

    window = slo_window_s(backend.workload, seed, backend.scenario.slo)
    return {**backend.summary(), "goodput_tokens": float(good_tokens), "slo_window_s": window,
            "goodput_tps": good_tokens / window}


def replay_configs(backend, seq: list[ServingConfig | None], interval_s: float, seed: int,
                   max_intervals: int = 100_000) -> dict:
    """Serve the seed's trace applying ``seq`` (first entry: the initial config) interval by interval."""
    backend.reset(seed, seq[0])
    good = 0
    for k in range(1, max_intervals):
        if backend.finished:
            break
        good += backend.advance(interval_s).good_tokens
        cfg = seq[k] if k < len(seq) else None
        if cfg is not None:
            try:
                backend.apply(cfg)
            except ValueError:
                pass
    return _with_goodput(backend, seed, good)


def rel_err(sim: float, live: float) -> float:
    return abs(sim - live) / abs(live) if live else (0.0 if sim == live else 1.0)


def fidelity(scenario, profile_path: str, controllers: tuple[str, ...] = ("static", "helios", "random"),
             seed: int = 0, say: Callable[[str], None] = lambda s: None) -> dict:
    """Run ``controllers`` on the live backend, replay their configs on the simulator, compare."""
    from helios_rl.controllers import ControllerContext, make_controller
    from helios_rl.env.live import LiveBackend
    from helios_rl.env.profile import SimProfile
    from helios_rl.env.sim import SimBackend
    from helios_rl.env.workload import EpisodeWorkload
    from helios_rl.evaluation.profiling import ensure_repository
    from helios_rl.evaluation.runtime import set_threads
    from helios_rl.env.profile import resolve_scenario

    prof = SimProfile.load(profile_path)
    prof.check(scenario, str(profile_path))
    # relative SLOs (x_step) in seconds on this machine, from the profile, as the environment resolves them
    sc, reference = resolve_scenario(scenario, prof)
    work = EpisodeWorkload(sc)
    prev = set_threads(sc.engine.threads)
    live = LiveBackend(sc, work, profile=profile_path if sc.backend.drift == "probe" else None)
    sim = SimBackend(prof, sc, work, noise=False)
    interval = sc.backend.interval_s
    profiles = ensure_repository(sc, live.loader, live.timer, say)
    ctx = ControllerContext.for_scenario(sc, profiles)
    out: dict = {"scenario": sc.name, "seed": seed, "interval_s": interval, "slo": {**asdict(sc.slo), "reference": reference},
                 "controllers": {}}
    try:
        for name in controllers:
            ctrl = make_controller(name, ctx, sc.params(name))
            t0 = time.perf_counter()
            live_sum, seq = drive_controller(live, ctrl, interval, seed)
            live_wall = time.perf_counter() - t0
            t0 = time.perf_counter()
            sim_sum = replay_configs(sim, seq, interval, seed)
            sim_wall = time.perf_counter() - t0
            errs = {k: rel_err(sim_sum[v], live_sum[v]) for k, v in METRICS.items()}
            if live_sum.get("agreement") is not None and sim_sum.get("agreement") is not None:
                errs["agreement_abs"] = abs(sim_sum["agreement"] - live_sum["agreement"])
            out["controllers"][name] = {"live": live_sum, "sim": sim_sum, "rel_err": errs, "intervals": len(seq),
                                        "live_wall_s": live_wall, "sim_wall_s": sim_wall,
                                        "applied": sum(c is not None for c in seq[1:])}
            say(f"{name}: " + ", ".join(f"{k} live {live_sum[v]:.4g} sim {sim_sum[v]:.4g} (err {errs[k]:.1%})"
                                       for k, v in METRICS.items()))
    finally:
        live.close()
        set_threads(prev)
    n = len(out["controllers"])
    out["mean_rel_err"] = {k: sum(c["rel_err"][k] for c in out["controllers"].values()) / n for k in METRICS}
    agree = [c["rel_err"]["agreement_abs"] for c in out["controllers"].values() if "agreement_abs" in c["rel_err"]]
    out["agreement_abs_err"] = {name: c["rel_err"].get("agreement_abs") for name, c in out["controllers"].items()}
    out["mean_agreement_abs_err"] = sum(agree) / len(agree) if agree else None
    return out
