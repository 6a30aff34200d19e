"""Replay one workload against one controller on the real engine, under a virtual clock.

The loop: admit every request whose arrival time has come, run one engine step, advance the virtual
clock by the step's measured cost; every ``backend.interval_s`` of virtual time hand the controller
a telemetry snapshot of the interval and apply what it returns (the load time of an apply is charged
to the clock too). When the engine is idle the clock jumps to the next arrival. Per request it keeps
every output token with the model and layer that produced it, for accuracy scoring afterwards.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from helios_rl.controllers.base import Controller
from helios_rl.engine.config import ServingConfig
from helios_rl.engine.engine import Engine
from helios_rl.engine.request import RequestError, SamplingParams
from helios_rl.engine.telemetry import TelemetrySnapshot
from helios_rl.evaluation.accuracy import Segment
from helios_rl.evaluation.energy import EnergyMeter
from helios_rl.evaluation.runtime import ModelLoader, Timer, VirtualClock
from helios_rl.scenario import Scenario
from helios_rl.workload.workload import RequestSpec


@dataclass
class RequestOutcome:
    """One request as served: timing (virtual seconds), and its tokens by producing model."""

    request_id: str
    task: str
    arrival: float
    prompt: str
    first_token: float | None = None
    finish: float | None = None
    output_tokens: int = 0
    segments: list[Segment] = field(default_factory=list)
    preemptions: int = 0
    error: str | None = None
    text: str | None = None  # the output text the user got (scored by the reference model)
    max_new_tokens: int | None = None  # what the request asked for (bounds when it could still meet the SLO)

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def tpot(self) -> float | None:
        if self.finish is None or self.first_token is None or self.output_tokens < 2:
            return None
        return (self.finish - self.first_token) / (self.output_tokens - 1)

    @property
    def latency(self) -> float | None:
        return None if self.finish is None else self.finish - self.arrival


@dataclass
class ReplayResult:
    """Everything one replay produced (metrics are computed from it in :mod:`.metrics`)."""

    controller: str
    seed: int
    requests: list[RequestOutcome]
    timeline: list[dict]
    steps: list[dict]
    exit_counts: dict[str, list[int]]
    telemetry: dict
    controller_log: list[dict]
    energy: dict
    wall_s: float
    virtual_s: float


def format_prompt(r: RequestSpec) -> str:
    """The text sent to the engine. Chat turns get a plain ``User:/Assistant:`` frame rather than a
    model's chat template, so the same text stays valid when a controller switches models."""
    return f"User: {r.prompt_text}\nAssistant:" if r.chat else r.prompt_text


def replay(scenario: Scenario, controller: Controller, requests: list[RequestSpec], loader: ModelLoader,
           timer: Timer, seed: int = 0, on_progress: Callable[[int, int], None] | None = None) -> ReplayResult:
    """Serve ``requests`` (sorted by arrival) under ``controller``; see the module docstring."""
    controller.reset(seed)
    clock = VirtualClock(0.0)
    first = controller.decide(TelemetrySnapshot(time=0.0))
    if first is None or first.model is None:
        raise ValueError(f"controller {controller.name!r} must return a complete config (model, depth) first")
    engine = Engine(loader(first.model, first.depth), scenario.engine.settings(scenario.exits.measure,
                    scenario.exits.default_threshold), loader=loader, clock=clock)
    engine.apply(ServingConfig(max_batch=first.max_batch, threshold=first.threshold, exit_layers=first.exit_layers,
                               measure=first.measure, target=first.target))
    meter = EnergyMeter(scenario.evaluation.cpu_watts_per_core)  # serving only: not the initial load
    wall0 = time.perf_counter()
    outcomes = {r.request_id: RequestOutcome(r.request_id, r.task, r.arrival_s, format_prompt(r),
                                              max_new_tokens=r.max_new_tokens) for r in requests}
    timeline: list[dict] = []
    _sample(timeline, engine, controller, clock.now, "start")
    interval = scenario.backend.interval_s
    next_decision, last_call = interval, 0.0
    pending = sorted(requests, key=lambda r: r.arrival_s)
    i, done, n = 0, 0, len(pending)
    sp = scenario.sampling
    steps = 0
    while i < n or engine.has_unfinished():
        while i < n and pending[i].arrival_s <= clock.now:
            r = pending[i]
            params = SamplingParams(max_new_tokens=r.max_new_tokens, temperature=sp.temperature, top_p=sp.top_p,
                                    seed=seed * 100_003 + i if sp.temperature > 0 else None, ignore_eos=sp.ignore_eos)
            try:
                engine.add_request(outcomes[r.request_id].prompt, params, request_id=r.request_id,
                                   arrival_time=r.arrival_s)
            except RequestError as exc:
                outcomes[r.request_id].error = str(exc)
                done += 1
            i += 1
        if not engine.has_unfinished():
            if i < n:
                clock.jump_to(pending[i].arrival_s)
            continue
        model = engine.model.name
        t0 = timer.start()
        events = engine.step()
        clock.advance(timer.step_cost(t0, engine.telemetry.steps[-1]))
        steps += 1
        for ev in events:
            out = outcomes[ev.request_id]
            if not out.segments or out.segments[-1].model != model:
                out.segments.append(Segment(model))
            out.segments[-1].ids.append(ev.token_id)
            out.segments[-1].exit_layers.append(ev.exit_layer)
            out.output_tokens += 1
            if out.first_token is None:
                out.first_token = clock.now
            if ev.finished:
                out.finish = clock.now
                out.preemptions = engine.requests[ev.request_id].preemptions
                out.text = engine.requests[ev.request_id].output_text
                done += 1
        if on_progress is not None and events:
            on_progress(done, n)
        if steps >= scenario.evaluation.max_steps:
            raise RuntimeError(f"{controller.name}: replay did not finish within {steps} steps (evaluation.max_steps)")
        if clock.now >= next_decision:
            snap = engine.snapshot(since=last_call)
            last_call = clock.now
            next_decision = clock.now + interval
            cfg = controller.decide(snap)
            if cfg is not None:
                _apply(engine, cfg, clock, timer, timeline, controller)
    wall = time.perf_counter() - wall0
    _sample(timeline, engine, controller, clock.now, "end")
    exit_counts: dict[str, np.ndarray] = {}
    step_rows = []
    for s in engine.telemetry.steps:
        acc = exit_counts.setdefault(s.model, np.zeros(len(s.exit_counts), dtype=np.int64))
        acc += s.exit_counts
        step_rows.append({"t": s.t_start, "model": s.model, "depth": s.depth, "tokens": s.decode_tokens,
                          "prefill": s.prefill_tokens, "running": s.running, "waiting": s.waiting,
                          "breaches": s.breaches})
    telemetry = engine.snapshot().to_dict()
    engine.model.unload()
    return ReplayResult(controller.name, seed, [outcomes[r.request_id] for r in requests], timeline, step_rows,
                        {k: v.tolist() for k, v in exit_counts.items()}, telemetry, list(controller.log),
                        meter.read(), wall, clock.now)


def _apply(engine: Engine, cfg: ServingConfig, clock: VirtualClock, timer: Timer, timeline: list[dict],
           controller: Controller) -> None:
    before_model, before_bytes = engine.model.name, engine.model.resident_bytes()
    t0 = timer.start()
    try:
        engine.apply(cfg)
    except ValueError as exc:  # an infeasible config: keep serving with the current one, and say so
        _sample(timeline, engine, controller, clock.now, f"rejected: {exc}")
        return
    after = engine.model.resident_bytes()
    loaded = after if engine.model.name != before_model else max(0, after - before_bytes)
    clock.advance(timer.load_cost(t0, loaded))
    _sample(timeline, engine, controller, clock.now, "apply")


def _sample(timeline: list[dict], engine: Engine, controller: Controller, t: float, event: str) -> None:
    timeline.append({"t": t, "event": event, "phase": controller.phase, "model": engine.model.name,
                     "depth": engine.model.depth, "num_layers": engine.model.num_layers, "max_batch": engine.max_batch,
                     "running": len(engine.running), "waiting": len(engine.waiting),
                     "resident_bytes": engine.resident_bytes(), "weight_bytes": engine.model.resident_bytes(),
                     "kv_bytes": engine.pool.nbytes() if engine.pool is not None else 0})
