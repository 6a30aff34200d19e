"""Telemetry: one record per engine step, and the snapshot every layer above reads.

Controllers, the Gymnasium environment, the evaluation harness and the server all read
:class:`TelemetrySnapshot` and nothing else, so a controller sees the same thing everywhere.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class StepRecord:
    """What one ``Engine.step()`` did."""

    step: int
    t_start: float
    duration: float
    model: str
    depth: int
    prefill_tokens: int
    decode_tokens: int
    exit_counts: np.ndarray  # tokens that exited at each layer (len = model's layer count)
    greedy_exits: int  # tokens that reached the last loaded layer without passing a threshold
    breaches: int  # greedy exits while the loaded depth is below the model's full depth
    conf_sum: float
    conf_n: int
    running: int
    waiting: int
    finished: int
    exit_mode: str = "confidence"  # "replay": exits replayed from a measured distribution, not decided
    energy_j: float | None = None  # GPU energy over the step (NVML counter); None where not measured
    row_positions: np.ndarray | None = None  # positions each layer ran (packed windows: real ones only)
    prefill_rows: int = 0  # requests in the step's prefill pass (each reads out the final head)
    prefill_done: int = 0  # of those, the ones whose prompt completed (their first token is in exit_counts)
    prefill_wall_s: float = 0.0  # the step's prefill pass alone: wall seconds (part of ``duration``)
    prefill_cpu_s: float = 0.0  # ... and process CPU seconds (the drift correction prices it apart)
    cap_wait: bool = False  # after admission, requests waited while the running batch was at the batch cap


@dataclass
class RequestRecord:
    request_id: str
    arrival: float
    ttft: float | None
    tpot: float | None
    latency: float
    output_tokens: int
    finish_reason: str


def _tail(records: deque, since: float | None, key) -> list:
    """Records with ``key >= since``, read from the newest end (records arrive in time order), so a
    windowed snapshot costs the window, not the whole history."""
    if since is None:
        return list(records)
    out = []
    for rec in reversed(records):
        if key(rec) < since:
            break
        out.append(rec)
    out.reverse()
    return out


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


@dataclass
class TelemetrySnapshot:
    """Aggregated telemetry over a window of steps (see :meth:`Telemetry.snapshot`)."""

    time: float = 0.0
    window_s: float = 0.0
    steps: int = 0
    model: str = ""
    depth: int = 0
    num_layers: int = 0
    max_batch: int = 0
    running: int = 0
    waiting: int = 0
    batch_mean: float = 0.0
    batch_max: int = 0
    exit_counts: list[int] = field(default_factory=list)
    row_positions: list[int] = field(default_factory=list)  # positions run per layer (prefill + decode)
    mean_exit_layer: float = 0.0
    greedy_exits: int = 0
    breaches: int = 0
    breach_rate: float = 0.0
    conf_mean: float = 0.0
    output_tokens: int = 0
    prefill_tokens: int = 0
    tokens_per_s: float = 0.0
    requests_finished: int = 0
    arrivals: int = 0
    ttft_p50: float = 0.0
    ttft_p95: float = 0.0
    ttft_p99: float = 0.0
    tpot_p50: float = 0.0
    tpot_p95: float = 0.0
    tpot_p99: float = 0.0
    resident_bytes: int = 0
    weight_bytes: int = 0
    kv_bytes: int = 0
    budget_bytes: int | None = None
    memory_peak_bytes: int = 0  # the largest footprint at any config change so far (transients included)
    switches: int = 0
    loads: int = 0
    cap_waits: int = 0  # steps in the window at which requests waited with the batch at its cap (the cap bound)
    energy_j: float | None = None  # NVML-measured GPU joules over the window's steps (None: not measured)
    exit_mode: str = "confidence"

    def to_dict(self) -> dict:
        return asdict(self)


class Telemetry:
    """Collects step and request records; ``snapshot`` aggregates them over a window."""

    def __init__(self, max_records: int = 100_000) -> None:
        self.steps: deque[StepRecord] = deque(maxlen=max_records)
        self.requests: deque[RequestRecord] = deque(maxlen=max_records)
        self.arrival_times: deque[float] = deque(maxlen=max_records)
        self.switches = 0
        self.loads = 0
        self.total_output_tokens = 0
        self.total_breaches = 0
        self.memory_peak = 0  # the largest engine footprint noted at a config change (weights, heads, KV)

    def memory_note(self, nbytes: int) -> None:
        self.memory_peak = max(self.memory_peak, int(nbytes))

    def record_step(self, rec: StepRecord) -> None:
        self.steps.append(rec)
        self.total_output_tokens += rec.decode_tokens
        self.total_breaches += rec.breaches

    def record_request(self, rec: RequestRecord) -> None:
        self.requests.append(rec)

    def record_arrival(self, t: float) -> None:
        self.arrival_times.append(t)

    def snapshot(self, since: float | None = None, now: float | None = None, **state) -> TelemetrySnapshot:
        """Aggregate records with start time >= ``since`` (all when None); ``state`` fills current values."""
        steps = _tail(self.steps, since, lambda s: s.t_start)
        reqs = [r for r in _tail(self.requests, since, lambda r: r.arrival + r.latency)
                if since is None or r.arrival + r.latency >= since]
        snap = TelemetrySnapshot(**state)
        snap.steps = len(steps)
        if now is not None:
            snap.time = now
        if steps:
            t0 = since if since is not None else steps[0].t_start
            t1 = now if now is not None else steps[-1].t_start + steps[-1].duration
            snap.window_s = max(t1 - t0, 1e-9)
            busy = sum(s.duration for s in steps)
            n_layers = max(len(s.exit_counts) for s in steps)
            counts = np.zeros(n_layers, dtype=np.int64)
            for s in steps:
                counts[: len(s.exit_counts)] += s.exit_counts
            snap.exit_counts = counts.tolist()
            rows = np.zeros(n_layers, dtype=np.int64)
            for s in steps:
                if s.row_positions is not None:
                    rows[: len(s.row_positions)] += s.row_positions
            snap.row_positions = rows.tolist()
            total = counts.sum()
            snap.mean_exit_layer = float((counts * np.arange(n_layers)).sum() / total) if total else 0.0
            snap.greedy_exits = sum(s.greedy_exits for s in steps)
            snap.breaches = sum(s.breaches for s in steps)
            dec = sum(s.decode_tokens for s in steps)
            snap.breach_rate = snap.breaches / dec if dec else 0.0
            cn = sum(s.conf_n for s in steps)
            snap.conf_mean = sum(s.conf_sum for s in steps) / cn if cn else 0.0
            snap.output_tokens = dec
            snap.prefill_tokens = sum(s.prefill_tokens for s in steps)
            snap.tokens_per_s = dec / snap.window_s if since is not None else dec / max(busy, 1e-9)
            batches = [s.decode_tokens for s in steps if s.decode_tokens]
            snap.batch_mean = float(np.mean(batches)) if batches else 0.0
            snap.batch_max = max(batches) if batches else 0
            snap.cap_waits = sum(1 for s in steps if s.cap_wait)
            energies = [s.energy_j for s in steps if s.energy_j is not None]
            snap.energy_j = float(sum(energies)) if energies else None
        snap.requests_finished = len(reqs)
        snap.arrivals = len(_tail(self.arrival_times, since, lambda t: t))
        ttfts = [r.ttft for r in reqs if r.ttft is not None]
        tpots = [r.tpot for r in reqs if r.tpot is not None]
        snap.ttft_p50, snap.ttft_p95, snap.ttft_p99 = (_pct(ttfts, q) for q in (50, 95, 99))
        snap.tpot_p50, snap.tpot_p95, snap.tpot_p99 = (_pct(tpots, q) for q in (50, 95, 99))
        snap.switches, snap.loads = self.switches, self.loads
        snap.memory_peak_bytes = self.memory_peak
        return snap
