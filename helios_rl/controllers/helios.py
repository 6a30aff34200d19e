"""The HELIOS greedy heuristic (arXiv 2504.10724), driven purely by telemetry snapshots.

Phases (kept in :attr:`HeliosController.phase`):

1. **shortlist** (offline, at reset): rank the candidates by the throughput the model repository
   predicts at the depth their exits need and the batch the budget then admits; keep the top K:
   candidates that fit the budget; of those, the ones that can be loaded deep enough (within the
   budget) for the predicted agreement the accuracy rule of phase 3 requires, if any; then those
   that meet the TPOT SLO.
2. **profile:<model>**: serve each shortlisted candidate, in turn, loaded as deep as the budget
   allows (with ``profile_requests`` requests' room), until ``profile_requests`` requests finish.
   Their tokens are real output returned to their users. The batch is not throttled by default
   (``profile_batch: max``): throttling to the profiled requests idles the engine for the whole
   phase (measured on SmolLM2: 13 s at batch 5 out of a 60 s run). Measured: step time (hence a live correction of the
   repository's speed model), tokens/s, the exit-layer histogram and mean confidence.
3. **serve**: load the best candidate only up to the depth by which ``coverage`` of its profiled
   tokens exit (raised where the repository predicts agreement below the SLO floor, or more than
   ``max_agreement_drop`` below full depth's: the paper's "negligible accuracy loss" made explicit);
   tokens that reach
   that last loaded layer unconfident exit there anyway (greedy exit) and count as breaches. When
   more than ``breach_limit`` of the last ``breach_window`` tokens breach, do the cheaper, by
   measured cost, of loading more layers or switching to another profiled candidate's partial
   load. Every ``reprofile_interval`` served requests, go back to 2.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from helios_rl.controllers.base import Controller, ControllerContext
from helios_rl.controllers.params import HeliosParams
from helios_rl.engine.config import ServingConfig
from helios_rl.engine.telemetry import TelemetrySnapshot


@dataclass
class LiveProfile:
    """What profiling one candidate on live requests measured."""

    model: str
    depth: int
    finished: int = 0
    tokens: int = 0
    seconds: float = 0.0
    steps: int = 0
    batch_sum: float = 0.0
    conf_sum: float = 0.0
    predicted_s: float = 0.0  # what the repository's speed model predicts for the same steps
    exit_counts: list[int] = field(default_factory=list)

    def add(self, s: TelemetrySnapshot, predicted_s: float) -> None:
        self.predicted_s += predicted_s
        self.finished += s.requests_finished
        self.tokens += s.output_tokens
        self.seconds += s.window_s
        self.steps += s.steps
        self.batch_sum += s.batch_mean * s.steps
        self.conf_sum += s.conf_mean * s.output_tokens
        counts = list(s.exit_counts)
        if len(counts) > len(self.exit_counts):
            self.exit_counts += [0] * (len(counts) - len(self.exit_counts))
        for i, c in enumerate(counts):
            self.exit_counts[i] += int(c)

    @property
    def step_s(self) -> float:
        return self.seconds / self.steps if self.steps else 0.0

    @property
    def batch(self) -> float:
        return self.batch_sum / self.steps if self.steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Plan:
    """A serving option: model, depth, batch cap and its predicted speed."""

    model: str
    depth: int
    batch: int
    tokens_per_s: float
    step_s: float


class HeliosController(Controller):
    """See the module docstring. All knobs are in :class:`HeliosParams`."""

    name = "helios"

    def __init__(self, ctx: ControllerContext, params: HeliosParams | None = None) -> None:
        super().__init__(ctx, params or HeliosParams())
        self.reset()

    # ----- state ------------------------------------------------------------------------------
    def reset(self, seed: int | None = None) -> None:
        super().reset(seed)
        self.ratio: dict[str, float] = {}  # measured / predicted step time, per model
        self.shortlist: list[str] = self._shortlist()
        self.queue: list[str] = []
        self.live: dict[str, LiveProfile] = {}
        self.profiling: LiveProfile | None = None
        self.plan: Plan | None = None
        self.served = 0
        self.total_tokens = 0
        self.total_finished = 0
        self.prefill_tokens = 0
        self.started = 0
        self.window: deque[tuple[int, int]] = deque()
        self._stale = 0  # consecutive snapshots in which the profiled config was not in force
        self._first = True

    # ----- offline shortlist ------------------------------------------------------------------
    def _depth_for(self, model: str, exit_counts: list[int] | None = None) -> int:
        """Depth HELIOS loads ``model`` to: the coverage depth, raised to meet the agreement floor and the
        largest predicted agreement drop from full depth that the params allow."""
        prof = self.ctx.profile(model)
        d = prof.coverage_depth(self.params.coverage, exit_counts)
        d = max(d, prof.min_depth_for_agreement(self._required_agreement(model)), self.params.min_depth)
        options = [o for o in prof.depth_options() if o >= d] or [prof.num_layers]
        d = options[0]
        feasible = prof.max_feasible_depth(self.ctx.memory)
        if d > feasible:  # the budget cannot hold it: deepest option that fits
            fits = [o for o in prof.depth_options() if o <= feasible]
            d = fits[-1] if fits else feasible
        return d

    def _required_agreement(self, model: str) -> float:
        """Predicted agreement a depth of ``model`` must reach: the SLO floor, and at most
        ``max_agreement_drop`` below the model's own full depth."""
        prof = self.ctx.profile(model)
        floor = self.ctx.slo.agreement_floor
        if self.params.max_agreement_drop is not None:
            floor = max(floor, prof.predicted_agreement(prof.num_layers) - self.params.max_agreement_drop)
        return floor

    def _plan(self, model: str, depth: int) -> Plan:
        prof = self.ctx.profile(model)
        ratio = self.ratio.get(model, 1.0)
        if self.ctx.slo.objective == "throughput":
            batch = self.ctx.admissible(model, depth)
        else:
            batch = self.ctx.slo_batch(model, depth, ratio)
        step = ratio * prof.step_time(depth, batch)
        return Plan(model, depth, batch, batch / step if batch else 0.0, step)

    def _score(self, plan: Plan) -> float:
        return -plan.step_s if self.ctx.slo.objective == "latency" else plan.tokens_per_s

    def _shortlist(self) -> list[str]:
        plans = []
        for model in self.ctx.candidates:
            if self.ctx.profile(model).max_feasible_depth(self.ctx.memory) < 1:
                continue
            plan = self._plan(model, self._depth_for(model))
            accurate = self.ctx.profile(model).predicted_agreement(plan.depth) >= self._required_agreement(model) - 1e-9
            meets = plan.step_s <= self.ctx.slo.tpot_s
            plans.append((not accurate, not meets, -self._score(plan), model))
        plans.sort()
        if any(not p[0] for p in plans):  # drop candidates whose feasible depth misses the agreement floor
            plans = [p for p in plans if not p[0]]
        return [p[-1] for p in plans[: self.params.shortlist_k]]

    # ----- decide -----------------------------------------------------------------------------
    def decide(self, telemetry: TelemetrySnapshot) -> ServingConfig | None:
        s = telemetry
        self.time = s.time
        self.prefill_tokens += s.prefill_tokens
        self.started += s.arrivals
        self.total_tokens += s.output_tokens
        self.total_finished += s.requests_finished
        if self._first:
            self._first = False
            if not self.shortlist:
                raise ValueError("helios: no candidate model fits the memory budget")
            self.note("shortlist", models=list(self.shortlist))
            return self._start_profiling(current=None)
        if self.phase.startswith("profile"):
            return self._profile_step(s)
        return self._serve_step(s)

    def _start_profiling(self, current: str | None) -> ServingConfig | None:
        queue = list(self.shortlist)
        if current in queue:  # profile the loaded model first: one switch fewer
            queue.remove(current)
            queue.insert(0, current)
        self.queue = queue
        self.live = {}
        return self._next_profile()

    def _profile_depth(self, model: str) -> int:
        prof = self.ctx.profile(model)
        want = max(1, self.params.profile_requests)
        deepest = prof.max_feasible_depth(self.ctx.memory, min_batch=want) or prof.max_feasible_depth(self.ctx.memory)
        return deepest

    def _predicted_seconds(self, model: str, depth: int, s: TelemetrySnapshot) -> float:
        """Busy time the repository predicts for the steps in ``s`` (decode steps plus prefill)."""
        prof = self.ctx.profile(model)
        decode = s.steps * prof.step_time(depth, max(s.batch_mean, 1.0))
        return decode + s.prefill_tokens * depth * prof.prefill_s_per_token_layer

    def _next_profile(self) -> ServingConfig | None:
        if not self.queue:
            return self._choose()
        model = self.queue.pop(0)
        depth = self._profile_depth(model)
        mode = self.params.profile_batch
        cap = {"max": self.ctx.memory.max_batch, "requests": self.params.profile_requests}.get(mode, mode)
        batch = min(int(cap), max(1, self.ctx.admissible(model, depth)))
        self.profiling = LiveProfile(model, depth)
        self.phase = f"profile:{model}"
        self.note("profile", model=model, depth=depth, max_batch=batch)
        return self.ctx.config(model, depth, batch)

    def _profile_step(self, s: TelemetrySnapshot) -> ServingConfig | None:
        lp = self.profiling
        if s.model == lp.model and s.depth == lp.depth and s.steps:
            lp.add(s, self._predicted_seconds(lp.model, lp.depth, s))
            self._stale = 0
        elif s.steps:
            self._stale += 1
            if self._stale >= 3:  # the profile config never took effect (rejected by the engine): skip it
                self.note("profile-skipped", model=lp.model, depth=lp.depth, serving=f"{s.model}@{s.depth}")
                self._stale = 0
                return self._next_profile()
        # done when profile_requests requests finished *and* the candidate itself produced as many
        # tokens as that many requests carry (requests begun on the previous model finish early)
        per_request = self.total_tokens / self.total_finished if self.total_finished else 0.0
        if lp.finished < self.params.profile_requests or lp.tokens < self.params.profile_requests * per_request:
            return None
        self.ratio[lp.model] = lp.seconds / lp.predicted_s if lp.predicted_s > 0 and lp.seconds > 0 else 1.0
        self.live[lp.model] = lp
        self.note("profiled", model=lp.model, depth=lp.depth, tokens_per_s=round(lp.tokens_per_s, 3),
                  step_s=round(lp.step_s, 6), ratio=round(self.ratio[lp.model], 4),
                  conf_mean=round(lp.conf_sum / lp.tokens, 4) if lp.tokens else 0.0)
        return self._next_profile()

    def _serving_depth(self, model: str) -> int:
        lp = self.live.get(model)
        uncensored = lp is not None and lp.depth == self.ctx.profile(model).num_layers and sum(lp.exit_counts)
        counts = lp.exit_counts if uncensored and not self.params.use_offline_exits else None
        return self._depth_for(model, counts)

    def _choose(self) -> ServingConfig:
        plans = [self._plan(m, self._serving_depth(m)) for m in self.live] or \
                [self._plan(m, self._depth_for(m)) for m in self.shortlist]
        best = max(plans, key=self._score)
        self.note("choose", options=[{"model": p.model, "depth": p.depth, "batch": p.batch,
                                      "tokens_per_s": round(p.tokens_per_s, 3)} for p in plans])
        return self._serve(best)

    def _serve(self, plan: Plan, restart_count: bool = True) -> ServingConfig:
        """Serve ``plan``. A new serving period (after profiling) restarts the count of requests toward
        re-profiling; a breach overflow's grow or switch does not (``restart_count`` False), else
        overflows every few requests would postpone re-profiling forever."""
        self.plan = plan
        self.phase = "serve"
        if restart_count:
            self.served = 0
        self.window.clear()
        self.note("serve", model=plan.model, depth=plan.depth, max_batch=plan.batch,
                  predicted_tokens_per_s=round(plan.tokens_per_s, 3))
        batch = None if self.ctx.slo.objective == "throughput" else plan.batch
        return self.ctx.config(plan.model, plan.depth, batch)

    def _serve_step(self, s: TelemetrySnapshot) -> ServingConfig | None:
        plan = self.plan
        self.served += s.requests_finished
        if s.steps and s.model == plan.model and s.depth == plan.depth and s.batch_mean > 0:
            predicted = self._predicted_seconds(plan.model, plan.depth, s)  # live correction while serving
            old = self.ratio.get(plan.model, 1.0)
            self.ratio[plan.model] = 0.8 * old + 0.2 * (s.window_s / predicted)
        if self.served >= self.params.reprofile_interval:
            self.note("reprofile", served=self.served)
            return self._start_profiling(current=plan.model)
        if s.output_tokens:
            self.window.append((s.output_tokens, s.breaches))
        while len(self.window) > 1 and sum(t for t, _ in self.window) - self.window[0][0] >= self.params.breach_window:
            self.window.popleft()
        tokens = sum(t for t, _ in self.window)
        if tokens < self.params.breach_window:
            return None
        breaches = sum(b for _, b in self.window) * self.params.breach_window / tokens
        if breaches <= self.params.breach_limit:
            return None
        return self._overflow(s, breaches)

    # ----- overflow -----------------------------------------------------------------------------
    def _overflow(self, s: TelemetrySnapshot, breaches: float) -> ServingConfig | None:
        plan = self.plan
        prof = self.ctx.profile(plan.model)
        self.window.clear()
        horizon = self.params.horizon_requests or max(1, self.params.reprofile_interval - self.served)
        tokens_per_req = self.total_tokens / self.total_finished if self.total_finished else 32.0
        work = horizon * tokens_per_req
        ctx_tokens = self.prefill_tokens / max(1, self.started) if self.started else 64.0
        options: list[tuple[float, str, Plan]] = []
        grow_to = [o for o in prof.depth_options()
                   if o >= plan.depth + math.ceil(self.params.grow_fraction * prof.num_layers)]
        feasible = prof.max_feasible_depth(self.ctx.memory)
        grow_to = [o for o in grow_to if o <= feasible] or ([feasible] if feasible > plan.depth else [])
        if grow_to:
            p = self._plan(plan.model, grow_to[0])
            move = prof.load_seconds(plan.depth, p.depth) + self._reprefill(s, plan.model, p.depth, ctx_tokens)
            options.append((move + work / max(p.tokens_per_s, 1e-9), "grow", p))
        for model in self.live:
            if model == plan.model:
                continue
            p = self._plan(model, self._serving_depth(model))
            other = self.ctx.profile(model)
            move = other.load_seconds(0, p.depth, with_base=True) + self._reprefill(s, model, p.depth, ctx_tokens)
            options.append((move + work / max(p.tokens_per_s, 1e-9), "switch", p))
        if not options:
            self.note("overflow", breaches=round(breaches, 2), action="none")
            return None
        cost, kind, best = min(options, key=lambda o: o[0])
        self.note("overflow", breaches=round(breaches, 2), action=kind,
                  costs={f"{k}:{p.model}@{p.depth}": round(c, 4) for c, k, p in options})
        return self._serve(best, restart_count=False)

    def _reprefill(self, s: TelemetrySnapshot, model: str, depth: int, ctx_tokens: float) -> float:
        """Predicted time to rebuild the KV of the running requests at ``depth`` on ``model``."""
        prof = self.ctx.profile(model)
        return s.running * ctx_tokens * depth * prof.prefill_s_per_token_layer

