"""The protocol every environment backend speaks, and what one control interval returns.

A backend owns the serving loop (the real engine, or the calibrated simulator) and nothing else;
the environment owns spaces, masks and rewards. Both backends are driven the same way::

    backend.reset(seed, config)          # fresh episode on the scenario's workload, seeded
    cost_s = backend.apply(config)       # at a step boundary; ValueError when infeasible
    interval = backend.advance(seconds)  # serve one control interval (virtual seconds)
    backend.finished                     # every request of the trace served
    backend.summary()                    # episode metrics (throughput, TTFT/TPOT p95)
    backend.close()                      # free the engine's memory
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from helios_rl.engine.config import ServingConfig
from helios_rl.engine.telemetry import TelemetrySnapshot

ENGINE_DIR = Path(__file__).resolve().parent.parent / "engine"


def engine_version() -> str:
    """Package version plus a hash of the engine's source, the calibration procedure and the step-time
    features: a profile is only valid for the engine (and the calibration and features) that measured it."""
    from helios_rl import __version__

    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    # profile.py defines the step-time features a profile's coefficients belong to: a fit of other features
    # read with these would price steps with the wrong coefficients
    for f in sorted(ENGINE_DIR.glob("*.py")) + [here / "calibrate.py", here / "profile.py",
                                             here.parent / "evaluation" / "probe.py",
                                             here.parent / "models" / "kernels.py"]:  # how products are computed
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return f"{__version__}+{h.hexdigest()[:12]}"


@dataclass
class Interval:
    """What one control interval produced: the engine's telemetry plus what the reward needs."""

    snapshot: TelemetrySnapshot
    slo_met: int = 0  # requests finished in the interval meeting the TTFT and TPOT SLO
    slo_missed: int = 0
    agreement: float | None = None  # free-running agreement of the requests finished (live: measured; sim: predicted)
    busy_s: float = 0.0  # seconds the engine computed (energy estimate)
    failure: str | None = None  # a real serving failure (terminates the episode)
    slo_met_tokens: int = 0  # output tokens of the requests counted in ``slo_met``
    # goodput: tokens of requests meeting the SLO *and* the quality floors (the simulator without noise: the
    # expected tokens, each request weighted by the share of its calibrated draws that meet the floors)
    good_tokens: float = 0
    extra: dict = field(default_factory=dict)


class Backend(Protocol):
    """One serving loop under control (see module docstring)."""

    models: tuple[str, ...]
    num_layers: dict[str, int]
    now: float

    def reset(self, seed: int, config: ServingConfig) -> None: ...

    def admissible(self, model: str, depth: int) -> int: ...

    def apply(self, config: ServingConfig) -> float: ...

    def advance(self, seconds: float) -> Interval: ...

    @property
    def finished(self) -> bool: ...

    def summary(self) -> dict: ...

    def close(self) -> None: ...


def percentile(values: list[float], q: float) -> float:
    """``numpy.percentile`` (linear) of a short list without numpy's per-call overhead."""
    if not values:
        return 0.0
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def percentiles(values: list[float], qs: tuple[float, ...]) -> list[float]:
    """Several percentiles of one list, sorting it once."""
    if not values:
        return [0.0] * len(qs)
    s = sorted(values)
    out = []
    for q in qs:
        pos = (len(s) - 1) * q / 100.0
        lo = math.floor(pos)
        hi = min(lo + 1, len(s) - 1)
        out.append(s[lo] + (s[hi] - s[lo]) * (pos - lo))
    return out


def episode_summary(ttfts: list[float], tpots: list[float], tokens: int, elapsed_s: float, served: int,
                    total: int, agreement: float | None = None) -> dict:
    """Episode metrics both backends report the same way (fidelity compares these). ``agreement``:
    free-running agreement of the served requests, token-weighted (measured live, predicted in sim)."""
    return {"tokens_per_s": tokens / elapsed_s if elapsed_s > 0 else 0.0, "ttft_p95": percentile(ttfts, 95),
            "tpot_p95": percentile(tpots, 95), "ttft_p50": percentile(ttfts, 50), "tpot_p50": percentile(tpots, 50),
            "output_tokens": tokens, "elapsed_s": elapsed_s, "served": served, "requests": total,
            "agreement": agreement}


def slo_window_s(workload, seed: int, slo) -> float:
    """Seconds from the episode's start within which every good token of workload ``seed`` is served: the latest
    over its requests of arrival + ``slo.ttft_s`` + (max new tokens - 1) x ``slo.tpot_s``. A request that meets
    the SLO finishes by then, so the window is fixed by the workload and the SLO, not by how fast a method serves;
    goodput over it is proportional to the good tokens served. (Goodput over the episode's own length is not: on a
    closed workload, serving the requests that will miss their targets fast and badly shortens the episode and
    raises that rate without serving one more request well.)"""
    arr, _, new = workload.arrays(seed)
    if not len(arr):
        raise ValueError(f"workload seed {seed} has no requests: the SLO window is undefined")
    return slo.window_end_s(arr, new)


def admissible_table(settings, model) -> list[int]:
    """The largest batch ``settings``' memory budget admits at each depth 1..L of the loaded ``model``, by the
    engine's own rule (weights, exit heads, prefill activations, KV slots, exit logits); the calibration and
    the live backend both take their batch caps from here."""
    from types import SimpleNamespace

    from helios_rl.engine.engine import Engine

    probe = SimpleNamespace(settings=settings)
    return [int(Engine.admissible_batch(probe, d, model)) for d in range(1, model.num_layers + 1)]


def thr_key(threshold: float | None) -> str:
    """Profile key of a threshold (``cal``: the calibrated per-layer thresholds)."""
    return "cal" if threshold is None else f"{float(threshold):.3f}"


def config_hash(folder: Path) -> str:
    """Hash of a model folder's ``config.json`` (a profile names the exact models it measured)."""
    return hashlib.sha256((Path(folder) / "config.json").read_bytes()).hexdigest()[:16]


def require_resolved_slo(scenario, who: str) -> None:
    """A backend scores requests against the SLO in seconds: one still written relative to the machine
    (``x_step``) would compare against NaN and fail every request silently, so it is refused."""
    if getattr(scenario, "rate_batch", None) is not None:
        raise ValueError(f"{who}: the scenario's arrival rates are multiples of the machine's capacity "
                         f"(workload.rate_unit) and not resolved; resolve them from a calibrated profile first "
                         f"(helios_rl.scenario.resolve_slo, as the environment does)")
    slo = scenario.slo
    if slo.relative:
        names = ", ".join(name for name, _, _ in slo.relative)
        raise ValueError(f"{who}: the scenario's SLO ({names}) is relative to the machine (x_step) and not resolved; "
                         f"resolve it from a calibrated profile first (helios_rl.scenario.resolve_slo, as the "
                         f"environment does)")
