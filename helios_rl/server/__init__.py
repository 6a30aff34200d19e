"""The live HTTP server: OpenAI-compatible API over the engine, with a time-bounded controller beside it.

::

    from helios_rl.server import create_app, runtime_from_scenario
    rt = runtime_from_scenario("envs/helios-paper.yaml", controller="helios", shadow="static")
    app = create_app(rt)          # FastAPI; its lifespan starts and stops the engine thread

Threads: uvicorn's event loop (HTTP), ``helios-engine`` (the only owner of the engine),
``helios-control`` (decisions, each controller on its own worker thread with a deadline).
"""

from helios_rl.server.app import create_app
from helios_rl.server.control import ControlPlane, Decision, DecisionMaker, ShadowLog
from helios_rl.server.engine_loop import EngineLoop
from helios_rl.server.metrics import ServerMetrics
from helios_rl.server.runtime import (BackgroundServer, ServerRuntime, ServerSettings, build_runtime,
                                      runtime_from_model, runtime_from_scenario)

__all__ = ["BackgroundServer", "ControlPlane", "Decision", "DecisionMaker", "EngineLoop", "ServerMetrics",
           "ServerRuntime", "ServerSettings", "ShadowLog", "build_runtime", "create_app", "runtime_from_model",
           "runtime_from_scenario"]
