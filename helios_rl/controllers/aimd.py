"""``aimd``: an SLO-aware adaptive rule, the baseline a learned controller has to beat.

RLScale-Bench (arXiv 2605.26418) found a calibrated rule-based autoscaler beating six deep-RL agents
on most workloads; a leaderboard without such a rule flatters RL. This one is additive-increase /
multiplicative-decrease on the batch cap, driven by the measured time per output token:

* the model is the static baseline's (or ``model``), loaded to the shallowest depth whose predicted
  agreement (the model repository's exit statistics) meets the scenario's agreement floor (or ``depth``),
  at the scenario's exit setting, a calibrated precision target (or ``setting``); the benchmark's
  ``tuned-aimd`` baseline searches these and the rule's knobs on development seeds
  (:mod:`helios_rl.bench.trials`), a calibrated rule in RLScale-Bench's sense;
* every decision reads the window's TPOT p95 (or, with ``signal: step_time``, its mean decode step, which
  answers to the cap at once where finished requests' TPOT lags it by their length): above ``slo.tpot_s``
  (or TTFT p95 above ``slo.ttft_s`` while requests wait, unless ``ttft_decrease`` is off) the cap is
  multiplied by ``decrease``; below ``headroom`` x the SLO while requests wait, it grows by ``increase``;
  otherwise it stays. A new cap is kept ``hold`` decisions before it is judged. The cap never exceeds
  what the memory budget admits.
"""

from __future__ import annotations

from helios_rl.controllers.base import Controller, ControllerContext
from helios_rl.controllers.params import AimdParams
from helios_rl.engine.config import ServingConfig
from helios_rl.engine.telemetry import TelemetrySnapshot


class AimdController(Controller):
    name = "aimd"

    def __init__(self, ctx: ControllerContext, params: AimdParams | None = None) -> None:
        super().__init__(ctx, params or AimdParams())
        self.reset()

    def reset(self, seed: int | None = None) -> None:
        super().reset(seed)
        self.cap = None
        self.held = 0
        self.model = self.depth = None

    def _plan(self) -> tuple[str, int]:
        model = self.params.model or self.ctx.candidates[0]
        prof = self.ctx.profile(model)
        if self.params.depth is not None:
            if self.params.depth > prof.num_layers:
                raise ValueError(f"controllers.aimd.depth: {self.params.depth} is beyond {model}'s "
                                 f"{prof.num_layers} layers")
            if self.ctx.admissible(model, self.params.depth) < 1:
                raise ValueError(f"controllers.aimd.depth: {model} at depth {self.params.depth} does not fit the "
                                 f"memory budget")
            return model, self.params.depth
        depth = prof.min_depth_for_agreement(self.ctx.slo.agreement_floor) if prof.agreement else prof.num_layers
        while depth < prof.num_layers and self.ctx.admissible(model, depth) < 1:
            depth += 1
        while depth > 1 and self.ctx.admissible(model, depth) < 1:
            depth -= 1
        return model, depth

    def decide(self, telemetry: TelemetrySnapshot) -> ServingConfig | None:
        self.time = telemetry.time
        p, slo = self.params, self.ctx.slo
        if self.cap is None:
            self.model, self.depth = self._plan()
            self.cap = max(1, min(self.ctx.admissible(self.model, self.depth), p.initial_batch))
            self.phase = "serve"
            self.note("start", model=self.model, depth=self.depth, max_batch=self.cap, setting=p.setting)
            return self.ctx.config(self.model, self.depth, self.cap, p.setting)
        if not telemetry.steps:
            return None
        if self.held < p.hold:
            self.held += 1
            return None
        top = self.ctx.admissible(self.model, self.depth)
        if p.signal == "step_time":  # the decode step the current cap gives, one token per running request
            tpot, measured = telemetry.window_s / telemetry.steps, True
        else:
            tpot, measured = telemetry.tpot_p95, bool(telemetry.requests_finished)
        late = (measured and tpot > slo.tpot_s) or \
            (p.ttft_decrease and telemetry.waiting and telemetry.requests_finished and telemetry.ttft_p95 > slo.ttft_s)
        if late:
            new = max(1, int(self.cap * p.decrease))
        elif telemetry.waiting and (not measured or tpot < p.headroom * slo.tpot_s):
            new = min(top, self.cap + p.increase)
        else:
            return None
        if new == self.cap:
            return None
        self.note("decrease" if new < self.cap else "increase", tpot=round(tpot, 4), signal=p.signal,
                  waiting=telemetry.waiting, max_batch=new)
        self.cap, self.held = new, 0
        return ServingConfig(max_batch=new)
