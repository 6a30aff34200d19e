"""Assembling a server: controllers by name, the feasibility check, the engine, and a background uvicorn.

``runtime_from_scenario`` reads a scenario YAML (models, memory budget, exit rule, controller params);
``runtime_from_model`` serves one model with defaults for a quick start; both end in
:func:`build_runtime`, which asks the control plane for the first config, loads that model and
starts nothing yet (``ServerRuntime.start`` does, usually from the app's lifespan).
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from helios_rl.engine import Engine, EngineSettings, ServingConfig
from helios_rl.engine.telemetry import Telemetry
from helios_rl.models.heads import CONFIDENCE_MEASURES
from helios_rl.server.control import ControlPlane, DecisionMaker, FeasibilityCheck, ShadowLog
from helios_rl.server.engine_loop import EngineLoop
from helios_rl.server.metrics import ServerMetrics

ModelLoader = Callable[[str, "int | None"], Any]
SERVER_CONTROLLERS = ("static", "helios", "random")


@dataclass
class ServerSettings:
    """Knobs of the HTTP layer, admission and control (the engine's own are :class:`EngineSettings`)."""

    max_queue: int = 64  # outstanding requests beyond the batch cap before new ones get 429
    interval_s: float = 0.25  # seconds between controller decisions
    decision_deadline_s: float = 0.05  # a decision not back by then is the fallback's
    default_max_tokens: int = 256  # chat requests without max_tokens
    completion_default_max_tokens: int = 16  # completions without max_tokens (OpenAI's default)
    default_temperature: float = 0.0
    max_prompt_chars: int = 200_000
    admin_token: str | None = None  # when set, /admin/* needs "Authorization: Bearer <token>"
    served_name: str = "helios"
    shadow_log: str | None = None
    seed: int = 0
    telemetry_records: int = 20_000  # engine step/request records kept (snapshots scan them)
    torch_threads: int | None = None  # set on the engine thread (None: leave torch's setting)
    fault_injection: bool = False  # tests and benchmarks only: POST /admin/faults (helios_rl.server.faults)
    max_connections: int = 256  # concurrent /v1 connections; beyond: 503 + Retry-After (0: unbounded)
    score_sample: float = 0.0  # share of finished requests scored off the request path (0: none)
    score_reference: str | None = None  # the model scoring served text's perplexity (scenario: slo.reference_model)


@dataclass
class ServerRuntime:
    """Everything one server runs: the engine loop (which owns the engine), control plane and metrics."""

    loop: EngineLoop
    control: ControlPlane
    metrics: ServerMetrics
    settings: ServerSettings
    models: list[str]
    num_layers: dict[str, int]
    max_model_len: int
    notes: list[str] = field(default_factory=list)
    faults: Any = None  # a FaultInjector when settings.fault_injection (tests, benchmarks)

    @property
    def served_ids(self) -> list[str]:
        """Names a request's ``model`` may use: the served alias, then every candidate."""
        return list(dict.fromkeys([self.settings.served_name, *self.models]))

    def start(self) -> None:
        self.loop.start()

    def stop(self) -> None:
        self.loop.stop()


# ----------------------------------------------------------------------------- controllers
def make_decision_maker(spec: "str | DecisionMaker", ctx: Any,
                        params_for: Callable[[str], Any] | None = None) -> DecisionMaker:
    """``static`` | ``helios`` | ``random`` | ``policy:<run dir>`` over controller context ``ctx``
    (an object with ``decide`` and ``reset`` is used as it is)."""
    if not isinstance(spec, str):
        return spec
    if spec.startswith("policy:"):
        return load_policy_controller(spec.split(":", 1)[1], ctx)
    if spec not in SERVER_CONTROLLERS:
        raise ValueError(f"--controller: unknown controller {spec!r}; use one of {list(SERVER_CONTROLLERS)} "
                         f"or policy:runs/<id>")
    from helios_rl.controllers import make_controller

    return make_controller(spec, ctx, params_for(spec) if params_for is not None else None)


def load_policy_controller(run_dir: str, ctx: Any) -> DecisionMaker:
    """A trained RL policy from a ``helios-rl train`` run folder (:func:`helios_rl.controllers.policy.load_policy`):
    a missing folder, a corrupt archive or a policy trained for other spaces is a clear error."""
    if not run_dir:
        raise ValueError("--controller policy:<run dir> needs a run directory, e.g. policy:runs/<id>")
    if not Path(run_dir).exists():
        raise FileNotFoundError(f"--controller policy:{run_dir}: no such run directory")
    from helios_rl.controllers.policy import load_policy

    return load_policy(run_dir, ctx)


def fallback_for(spec: "str | DecisionMaker", ctx: Any, params_for: Callable[[str], Any] | None = None) -> DecisionMaker:
    """HELIOS for any other primary (static if HELIOS cannot be built); static for HELIOS and static."""
    if spec not in ("helios", "static"):
        try:
            return make_decision_maker("helios", ctx, params_for)
        except Exception:  # noqa: BLE001 - e.g. no candidate fits the budget for HELIOS: static still serves
            pass
    return make_decision_maker("static", ctx, params_for)


def feasibility(ctx: Any, current: Callable[[], Any]) -> FeasibilityCheck:
    """A check that a config names a candidate, a depth within it that the budget holds, and sane knobs.

    ``current()`` returns the engine loop's public state (None before the engine exists); fields a
    config leaves None are taken from it.
    """
    def check(cfg: ServingConfig) -> str | None:
        state = current()
        model = cfg.model or (state.model if state is not None else None)
        if model not in ctx.candidates:
            return f"model: unknown model {model!r}; candidates: {list(ctx.candidates)}"
        prof = ctx.profile(model)
        depth = cfg.depth
        if depth is None:
            depth = state.depth if state is not None and state.model == model else prof.num_layers
        if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= prof.num_layers:
            return f"depth: must be between 1 and {prof.num_layers} for {model}, got {depth!r}"
        if ctx.admissible(model, depth) < 1:
            return f"depth: the memory budget cannot hold {model} at depth {depth} with one request"
        mb = cfg.max_batch
        if mb is not None and (isinstance(mb, bool) or not isinstance(mb, int) or mb < 1):
            return f"max_batch: must be an integer >= 1, got {mb!r}"
        for layer in cfg.exit_layers or ():
            if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < prof.num_layers:
                return f"exit_layers: layer {layer!r} is outside {model}'s 0..{prof.num_layers - 1}"
        thr = cfg.threshold
        for v in (thr.values() if isinstance(thr, dict) else [] if thr is None else [thr]):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                return f"threshold: must be in [0, 1], got {v!r}"
        t = cfg.target
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < t <= 1.0):
            return f"target: must be a precision in (0, 1], got {t!r}"
        if cfg.measure is not None and cfg.measure not in CONFIDENCE_MEASURES:
            return f"measure: must be one of {list(CONFIDENCE_MEASURES)}, got {cfg.measure!r}"
        return None
    return check


# ----------------------------------------------------------------------------- assembly
def build_runtime(ctx: Any, engine_settings: EngineSettings, loader: ModelLoader,
                  controller: "str | DecisionMaker" = "static", shadow: "str | DecisionMaker | None" = None, settings: ServerSettings | None = None,
                  params_for: Callable[[str], Any] | None = None) -> ServerRuntime:
    """Controllers from names, the first config from the control plane, the engine on that model."""
    settings = settings or ServerSettings()
    metrics = ServerMetrics()
    faults = None
    if settings.fault_injection:
        from helios_rl.server.faults import FaultInjector

        faults = FaultInjector()
        loader = faults.wrap_loader(loader)
    primary = make_decision_maker(controller, ctx, params_for)
    fallback = fallback_for(controller, ctx, params_for)
    shadow_ctrl = make_decision_maker(shadow, ctx, params_for) if shadow else None
    shadow_log = None
    if shadow_ctrl is not None:
        label = re.sub(r"[^A-Za-z0-9_.-]+", "_", shadow_ctrl.name)
        shadow_log = ShadowLog(settings.shadow_log or f"runs/shadow/{label}__{int(time.time())}.jsonl")
    holder: dict[str, EngineLoop] = {}
    check = feasibility(ctx, lambda: holder["loop"].state if "loop" in holder else None)
    plane = ControlPlane(primary, fallback, check, metrics, settings.decision_deadline_s, shadow_ctrl, shadow_log,
                         settings.seed)
    first = plane.initial().config
    model = loader(first.model, first.depth)
    engine = Engine(model, engine_settings, loader=loader)
    engine.telemetry = Telemetry(max_records=settings.telemetry_records)
    engine.apply(ServingConfig(max_batch=first.max_batch, threshold=first.threshold, exit_layers=first.exit_layers,
                               measure=first.measure, target=first.target))
    loop = EngineLoop(engine, metrics, plane, models=list(ctx.candidates), max_queue=settings.max_queue,
                      interval_s=settings.interval_s, torch_threads=settings.torch_threads)
    holder["loop"] = loop
    layers = {m: ctx.profile(m).num_layers for m in ctx.candidates}
    notes = [f"shadow log: {shadow_log.path}"] if shadow_log is not None else []
    if settings.score_sample > 0:
        from helios_rl.server.quality import SampledScorer

        loop.scorer = SampledScorer(loader, engine.max_len + 64, settings.score_reference, metrics,
                                    settings.score_sample, settings.seed)
        notes.append(f"scoring {settings.score_sample:.0%} of finished requests off the request path "
                     f"(full-depth copies outside the memory budget)")
    rt = ServerRuntime(loop, plane, metrics, settings, list(ctx.candidates), layers, engine.max_len, notes)
    rt.faults = faults
    return rt


def runtime_from_scenario(path: str, controller: str = "helios", shadow: str | None = None,
                          settings: ServerSettings | None = None, profiles: str = "auto",
                          say: Callable[[str], None] = print) -> ServerRuntime:
    """A server for scenario ``path``; ``profiles``: ``auto`` (model repository, measured once and cached)
    or ``facts`` (checkpoint sizes only: fast start, no speed model, no exit layers)."""
    import torch

    from helios_rl.controllers import ControllerContext
    from helios_rl.controllers.repository import checkpoint_facts
    from helios_rl.evaluation.runtime import ModelLoader as ScenarioLoader
    from helios_rl.evaluation.runtime import Timer, set_threads
    from helios_rl.scenario import Scenario
    from helios_rl.utils.device import parse_dtype, resolve_device

    sc = Scenario.from_yaml(path)
    if sc.slo.relative:  # SLOs relative to the machine: in seconds here, from the scenario's calibrated profile
        # (measured once and cached, as the environment resolves them); unresolved they read as NaN, and every
        # SLO-aware controller would find no batch meeting them
        from helios_rl.env.profile import SimProfile, ensure_profile, resolve_scenario

        sc, ref = resolve_scenario(sc, SimProfile.load(ensure_profile(sc, say=say)))
        say(f"SLO resolved on this machine: TTFT {sc.slo.ttft_s:.3f} s, TPOT {sc.slo.tpot_s:.3f} s "
            f"({ref['source']} full-depth step of {ref['model']}: {ref['step_s']} s by batch)")
    set_threads(sc.engine.threads)
    elem = torch.tensor([], dtype=parse_dtype(sc.engine.dtype, resolve_device(sc.engine.device))).element_size()
    facts = {m: checkpoint_facts(m, elem) for m in sc.models}
    for warning in sc.check_models(facts):
        say(f"warning: {warning}")
    loader = ScenarioLoader(sc.engine.device, sc.engine.dtype, sc.exits.heads)
    if profiles == "auto":
        from helios_rl.evaluation.profiling import ensure_repository

        profs = ensure_repository(sc, loader, Timer(sc.backend.timing), say)
    elif profiles == "facts":
        profs = {m: facts[m].as_profile() for m in sc.models}
    else:
        raise ValueError(f"--profiles must be auto or facts, got {profiles!r}")
    ctx = ControllerContext.for_scenario(sc, profs)
    settings = settings or ServerSettings(served_name=sc.name, interval_s=sc.backend.interval_s,
                                          default_temperature=sc.sampling.temperature, seed=sc.seed)
    if settings.torch_threads is None:
        settings.torch_threads = sc.engine.threads
    if settings.score_sample > 0 and settings.score_reference is None:
        settings.score_reference = sc.reference_model()
    return build_runtime(ctx, sc.engine.settings(sc.exits.measure, sc.exits.default_threshold), loader,
                         controller, shadow, settings, params_for=sc.params)


def runtime_from_model(ref: str, controller: str = "static", shadow: str | None = None,
                       settings: ServerSettings | None = None, max_batch: int = 16, max_model_len: int = 512,
                       memory_budget_bytes: int | None = None) -> ServerRuntime:
    """Quick start: one model (bundled name, folder, .gguf or hub id), default engine settings."""
    from helios_rl.controllers import ControllerContext, MemorySettings
    from helios_rl.controllers.repository import checkpoint_facts
    from helios_rl.evaluation.runtime import ModelLoader as ScenarioLoader

    es = EngineSettings(memory_budget_bytes=memory_budget_bytes, max_batch=max_batch, max_model_len=max_model_len)
    facts = checkpoint_facts(ref, 4)
    mem = MemorySettings(memory_budget_bytes, max_batch, max_model_len, es.pending_window, es.kv_strategy == "recompute")
    ctx = ControllerContext((ref,), {ref: facts.as_profile()}, mem)
    settings = settings or ServerSettings(served_name=ref, torch_threads=1)
    return build_runtime(ctx, es, ScenarioLoader(), controller, shadow, settings)


class BackgroundServer:
    """uvicorn serving ``app`` on a background thread (tests, benchmarks): ``with BackgroundServer(app) as url``."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, name="helios-uvicorn", daemon=True)
        self.url = ""

    def start(self, timeout: float = 30.0) -> str:
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > timeout:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self.url

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
