"""How fast this machine is *now*, against how fast it was when the simulator was calibrated.

A shared VM does not run at one speed: on the project's 2-core CPU the same full-depth decode step of
SmolLM2-135M at batch 8 took 0.106 s one afternoon, 0.150 s that night and 0.26 s the next morning, and once
halved within a benchmark repeat (benchmarks/RESULTS.md, issue 14). Relative SLOs are resolved once, at
calibration; when the machine slows afterwards every method misses them, not by its own doing, and the
same comparison gives another answer.

``backend.drift: probe`` corrects for it. A :class:`SpeedProbe` times one fixed piece of work, the SLO
reference model's full-depth decode step at batch 8 (the unit relative SLOs are written in), with the
scenario's timing. Calibration records its median (``SimProfile.meta["speed_probe"]``); a live episode
probes every ``backend.drift_interval_s`` of wall time and charges the virtual clock each measured cost
times ``calibrated probe / median of the recent probes`` (:class:`~helios_rl.evaluation.drift.DriftCorrection`): costs in seconds of the
machine as it was calibrated. The costs are still measured; what the correction assumes is that a slowdown
slows serving steps and the probe step alike. The factors of every episode are recorded beside its
results, so a reader sees how far the machine moved.

This module is part of the profile's engine version (a probe changed is another measurement); the
correction's bookkeeping lives in :mod:`helios_rl.evaluation.drift`, which is not.
"""

from __future__ import annotations

import statistics
from dataclasses import replace

PROBE_BATCH = 8
PROBE_TEXT = ("The history of the printing press begins in the fifteenth century, when a goldsmith in Mainz "
              "combined movable metal type, oil-based ink and a screw press adapted from wine making.")


class SpeedProbe:
    """Times the SLO reference model's full-depth decode step at batch :data:`PROBE_BATCH` (module docstring),
    or at another ``batch``: calibration measures the reference step at every batch a scenario's relative SLOs
    and arrival rates name (:data:`SimProfile.meta` ``["reference_steps"]``), sharing one loaded ``model``.

    The probe keeps its own engine and requests; a request's context grows by one token per probe step and
    the batch is re-prefilled (untimed) every ``cycle`` steps, so the timed step always sees the same
    context lengths, at calibration and in a live run."""

    def __init__(self, scenario, timer, cycle: int = 16, batch: int = PROBE_BATCH, model=None) -> None:
        from helios_rl.engine.config import ServingConfig
        from helios_rl.engine.engine import Engine
        from helios_rl.evaluation.runtime import ModelLoader, VirtualClock
        from helios_rl.scenario import step_reference_model

        if timer.mode == "modeled":
            raise ValueError("a speed probe measures the machine; timing: modeled has no machine speed to correct")
        sc = scenario
        self.model_name, self.timer, self.cycle, self.batch = step_reference_model(sc), timer, int(cycle), int(batch)
        if self.batch < 1:
            raise ValueError(f"a speed probe needs a batch of at least 1, got {batch!r}")
        self._owns_model = model is None  # a probe at another batch may share the loaded model
        self.model = ModelLoader(sc.engine.device, sc.engine.dtype, "shared")(self.model_name, None) \
            if model is None else model
        settings = replace(sc.engine.settings(sc.exits.measure, sc.exits.default_threshold), memory_budget_bytes=None,
                           max_batch=self.batch)
        self.engine = Engine(self.model, settings, loader=None, clock=VirtualClock(0.0))
        self.engine.apply(ServingConfig(max_batch=self.batch, threshold=1.0, exit_layers=()))
        self._ids: list[str] = []

    def _refill(self) -> None:
        from helios_rl.engine.request import SamplingParams

        for i in self._ids:
            self.engine.release(i)
        params = SamplingParams(max_new_tokens=self.cycle + 1, ignore_eos=True)
        self._ids = [self.engine.add_request(PROBE_TEXT, params) for _ in range(self.batch)]
        self.engine.step()  # the prefill: not timed

    def step(self) -> float:
        """Seconds (the scenario's timing) of one decode step at the probe's batch."""
        if not self.engine.has_unfinished():
            self._refill()
        t0 = self.timer.start()
        self.engine.step()
        return self.timer.elapsed(t0)

    def measure(self, steps: int = 8) -> float:
        """The median of ``steps`` probe steps (after one untimed warm-up step)."""
        self.step()
        return statistics.median(self.step() for _ in range(max(1, steps)))

    def close(self) -> None:
        for i in self._ids:
            self.engine.release(i)
        self._ids = []
        self.engine.pool = None
        if self._owns_model:
            self.model.unload()
