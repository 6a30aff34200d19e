"""The control plane: controllers run beside the engine loop, time-bounded, with a fallback and a shadow.

Every control interval the engine thread hands a telemetry snapshot to :meth:`ControlPlane.offer`
and goes on stepping; it never waits for a controller. The control thread gives the snapshot to each
controller, each on its own worker thread, and waits at most ``deadline_s`` for the primary. A primary
that raises, misses the deadline (or is still stuck in an earlier call), or returns a config that the
feasibility check refuses is replaced *for that decision* by the fallback's answer to the same
snapshot (the fallback sees every snapshot, so its state stays current); the reason is counted in
``helios_controller_fallbacks_total``. The resulting :class:`Decision` goes back to the engine thread,
which applies it at a step boundary. A shadow controller sees the same snapshots; its decisions are
logged (JSONL, one atomic append per decision) next to what was applied, never applied.

A Python thread cannot be killed: a controller that hangs keeps its worker busy, and every later
decision is the fallback's ("busy") until it returns.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np

from helios_rl.engine.config import ServingConfig
from helios_rl.engine.telemetry import TelemetrySnapshot
from helios_rl.server.metrics import ServerMetrics

#: ``check(config) -> None`` when the engine can apply it, else the reason it cannot.
FeasibilityCheck = Callable[[ServingConfig], "str | None"]


@runtime_checkable
class DecisionMaker(Protocol):
    """What the server needs of a controller (``helios_rl.controllers.Controller`` satisfies it)."""

    name: str

    def decide(self, telemetry: TelemetrySnapshot) -> ServingConfig | None: ...

    def reset(self, seed: int | None = None) -> None: ...


@dataclass
class Decision:
    """What the control plane decided for one snapshot."""

    config: ServingConfig | None
    source: str  # "primary" or "fallback"
    controller: str
    reason: str | None = None  # why the fallback decided (error / timeout / busy / infeasible: ...)
    decide_s: float = 0.0
    time: float = 0.0


class _Fail(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


class _Worker:
    """One controller on its own thread; the caller bounds how long it waits for an answer."""

    def __init__(self, ctrl: DecisionMaker, label: str) -> None:
        self.ctrl = ctrl
        self.label = label
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"helios-ctrl-{label}")
        self.future: Future | None = None

    @property
    def name(self) -> str:
        return str(getattr(self.ctrl, "name", type(self.ctrl).__name__))

    def submit(self, snap: TelemetrySnapshot) -> Future | None:
        """Start ``decide(snap)``; None when the previous call has not returned yet."""
        if self.future is not None and not self.future.done():
            return None
        self.future = self.pool.submit(self._timed, snap)
        return self.future

    def _timed(self, snap: TelemetrySnapshot) -> tuple[ServingConfig | None, float, float]:
        t0, c0 = time.perf_counter(), time.thread_time()
        cfg = self.ctrl.decide(snap)
        return cfg, time.perf_counter() - t0, time.thread_time() - c0

    def result(self, fut: Future | None, timeout: float) -> tuple[ServingConfig | None, float, float]:
        """``(config, wall seconds, CPU seconds)`` of the call, or :class:`_Fail` saying why there is none."""
        if fut is None:
            raise _Fail("busy", f"{self.name} is still running an earlier decision")
        try:
            cfg, dt, cpu = fut.result(timeout=timeout)
        except FutureTimeout:
            raise _Fail("timeout", f"{self.name} took longer than {timeout * 1e3:.1f} ms") from None
        except Exception as exc:  # noqa: BLE001 - any controller error is replaced by the fallback
            raise _Fail("error", f"{self.name}: {type(exc).__name__}: {exc}") from None
        if cfg is not None and not isinstance(cfg, ServingConfig):
            raise _Fail("infeasible", f"{self.name} returned {type(cfg).__name__}, not a ServingConfig")
        return cfg, dt, cpu

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class ShadowLog:
    """JSONL decision log; each record is one ``write`` on an ``O_APPEND`` descriptor (atomic append)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        data = (json.dumps(record, default=str, separators=(",", ":")) + "\n").encode()
        with self._lock:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]

    def close(self) -> None:
        with self._lock:
            os.close(self._fd)


def _config_dict(cfg: ServingConfig | None) -> dict | None:
    return None if cfg is None else cfg.to_dict()


class ControlPlane:
    """Primary + fallback (+ shadow) controllers behind a deadline; see the module docstring."""

    def __init__(self, primary: DecisionMaker, fallback: DecisionMaker | None, check: FeasibilityCheck,
                 metrics: ServerMetrics, deadline_s: float = 0.05, shadow: DecisionMaker | None = None,
                 shadow_log: ShadowLog | None = None, seed: int = 0) -> None:
        self.check = check
        self.metrics = metrics
        self.deadline_s = float(deadline_s)
        self.primary = _Worker(primary, "primary")
        self.fallback = _Worker(fallback, "fallback") if fallback is not None else None
        self.shadow = _Worker(shadow, "shadow") if shadow is not None else None
        self.shadow_log = shadow_log
        for w in self._workers():
            w.ctrl.reset(seed)
        self.decide_times: deque[float] = deque(maxlen=100_000)  # primary decide(): wall seconds
        self.decide_cpu: deque[float] = deque(maxlen=100_000)  # ... and its thread's CPU seconds
        self.fallback_reasons: dict[str, int] = {}
        self.last_rejection: dict | None = None
        self.decisions = 0
        self.last: Decision | None = None
        self._mailbox: queue.Queue[TelemetrySnapshot | None] = queue.Queue(maxsize=1)
        self._sink: Callable[[Decision], None] | None = None
        self._thread: threading.Thread | None = None

    def _workers(self) -> list[_Worker]:
        return [w for w in (self.primary, self.fallback, self.shadow) if w is not None]

    @property
    def names(self) -> tuple[str, str | None, str | None]:
        return (self.primary.name, self.fallback.name if self.fallback else None,
                self.shadow.name if self.shadow else None)

    # ------------------------------------------------------------------ deciding
    def decide(self, snap: TelemetrySnapshot, deadline_s: float | None = None) -> Decision:
        """One bounded decision for ``snap`` (see module docstring); never raises for a controller's fault."""
        deadline = self.deadline_s if deadline_s is None else deadline_s
        futures = {w.label: w.submit(replace(snap)) for w in self._workers()}
        decision = self._bounded(self.primary, futures["primary"], deadline, "primary", snap)
        if decision.reason is not None:
            self.fallback_reasons[decision.reason.split(":")[0]] = \
                self.fallback_reasons.get(decision.reason.split(":")[0], 0) + 1
            self.metrics.fallbacks.labels(decision.reason.split(":")[0]).inc()
            if self.fallback is not None:
                fb = self._bounded(self.fallback, futures["fallback"], deadline, "fallback", snap)
                decision = replace(fb, source="fallback", reason=decision.reason,
                                   config=fb.config if fb.reason is None else None)
            else:
                decision = replace(decision, source="fallback", controller="none", config=None)
        elif self.fallback is not None and futures["fallback"] is not None:
            self._drain(self.fallback, futures["fallback"], deadline)
        if self.shadow is not None:
            self._log_shadow(futures["shadow"], snap, decision, deadline)
        self.decisions += 1
        self.last = decision
        return decision

    def _bounded(self, worker: _Worker, fut: Future | None, deadline: float, source: str,
                 snap: TelemetrySnapshot) -> Decision:
        try:
            cfg, dt, cpu = worker.result(fut, deadline)
        except _Fail as fail:
            return Decision(None, source, worker.name, f"{fail.reason}: {fail.detail}", deadline, snap.time)
        self.metrics.decision_seconds.labels(worker.name).observe(dt)
        if source == "primary":
            self.decide_times.append(dt)
            self.decide_cpu.append(cpu)
        if cfg is not None:
            problem = self.check(cfg)
            if problem is not None:
                return Decision(None, source, worker.name, f"infeasible: {problem}", dt, snap.time)
        return Decision(cfg, source, worker.name, None, dt, snap.time)

    def _drain(self, worker: _Worker, fut: Future, deadline: float) -> None:
        """Let the unused fallback answer (so its worker is free next time), recording its time."""
        try:
            _, dt, _ = worker.result(fut, deadline)
            self.metrics.decision_seconds.labels(worker.name).observe(dt)
        except _Fail:
            pass

    def _log_shadow(self, fut: Future | None, snap: TelemetrySnapshot, applied: Decision, deadline: float) -> None:
        rec: dict[str, Any] = {"wall_time": round(time.time(), 6), "t": round(snap.time, 6),
                               "shadow": self.shadow.name, "decision": None, "decide_ms": None, "error": None,
                               "applied": _config_dict(applied.config), "applied_by": applied.controller,
                               "applied_source": applied.source,
                               "state": {"model": snap.model, "depth": snap.depth, "running": snap.running,
                                         "waiting": snap.waiting, "tokens_per_s": round(snap.tokens_per_s, 3),
                                         "breaches": snap.breaches}}
        try:
            cfg, dt, _ = self.shadow.result(fut, deadline)
            rec["decision"], rec["decide_ms"] = _config_dict(cfg), round(dt * 1e3, 4)
            self.metrics.decision_seconds.labels(self.shadow.name).observe(dt)
            problem = self.check(cfg) if cfg is not None else None
            if problem is not None:
                rec["error"] = f"infeasible: {problem}"
        except _Fail as fail:
            rec["error"] = f"{fail.reason}: {fail.detail}"
        self.metrics.decisions.labels("shadow", "logged").inc()
        if self.shadow_log is not None:
            self.shadow_log.write(rec)

    def initial(self, deadline_s: float = 30.0) -> Decision:
        """The first decision (a complete config) before serving starts; generous deadline (loads profiles)."""
        d = self.decide(TelemetrySnapshot(time=0.0), deadline_s)
        if d.config is None or d.config.model is None:
            raise ValueError(f"no controller gave a complete first config (model, depth): "
                             f"{d.reason or 'the controller returned no config'}")
        return d

    # ------------------------------------------------------------------ the control thread
    def start(self, sink: Callable[[Decision], None]) -> None:
        """Run decisions on a background thread; each :class:`Decision` goes to ``sink``."""
        self._sink = sink
        self._thread = threading.Thread(target=self._run, name="helios-control", daemon=True)
        self._thread.start()

    def offer(self, snap: TelemetrySnapshot) -> bool:
        """Hand over a snapshot without blocking; False when the previous one is still waiting."""
        try:
            self._mailbox.put_nowait(snap)
            return True
        except queue.Full:
            return False

    def _run(self) -> None:
        while True:
            snap = self._mailbox.get()
            if snap is None:
                return
            decision = self.decide(snap)
            if self._sink is not None:
                self._sink(decision)

    def stop(self) -> None:
        if self._thread is not None:
            while True:
                try:
                    self._mailbox.put(None, timeout=0.1)
                    break
                except queue.Full:
                    try:
                        self._mailbox.get_nowait()
                    except queue.Empty:
                        pass
            self._thread.join(timeout=5)
        for w in self._workers():
            w.close()
        if self.shadow_log is not None:
            self.shadow_log.close()

    def rejected(self, decision: Decision, reason: str) -> None:
        """Tell the controller whose decision the engine did not take (invalid or rolled back), and why."""
        self.last_rejection = {"controller": decision.controller, "source": decision.source, "reason": reason,
                               "config": _config_dict(decision.config)}
        worker = self.primary if decision.source == "primary" else self.fallback
        hook = getattr(worker.ctrl, "rejected", None) if worker is not None else None
        if hook is not None:
            try:
                hook(decision.config, reason)
            except Exception:  # noqa: BLE001 - a controller's bookkeeping must not break serving
                pass

    def stats(self) -> dict[str, Any]:
        """Decision-time percentiles (ms) and fallback counts, for ``/admin/controller`` and benchmarks."""
        def pct(values: deque[float]) -> dict[str, float | int | None]:
            t = np.asarray(values, dtype=float) * 1e3
            out: dict[str, float | int | None] = {f"p{q}": round(float(np.percentile(t, q)), 4) if t.size else None
                                                  for q in (50, 95, 99)}
            return {**out, "max": round(float(t.max()), 4) if t.size else None, "n": int(t.size)}

        primary, fallback, shadow = self.names
        return {"controller": primary, "fallback": fallback, "shadow": shadow, "deadline_ms": self.deadline_s * 1e3,
                "decisions": self.decisions, "decide_ms": pct(self.decide_times),
                "decide_cpu_ms": pct(self.decide_cpu),
                "fallbacks": dict(self.fallback_reasons), "last_rejection": self.last_rejection,
                "last": None if self.last is None else {"source": self.last.source, "controller": self.last.controller,
                                                        "reason": self.last.reason,
                                                        "config": _config_dict(self.last.config)}}
