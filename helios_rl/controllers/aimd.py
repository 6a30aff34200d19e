"""``aimd``: an SLO-aware adaptive rule, the baseline a learned controller has to beat.

RLScale-Bench (arXiv 2605.26418) found a calibrated rule-based autoscaler beating six deep-RL agents
on most workloads; a leaderboard without such a rule flatters RL. This one is additive-increase /
multiplicative-decrease on the batch cap, driven by the measured time per output token:

* the model is the static baseline's, loaded to the shallowest depth whose predicted agreement (the
  model repository's exit statistics) meets the scenario's agreement floor, at the scenario's exit
  setting (a calibrated precision target);
* every decision reads the window's TPOT p95: above ``slo.tpot_s`` (or TTFT p95 above ``slo.ttft_s``
  while requests wait) the cap is multiplied by ``decrease``; below ``headroom`` x the SLO while
  requests wait, it grows by ``increase``; otherwise it stays. The cap never exceeds what the memory
  budget admits.
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
        self.model = self.depth = None

    def _plan(self) -> tuple[str, int]:
        model = self.params.model or self.ctx.candidates[0]
        prof = self.ctx.profile(model)
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
            self.note("start", model=self.model, depth=self.depth, max_batch=self.cap)
            return self.ctx.config(self.model, self.depth, self.cap)
        if not telemetry.steps:
            return None
        top = self.ctx.admissible(self.model, self.depth)
        late = (telemetry.requests_finished and telemetry.tpot_p95 > slo.tpot_s) or \
            (telemetry.waiting and telemetry.requests_finished and telemetry.ttft_p95 > slo.ttft_s)
        if late:
            new = max(1, int(self.cap * p.decrease))
        elif telemetry.waiting and (not telemetry.requests_finished or telemetry.tpot_p95 < p.headroom * slo.tpot_s):
            new = min(top, self.cap + p.increase)
        else:
            return None
        if new == self.cap:
            return None
        self.note("decrease" if new < self.cap else "increase", tpot_p95=round(telemetry.tpot_p95, 4),
                  waiting=telemetry.waiting, max_batch=new)
        self.cap = new
        return ServingConfig(max_batch=new)
