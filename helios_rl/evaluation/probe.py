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

A slowdown does not slow every kind of work alike: on the project's VM, in four benchmark runs, the measured
serving time of steady's fixed configurations (SmolLM2; 36-52 % of it prefill passes) moved only 0.67-0.81 as much as
this decode probe did (log-log slope), while exit-lever's (Gemma3 decode at small batches, the probe's kind of
work) moved 0.93-1.12 as much (benchmarks/RESULTS.md, issue 14). A prefill pass is compute-bound; a small decode
step is not. So a :class:`PrefillProbe` times a prefill step of the same model (:data:`PREFILL_TOKENS` prompt
tokens) as well, and the correction prices each step's prefill pass (timed apart by the engine,
``StepRecord.prefill_cpu_s`` / ``prefill_wall_s``) by the prefill probe and the rest by the decode probe.
On development seeds this removed the over-correction (charged seconds against the decode probe's slowdown:
slope -0.16 with one factor, -0.03 split) but little of the variance: serving's prefill passes follow the
prefill probe loosely (benchmarks/drift_split.py; RESULTS, issue 14).

This module is part of the profile's engine version (a probe changed is another measurement); the
correction's bookkeeping lives in :mod:`helios_rl.evaluation.drift`, which is not.
"""

from __future__ import annotations

import statistics
from dataclasses import replace

PROBE_BATCH = 8
PREFILL_TOKENS = 96  # the prefill probe's prompt: one request of this many tokens (at most max_model_len / 2)
PROBE_TEXT = ("The history of the printing press begins in the fifteenth century, when a goldsmith in Mainz "
              "combined movable metal type, oil-based ink and a screw press adapted from wine making.")


def _full_depth_engine(model, settings, batch: int):
    """A probe's own engine on ``model``: no memory budget, ``batch`` rows, full depth, no exits."""
    from helios_rl.engine.config import ServingConfig
    from helios_rl.engine.engine import Engine
    from helios_rl.evaluation.runtime import VirtualClock

    engine = Engine(model, replace(settings, memory_budget_bytes=None, max_batch=batch), loader=None,
                    clock=VirtualClock(0.0))
    engine.apply(ServingConfig(max_batch=batch, threshold=1.0, exit_layers=()))
    return engine


class SpeedProbe:
    """Times the SLO reference model's full-depth decode step at batch :data:`PROBE_BATCH` (module docstring),
    or at another ``batch``: calibration measures the reference step at every batch a scenario's relative SLOs
    and arrival rates name (:data:`SimProfile.meta` ``["reference_steps"]``), sharing one loaded ``model``.

    The probe keeps its own engine and requests; a request's context grows by one token per probe step and
    the batch is re-prefilled (untimed) every ``cycle`` steps, so the timed step always sees the same
    context lengths, at calibration and in a live run."""

    def __init__(self, scenario, timer, cycle: int = 16, batch: int = PROBE_BATCH, model=None) -> None:
        from helios_rl.evaluation.runtime import ModelLoader
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
        self.engine = _full_depth_engine(self.model, sc.engine.settings(sc.exits.measure, sc.exits.default_threshold),
                                         self.batch)
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


class PrefillProbe:
    """Times one prefill step of the SLO reference model: a single request of :data:`PREFILL_TOKENS` prompt
    tokens (fewer where the scenario's context or prefill budget is smaller), in an engine of its own that
    shares ``probe``'s loaded model. Each measurement aborts the previous request and admits a new one, so
    the timed step is always exactly that prefill."""

    def __init__(self, probe: SpeedProbe) -> None:
        self.timer, self.model = probe.timer, probe.model
        self.engine = _full_depth_engine(self.model, probe.engine.settings, 1)
        n = min(PREFILL_TOKENS, self.engine.settings.max_prefill_tokens, self.engine.max_len // 2)
        tok = self.model.tokenizer
        ids = tok((PROBE_TEXT + " ") * 8, add_special_tokens=False)["input_ids"] if tok is not None else []
        if len(ids) < n:  # a model without a tokenizer (or a short text): fixed ids within the vocabulary
            ids = [(7 * i + 3) % self.model.vocab_size for i in range(n)]
        self.prompt = [int(t) for t in ids[:n]]
        self._id: str | None = None

    @property
    def tokens(self) -> int:
        return len(self.prompt)

    def _drop(self) -> None:
        if self._id is not None:
            self.engine.abort(self._id)
            self.engine.release(self._id)
            self._id = None

    def step(self) -> float:
        """Seconds (the scenario's timing) of one prefill step of :attr:`tokens` prompt tokens."""
        from helios_rl.engine.request import SamplingParams

        self._drop()
        self._id = self.engine.add_request(list(self.prompt), SamplingParams(max_new_tokens=2, ignore_eos=True))
        t0 = self.timer.start()
        self.engine.step()
        dt = self.timer.elapsed(t0)
        rec = self.engine.telemetry.steps[-1]
        if rec.prefill_tokens != self.tokens:
            raise RuntimeError(f"prefill probe: the timed step prefilled {rec.prefill_tokens} tokens, not {self.tokens}")
        return dt

    def measure(self, steps: int = 3) -> float:
        """The median of ``steps`` prefill steps (after one untimed warm-up)."""
        self.step()
        return statistics.median(self.step() for _ in range(max(1, steps)))

    def close(self) -> None:
        self._drop()
        self.engine.pool = None
