"""Early-exit continuous-batching engine."""

from helios_rl.engine.config import EngineSettings, ServingConfig
from helios_rl.engine.engine import ApplyError, Engine, EngineUnavailable, TokenEvent
from helios_rl.engine.request import Request, RequestError, SamplingParams
from helios_rl.engine.telemetry import TelemetrySnapshot

__all__ = ["Engine", "EngineSettings", "ServingConfig", "SamplingParams", "Request", "RequestError", "TokenEvent",
           "TelemetrySnapshot", "ApplyError", "EngineUnavailable"]
