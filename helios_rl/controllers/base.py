"""The controller interface and what every controller knows besides live telemetry.

A controller sees the serving loop only through :class:`TelemetrySnapshot` (one per control
interval, covering the steps since the previous call) and acts only through
:class:`ServingConfig`. The evaluation harness, the Gymnasium environment and the server drive it
the same way::

    controller.reset(seed)
    cfg = controller.decide(TelemetrySnapshot())      # first call: a complete config (model, depth)
    ... build the engine from cfg ...
    while serving:
        ... engine steps for one control interval ...
        cfg = controller.decide(engine.snapshot(since=last_call))
        if cfg is not None:
            engine.apply(cfg)

Multi-phase controllers (HELIOS profiles candidate A, then B, ... then serves) keep their phase in
their own state and advance it from the counts in the snapshots (requests finished, tokens, the
model in force), so no side channel into the engine is needed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from helios_rl.controllers.repository import MemorySettings, ModelProfile
from helios_rl.engine.config import ServingConfig
from helios_rl.engine.telemetry import TelemetrySnapshot

OBJECTIVES = ("throughput", "goodput", "latency")


@dataclass(frozen=True)
class SLO:
    """Service-level objective of a scenario.

    - ``ttft_s``, ``tpot_s``: a request meets the SLO when its time to first token and its time per
      output token are at most these (goodput counts such requests per second).
    - ``agreement_floor``: a served request counts toward goodput only when its free-running
      agreement with the serving model's own full-depth greedy output is at least this (measured on
      the live backend, predicted by the simulator); controllers must not choose configs whose
      predicted agreement is below it.
    - ``reference_model``: the one model that scores every served text's perplexity, so quality is
      comparable across candidates (None: the largest candidate).
    - ``max_reference_ppl``: optional quality floor: a request whose served text the reference model
      finds more perplexing than this does not count toward goodput.
    - ``objective``: what "best" means: output tokens/s, goodput (SLO-meeting requests/s) or latency.
    """

    ttft_s: float = 10.0
    tpot_s: float = 1.0
    agreement_floor: float = 0.0
    objective: str = "throughput"
    reference_model: str | None = None
    max_reference_ppl: float | None = None
    # SLOs written relative to the machine: (field, multiple, batch) = multiple x the static model's
    # full-depth decode step time at that batch, resolved from the calibrated profile before use
    relative: tuple = ()

    @property
    def resolved(self) -> bool:
        return not self.relative

    def window_end_s(self, arrivals, max_new_tokens) -> float:
        """The latest moment any of these requests (arrival times, max new tokens) could still meet this SLO: the
        max of arrival + ``ttft_s`` + (max new tokens - 1) x ``tpot_s``. Goodput divides by the window up to here,
        which the workload fixes, not how fast a method serves (see :func:`helios_rl.env.backend.slo_window_s`)."""
        import numpy as np

        arr, new = np.asarray(arrivals, dtype=float), np.asarray(max_new_tokens, dtype=float)
        if not arr.size:
            raise ValueError("no requests: the SLO window is undefined")
        return float(np.max(arr + self.ttft_s + np.maximum(new - 1, 0) * self.tpot_s))


@dataclass
class ControllerContext:
    """Static facts a controller may use: candidates, their offline profiles, memory, SLO, exit rule."""

    candidates: tuple[str, ...]
    profiles: dict[str, ModelProfile]
    memory: MemorySettings
    slo: SLO = SLO()
    threshold: float | None = None  # the exit setting: a precision target (target mode) or a raw threshold
    measure: str = "max_prob"
    exit_mode: str = "threshold"  # "target": ``threshold`` is a calibrated precision target (see ExitSection)

    @classmethod
    def for_scenario(cls, sc, profiles: dict[str, ModelProfile]) -> "ControllerContext":
        """The context a scenario defines: its candidates, memory, SLO and exit setting."""
        return cls(tuple(sc.models), profiles, sc.engine.memory(), sc.slo, sc.exits.setting, sc.exits.measure,
                   sc.exits.mode)

    def exit_kwargs(self, value: float | None) -> dict:
        """``ServingConfig`` keyword for exit setting ``value`` (the context's own when None)."""
        value = self.threshold if value is None else value
        return {"target": value} if self.exit_mode == "target" else {"threshold": value}

    def profile(self, model: str) -> ModelProfile:
        if model not in self.profiles:
            raise KeyError(f"no repository profile for model {model!r} (have {sorted(self.profiles)})")
        return self.profiles[model]

    def admissible(self, model: str, depth: int) -> int:
        return self.profile(model).admissible_batch(depth, self.memory)

    def config(self, model: str, depth: int, max_batch: int | None = None,
               setting: float | None = None) -> ServingConfig:
        """A complete config for ``model`` at ``depth`` with the scenario's exit rule (at exit ``setting``
        where given, else the scenario's).

        ``max_batch`` None asks for what the budget admits (the engine caps the batch at that); it is
        sent as the engine's cap, because None in a :class:`ServingConfig` would keep the old value.
        """
        batch = int(max_batch) if max_batch is not None else self.memory.max_batch
        layers = None if self.exit_mode == "target" else tuple(self.profile(model).exit_layers)
        return ServingConfig(model=model, depth=int(depth), max_batch=batch, exit_layers=layers, measure=self.measure,
                             **self.exit_kwargs(setting))

    def slo_batch(self, model: str, depth: int, ratio: float = 1.0) -> int:
        """Largest admissible batch whose predicted time per output token meets ``slo.tpot_s`` (>= 1)."""
        prof = self.profile(model)
        best = 1
        for b in range(1, self.admissible(model, depth) + 1):
            if ratio * prof.step_time(depth, b) <= self.slo.tpot_s:
                best = b
        return best


class Controller(ABC):
    """Base class: ``reset`` then ``decide`` per control interval (see module docstring)."""

    name: str = "controller"

    def __init__(self, ctx: ControllerContext, params: Any) -> None:
        self.ctx = ctx
        self.params = params
        self.phase = "init"
        self.log: list[dict] = []  # decisions with their reasons (for reports and plots)
        self.time = 0.0

    def reset(self, seed: int | None = None) -> None:
        """Forget all state; the next :meth:`decide` is the first of a new episode."""
        self.phase = "init"
        self.log = []
        self.time = 0.0

    @abstractmethod
    def decide(self, telemetry: TelemetrySnapshot) -> ServingConfig | None:
        """The config to apply now, or None to keep the current one."""

    def rejected(self, config: ServingConfig, reason: str) -> None:
        """The engine did not take ``config`` (invalid, or it failed while being applied and was rolled
        back); ``reason`` says why. Recorded in :attr:`log`; controllers may override to adapt."""
        self.note("rejected", config=config.to_dict(), reason=reason)

    def note(self, event: str, **info: Any) -> None:
        """Record a decision and why (kept in :attr:`log`)."""
        self.log.append({"t": round(self.time, 6), "event": event, "phase": self.phase, **info})
