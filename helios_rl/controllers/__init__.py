"""Controllers: ``decide(telemetry) -> ServingConfig | None`` and ``reset()``.

The same objects run in the evaluation harness, the Gymnasium environment and the server::

    from helios_rl.controllers import ControllerContext, make_controller
    ctrl = make_controller("helios", ctx, {"coverage": 0.9})
"""

from __future__ import annotations

from typing import Any

from helios_rl.controllers.aimd import AimdController
from helios_rl.controllers.base import OBJECTIVES, SLO, Controller, ControllerContext
from helios_rl.controllers.helios import HeliosController
from helios_rl.controllers.params import PARAMS, ParamError, parse_params
from helios_rl.controllers.repository import MemorySettings, ModelFacts, ModelProfile, checkpoint_facts
from helios_rl.controllers.static import BestStaticController, RandomController, StaticController

CONTROLLERS: dict[str, type[Controller]] = {
    "static": StaticController,
    "helios": HeliosController,
    "best-static": BestStaticController,
    "random": RandomController,
    "aimd": AimdController,
}


def make_controller(name: str, ctx: ControllerContext, params: Any = None) -> Controller:
    """Controller ``name`` over ``ctx``; ``params`` is a params dataclass, a mapping, or None (defaults)."""
    if name not in CONTROLLERS:
        raise ValueError(f"unknown controller {name!r}; known: {sorted(CONTROLLERS)}")
    if params is None or isinstance(params, dict):
        params = parse_params(name, params)
    return CONTROLLERS[name](ctx, params)


__all__ = ["AimdController", "CONTROLLERS", "OBJECTIVES", "PARAMS", "SLO", "BestStaticController", "Controller", "ControllerContext",
           "HeliosController", "MemorySettings", "ModelFacts", "ModelProfile", "ParamError", "RandomController",
           "StaticController", "checkpoint_facts", "make_controller", "parse_params"]
