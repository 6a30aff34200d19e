"""Baselines: ``static`` (EE-LLM style), ``best-static`` (grid search in hindsight) and ``random``."""

from __future__ import annotations

import numpy as np

from helios_rl.controllers.base import Controller, ControllerContext
from helios_rl.controllers.params import BestStaticParams, RandomParams, StaticParams
from helios_rl.engine.config import ServingConfig
from helios_rl.engine.telemetry import TelemetrySnapshot


class StaticController(Controller):
    """One model at a fixed depth (full by default) with calibrated exits; the batch the budget admits.

    This is the single-model early-exit serving that HELIOS is compared with (EE-LLM): every layer is
    resident, tokens still leave at confident exits, and the memory that full-depth weights and KV
    leave free sets the batch.
    """

    name = "static"

    def __init__(self, ctx: ControllerContext, params: StaticParams | None = None) -> None:
        super().__init__(ctx, params or StaticParams())
        self._sent = False

    def target(self) -> tuple[str, int, int | None]:
        model = self.params.model or self.ctx.candidates[0]
        depth = self.params.depth or self.ctx.profile(model).num_layers
        return model, depth, self.params.max_batch

    def reset(self, seed: int | None = None) -> None:
        super().reset(seed)
        self._sent = False

    def exit_choice(self) -> float | None:
        """The exit setting served (None: the scenario's)."""
        return getattr(self.params, "setting", None)

    def decide(self, telemetry: TelemetrySnapshot) -> ServingConfig | None:
        self.time = telemetry.time
        if self._sent:
            return None
        model, depth, batch = self.target()
        self._sent = True
        self.phase = "serve"
        setting = self.exit_choice()
        self.note("serve", model=model, depth=depth, max_batch=batch, setting=setting)
        return self.ctx.config(model, depth, batch, setting)


class BestStaticController(StaticController):
    """The best static (model, depth, batch) of a grid, chosen in hindsight on the same workload.

    The evaluation harness replays the workload once per :meth:`grid` point, measures each, then
    calls :meth:`choose`; from then on this behaves as :class:`StaticController` at that point.
    """

    name = "best-static"

    def __init__(self, ctx: ControllerContext, params: BestStaticParams | None = None) -> None:
        self.grid_params = params or BestStaticParams()
        super().__init__(ctx, StaticParams())
        self.params = self.grid_params
        self.chosen: StaticParams | None = None

    def grid(self) -> list[StaticParams]:
        """Feasible grid points, thinned evenly to ``max_points`` (full-depth points always kept)."""
        gp = self.grid_params
        points: list[StaticParams] = []
        for model in gp.models or self.ctx.candidates:
            prof = self.ctx.profile(model)
            depths = prof.depth_options() if gp.depths == "auto" else [d for d in gp.depths if d <= prof.num_layers]
            for d in depths:
                adm = self.ctx.admissible(model, d)
                if adm < 1:
                    continue
                batches = [None] if gp.batches == "auto" else sorted({min(b, adm) for b in gp.batches})
                points += [StaticParams(model=model, depth=d, max_batch=b) for b in batches]
        if len(points) > gp.max_points:
            keep = set(np.linspace(0, len(points) - 1, gp.max_points).round().astype(int).tolist())
            full = {i for i, pt in enumerate(points) if pt.depth == self.ctx.profile(pt.model).num_layers}
            idx = sorted(keep | full)[: max(gp.max_points, len(full))]
            points = [points[i] for i in idx]
        return points

    def choose(self, point: StaticParams) -> None:
        self.chosen = point

    def target(self) -> tuple[str, int, int | None]:
        if self.chosen is None:
            raise RuntimeError("best-static has not been searched yet: the evaluation harness runs its grid "
                               "search in hindsight and then calls choose()")
        return self.chosen.model, self.chosen.depth, self.chosen.max_batch

    def exit_choice(self) -> float | None:
        return self.chosen.setting if self.chosen is not None else None


class RandomController(Controller):
    """At each decision, with probability ``change_prob``, a uniformly random feasible config."""

    name = "random"

    def __init__(self, ctx: ControllerContext, params: RandomParams | None = None) -> None:
        super().__init__(ctx, params or RandomParams())
        self.rng = np.random.default_rng(0)
        self._first = True

    def reset(self, seed: int | None = None) -> None:
        super().reset(seed)
        self.rng = np.random.default_rng(seed)
        self._first = True

    def _draw(self) -> ServingConfig | None:
        models = [m for m in (self.params.models or self.ctx.candidates) if self.ctx.admissible(m, 1) >= 1]
        if not models:
            return None
        model = models[int(self.rng.integers(len(models)))]
        prof = self.ctx.profile(model)
        depth = int(self.rng.integers(1, prof.max_feasible_depth(self.ctx.memory) + 1))
        batch = int(self.rng.integers(1, self.ctx.admissible(model, depth) + 1))
        self.note("draw", model=model, depth=depth, max_batch=batch)
        return self.ctx.config(model, depth, batch)

    def decide(self, telemetry: TelemetrySnapshot) -> ServingConfig | None:
        self.time = telemetry.time
        self.phase = "serve"
        if self._first or self.rng.random() < self.params.change_prob:
            self._first = False
            return self._draw()
        return None
