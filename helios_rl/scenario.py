"""Scenario files: one YAML that fixes a serving experiment (models, workload, SLO, engine, controllers).

The evaluation harness, the Gymnasium environment and the server read the same :class:`Scenario`.
Validation is strict: an unknown key (with a "did you mean" hint), a wrong type or an impossible
value raises :class:`ScenarioError` naming the file, the line (from the YAML node marks) and the
key, e.g. ``envs/x.yaml:14: engine.memory_budget: cannot hold gemma3-270m even at depth 1 ...``.
Checks that need model sizes (a depth beyond a model, a budget below one layer) run in
:meth:`Scenario.check_models`, from checkpoint headers only (no weights are read).

See ``envs/README.md`` for every key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from helios_rl.controllers.base import OBJECTIVES, SLO
from helios_rl.controllers.params import PARAMS, Keys, ParamError, boolean, choice, number, parse_params, string
from helios_rl.controllers.repository import MemorySettings, ModelFacts
from helios_rl.engine.config import KV_STRATEGIES, EngineSettings
from helios_rl.models.heads import CONFIDENCE_MEASURES
from helios_rl.workload.spec import ArrivalSpec, SpecError, WorkloadSpec

BACKENDS = ("live", "sim")
CLOCKS = ("virtual", "wall")
TIMINGS = ("cpu", "wall", "modeled")
DRIFTS = ("off", "probe")
DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


class ScenarioError(ValueError):
    """An invalid scenario; the message names the file, line and key."""


def parse_bytes(v: Any, key: str = "memory_budget") -> int:
    """``1073741824``, ``"1GiB"``, ``"900 MB"`` -> bytes (> 0)."""
    if isinstance(v, int) and not isinstance(v, bool):
        n = v
    elif isinstance(v, str) and (m := re.fullmatch(r"\s*([0-9.]+)\s*([KMG]i?B|B)?\s*", v, re.IGNORECASE)):
        n = int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])
    else:
        raise ParamError(key, f"expected bytes as an integer or a size like '1GiB' / '900MB', got {v!r}")
    if n <= 0:
        raise ParamError(key, f"must be > 0 bytes, got {v!r}")
    return n


# ----------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class EngineSection:
    """Engine settings of the scenario (``memory_budget`` in bytes or a size string)."""

    memory_budget_bytes: int | None = None
    max_batch: int = 64
    max_model_len: int = 512
    kv_strategy: str = "recompute"
    pending_window: int = 32
    max_prefill_tokens: int = 1024
    device: str | None = None
    dtype: str | None = None
    threads: int = 1

    def settings(self, measure: str = "max_prob", default_threshold: float = 0.9) -> EngineSettings:
        return EngineSettings(memory_budget_bytes=self.memory_budget_bytes, max_batch=self.max_batch,
                              max_model_len=self.max_model_len, kv_strategy=self.kv_strategy,
                              pending_window=self.pending_window, max_prefill_tokens=self.max_prefill_tokens,
                              measure=measure, default_threshold=default_threshold, device=self.device,
                              dtype=self.dtype)

    def memory(self) -> MemorySettings:
        return MemorySettings(self.memory_budget_bytes, self.max_batch, self.max_model_len, self.pending_window,
                              self.kv_strategy == "recompute", self.max_prefill_tokens)


@dataclass(frozen=True)
class ExitSection:
    """The exit rule: ``heads`` (auto / shared / folder), and the exit setting controllers choose.

    *Target mode* (the default, ``threshold: calibrated`` or absent): the setting is a calibrated
    precision target (``target``, chosen among ``targets``), which names each model's exit layers and
    thresholds as ``tune-exits`` calibrated them; ``layers`` must be ``auto``. *Threshold mode*
    (``threshold: <number>``, for shared heads and research): one raw confidence threshold at the
    exit ``layers`` (auto or a list), chosen among :data:`RAW_THRESHOLDS`.

    ``heads`` and ``layers`` may also map model references to such values (others: ``auto``).
    """

    heads: str | dict[str, str] = "auto"
    layers: str | tuple[int, ...] | dict[str, str | tuple[int, ...]] = "auto"
    threshold: float | None = None  # None: target mode
    default_threshold: float = 0.9
    measure: str = "max_prob"
    target: float = 0.95
    targets: tuple[float, ...] = (0.99, 0.95, 0.9, 0.8)

    @property
    def mode(self) -> str:
        return "target" if self.threshold is None else "threshold"

    @property
    def setting(self) -> float:
        """The static default exit setting (a precision target, or the raw threshold)."""
        return self.target if self.threshold is None else self.threshold

    @property
    def choices(self) -> tuple[float, ...]:
        """The exit settings a controller or agent chooses among (threshold mode: the raw grid plus the
        scenario's own threshold)."""
        if self.threshold is None:
            return self.targets
        return tuple(sorted(set(RAW_THRESHOLDS) | {self.threshold}))

    def knob(self, value: float | None) -> dict:
        """``ServingConfig`` keyword for exit setting ``value`` (``target=`` or ``threshold=``)."""
        return {"target": value} if self.threshold is None else {"threshold": value}

    def heads_for(self, model: str) -> str:
        """``auto``, ``shared`` or a heads folder for ``model`` (``heads`` may map models to these)."""
        return self.heads.get(model, "auto") if isinstance(self.heads, dict) else self.heads

    def layers_for(self, model: str) -> str | tuple[int, ...]:
        """``auto`` or the explicit exit layers of ``model`` (``layers`` may map models to lists)."""
        if isinstance(self.layers, dict):
            return self.layers.get(model, "auto")
        return self.layers


RAW_THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95)  # threshold mode's choices


def exit_setting(config) -> float | None:
    """The exit setting a ``ServingConfig`` carries: its precision target, else its raw threshold."""
    return config.target if getattr(config, "target", None) is not None else config.threshold


@dataclass(frozen=True)
class SamplingSection:
    temperature: float = 0.0
    top_p: float = 1.0
    ignore_eos: bool = True


@dataclass(frozen=True)
class RepositorySection:
    """Where model profiles live and how they are measured when missing or stale."""

    dir: str | None = None
    prompts: int = 8
    new_tokens: int = 24
    batches: tuple[int, ...] = (1, 8, 32)


@dataclass(frozen=True)
class BackendSection:
    """How the serving loop runs: ``kind`` live|sim (sim: the next issue), clock, timing, interval."""

    kind: str = "live"
    clock: str = "virtual"
    timing: str = "cpu"
    interval_s: float = 0.25
    drift: str = "off"  # probe: live costs corrected for the machine's speed against calibration (evaluation.probe)
    drift_interval_s: float = 1.25  # wall seconds between speed probes (the prefill probe: every fourth time)
    drift_window: int = 3  # probe samples whose median is the machine's speed now


@dataclass(frozen=True)
class EvaluationSection:
    controllers: tuple[str, ...] = ("static", "helios", "random")
    seeds: int = 1
    accuracy: bool = True
    cpu_watts_per_core: float = 15.0
    max_steps: int = 1_000_000


@dataclass(frozen=True)
class Scenario:
    """A validated scenario (see module docstring)."""

    name: str
    models: tuple[str, ...]
    workload: WorkloadSpec
    seed: int = 0
    slo: SLO = SLO()
    engine: EngineSection = EngineSection()
    exits: ExitSection = ExitSection()
    sampling: SamplingSection = SamplingSection()
    repository: RepositorySection = RepositorySection()
    backend: BackendSection = BackendSection()
    evaluation: EvaluationSection = EvaluationSection()
    controllers: dict[str, Any] = field(default_factory=dict)  # name -> params dataclass
    # arrival rates are multiples of the decode capacity at this batch until resolved (workload.rate_unit)
    rate_batch: int | None = None
    path: str = "<dict>"
    lines: dict[tuple, int] = field(default_factory=dict, repr=False, compare=False)

    def reference_model(self) -> str:
        """The model that scores served text (``slo.reference_model``; default the largest candidate)."""
        if self.slo.reference_model:
            return self.slo.reference_model
        from helios_rl.controllers.repository import checkpoint_facts

        size = {m: (f.non_layer_bytes + sum(f.layer_bytes)) for m in self.models for f in [checkpoint_facts(m, 4)]}
        return max(self.models, key=lambda m: (size[m], m))

    # ----- loading ------------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | Path) -> "Scenario":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
            root = yaml.compose(text)
        except (OSError, yaml.YAMLError) as exc:
            raise ScenarioError(f"{path}: cannot read scenario: {exc}") from None
        lines: dict[tuple, int] = {}
        try:
            _walk(root, (), lines)
        except ParamError as bad:
            raise ScenarioError(f"{path}:{lines.get(_path(bad.key), 1)}: {bad.key}: {bad.message}") from None
        data = yaml.safe_load(text)
        return cls.from_dict(data, source=str(path), lines=lines)

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>", lines: dict[tuple, int] | None = None) -> "Scenario":
        lines = lines or {}
        try:
            return _build(cls, data, source, lines)
        except ParamError as bad:
            raise ScenarioError(_where(source, lines, bad.key, bad.message)) from None

    def error(self, key: str, message: str) -> ScenarioError:
        """A :class:`ScenarioError` for ``key`` of this scenario, with file and line."""
        return ScenarioError(_where(self.path, self.lines, key, message))

    # ----- model-dependent checks ---------------------------------------------------------------
    def check_models(self, facts: dict[str, ModelFacts]) -> list[str]:
        """Impossible values given the models' sizes: depths beyond a model, a budget below one layer.

        A candidate that alone does not fit is legal (controllers must then avoid it) and comes back
        as a warning; a budget that fits no candidate at all, or not the static baseline, is an error.
        """
        mem = self.engine.memory()
        unfit = {}
        for name in self.models:
            prof = facts[name].as_profile()
            if prof.admissible_batch(1, mem) < 1:
                unfit[name] = (prof.weight_bytes(1), prof.slot_bytes(1, mem))
        if len(unfit) == len(self.models):
            name, (w, kv) = min(unfit.items(), key=lambda kv_: sum(kv_[1]))
            raise self.error("engine.memory_budget", f"{mem.budget_bytes} bytes cannot hold any candidate even at "
                             f"depth 1 with one request (smallest: {name} needs {w + kv} bytes: weights {w} "
                             f"+ KV {kv})")
        warnings = [f"{name} does not fit the memory budget at any depth (needs {w + kv} bytes at depth 1); "
                    f"controllers will not use it" for name, (w, kv) in unfit.items()]
        layers = {m: facts[m].num_layers for m in self.models}
        for m, n in layers.items():
            chosen = self.exits.layers_for(m)
            if chosen == "auto":
                continue
            where = f"exits.layers.{m}" if isinstance(self.exits.layers, dict) else "exits.layers"
            for i, layer in enumerate(chosen):
                if layer >= n - 1:
                    raise self.error(f"{where}[{i}]", f"layer {layer} is not an exit layer of {m} "
                                     f"(it has {n} layers: exits are 0..{n - 2})")
        st = self.controllers.get("static")
        if st is not None and st.depth is not None:
            model = st.model or self.models[0]
            if st.depth > layers[model]:
                raise self.error("controllers.static.depth", f"{st.depth} is beyond {model}'s {layers[model]} layers")
        if "static" in self.evaluation.controllers:
            model = (st.model if st is not None else None) or self.models[0]
            depth = (st.depth if st is not None else None) or layers[model]
            if facts[model].as_profile().admissible_batch(depth, mem) < 1:
                raise self.error("engine.memory_budget", f"the static baseline cannot hold {model} at depth {depth} "
                                 f"with one request in {mem.budget_bytes} bytes")
        bs = self.controllers.get("best-static")
        if bs is not None and bs.depths != "auto":
            for i, d in enumerate(bs.depths):
                if d > max(layers.values()):
                    raise self.error(f"controllers.best-static.depths[{i}]",
                                     f"{d} is beyond every candidate (most layers: {max(layers.values())})")
        hp = self.controllers.get("helios")
        if hp is not None and hp.min_depth > min(layers.values()):
            raise self.error("controllers.helios.min_depth", f"{hp.min_depth} is beyond the smallest candidate's "
                             f"{min(layers.values())} layers")
        return warnings

    # ----- variants ---------------------------------------------------------------------------------
    def params(self, controller: str) -> Any:
        """Params dataclass for ``controller`` (scenario values over defaults)."""
        return self.controllers.get(controller) or parse_params(controller, None)

    def with_seed(self, offset: int) -> "Scenario":
        """The same scenario with seed and workload seed advanced by ``offset`` (for multi-seed runs)."""
        return replace(self, seed=self.seed + offset, workload=replace(self.workload, seed=self.workload.seed + offset))

    def with_trace(self, path: str) -> "Scenario":
        """The same scenario with arrivals replayed from an Azure-format trace at ``path``."""
        arrival = ArrivalSpec(kind="trace", path=str(path))
        return replace(self, workload=replace(self.workload, arrival=arrival, prompt_tokens=None), rate_batch=None)


DEFAULT_SCENARIO = Path(__file__).resolve().parent / "scenarios" / "default.yaml"


def load_scenario(ref: "str | Path | Scenario | None") -> Scenario:
    """A scenario from a YAML path, an already loaded :class:`Scenario`, or ``None`` / ``"default"``
    for the embedded default (``helios_rl/scenarios/default.yaml``)."""
    if isinstance(ref, Scenario):
        return ref
    if ref is None or str(ref) == "default":
        return Scenario.from_yaml(DEFAULT_SCENARIO)
    return Scenario.from_yaml(ref)


# ----------------------------------------------------------------------------- building
def _build(cls, data: Any, source: str, lines: dict[tuple, int]) -> Scenario:
    r = Keys(data, "")
    name = r.get("name", string, Path(source).stem if source != "<dict>" else "scenario")
    seed = r.get("seed", number(0, integer=True), 0)
    models = r.get("models", _models, required=True)
    wdata = r.get("workload", lambda v, k: v, required=True)
    rate_batch = None
    if isinstance(wdata, dict) and "rate_unit" in wdata:  # arrival rates in units of the machine's capacity
        wdata = dict(wdata)
        rate_batch = _rate_unit(wdata.pop("rate_unit"), "workload.rate_unit")
    try:
        workload = WorkloadSpec.from_dict(wdata)
    except SpecError as exc:
        key, _, msg = str(exc).partition(": ")
        raise ParamError(f"workload.{key}" if msg else "workload", msg or str(exc)) from None
    s = Keys(r.get("slo", lambda v, k: v, {}), "slo")
    ttft, rel_ttft = s.get("ttft_s", _slo_time, (SLO.ttft_s, None))
    tpot, rel_tpot = s.get("tpot_s", _slo_time, (SLO.tpot_s, None))
    slo = SLO(ttft_s=ttft, tpot_s=tpot,
              relative=tuple(r for r in (("ttft_s", *rel_ttft) if rel_ttft else None,
                                         ("tpot_s", *rel_tpot) if rel_tpot else None) if r),
              agreement_floor=s.get("agreement_floor", number(0, 1), SLO.agreement_floor),
              objective=s.get("objective", choice(OBJECTIVES), SLO.objective),
              reference_model=s.get("reference_model", string, None),
              max_reference_ppl=s.get("max_reference_ppl", number(1), None))
    s.finish()
    e = Keys(r.get("engine", lambda v, k: v, {}), "engine")
    d = EngineSection()
    engine = EngineSection(
        memory_budget_bytes=e.get("memory_budget", parse_bytes, None),
        max_batch=e.get("max_batch", number(1, integer=True), d.max_batch),
        max_model_len=e.get("max_model_len", number(2, integer=True), d.max_model_len),
        kv_strategy=e.get("kv_strategy", choice(KV_STRATEGIES), d.kv_strategy),
        pending_window=e.get("pending_window", number(2, integer=True), d.pending_window),
        max_prefill_tokens=e.get("max_prefill_tokens", number(1, integer=True), d.max_prefill_tokens),
        device=e.get("device", string, None), dtype=e.get("dtype", choice(DTYPES), None),
        threads=e.get("threads", number(1, integer=True), d.threads))
    e.finish()
    x = Keys(r.get("exits", lambda v, k: v, {}), "exits")
    exits = ExitSection(heads=x.get("heads", _heads, "auto"), layers=x.get("layers", _layers, "auto"),
                        threshold=x.get("threshold", _threshold, None),
                        default_threshold=x.get("default_threshold", number(0, 1), 0.9),
                        measure=x.get("measure", choice(CONFIDENCE_MEASURES), "max_prob"),
                        target=x.get("target", number(0, 1, lo_open=True), 0.95),
                        targets=x.get("targets", _targets, (0.99, 0.95, 0.9, 0.8)))
    x.finish()
    if exits.mode == "target":
        if exits.target not in exits.targets:
            raise ParamError("exits.target", f"{exits.target} is not one of exits.targets {list(exits.targets)}")
        if exits.layers != "auto":
            raise ParamError("exits.layers", "a precision target names its own exit layers: use layers: auto, or "
                                             "set a raw threshold (exits.threshold) to choose layers")
    sp = Keys(r.get("sampling", lambda v, k: v, {}), "sampling")
    sampling = SamplingSection(temperature=sp.get("temperature", number(0), 0.0), top_p=sp.get("top_p", number(0, 1, lo_open=True), 1.0),
                               ignore_eos=sp.get("ignore_eos", boolean, True))
    sp.finish()
    rp = Keys(r.get("repository", lambda v, k: v, {}), "repository")
    repo = RepositorySection(dir=rp.get("dir", string, None), prompts=rp.get("prompts", number(1, integer=True), 8),
                             new_tokens=rp.get("new_tokens", number(2, integer=True), 24),
                             batches=rp.get("batches", _int_list, (1, 8, 32)))
    rp.finish()
    b = Keys(r.get("backend", lambda v, k: v, {}), "backend")
    backend = BackendSection(kind=b.get("kind", choice(BACKENDS), "live"), clock=b.get("clock", choice(CLOCKS), "virtual"),
                             timing=b.get("timing", choice(TIMINGS), "cpu"),
                             interval_s=b.get("interval_s", number(0, lo_open=True), 0.25),
                             drift=b.get("drift", choice(DRIFTS), "off"),
                             drift_interval_s=b.get("drift_interval_s", number(0, lo_open=True), 1.25),
                             drift_window=b.get("drift_window", number(1, integer=True), 3))
    if backend.drift == "probe" and (backend.clock == "wall" or backend.timing == "modeled"):
        raise ParamError("backend.drift", "a speed probe corrects measured costs on the virtual clock; it needs "
                                          f"clock: virtual and timing: cpu or wall (got clock: {backend.clock}, "
                                          f"timing: {backend.timing})")
    b.finish()
    c = Keys(r.get("controllers", lambda v, k: v, {}), "controllers")
    controllers = {}
    for cname in list(c.data):
        controllers[cname] = c.get(cname, lambda v, k, n=cname: parse_params(n, v, k)) or parse_params(cname, None)
    c.finish()
    v = Keys(r.get("evaluation", lambda v, k: v, {}), "evaluation")
    ev = EvaluationSection(controllers=v.get("controllers", _controller_names, EvaluationSection.controllers),
                           seeds=v.get("seeds", number(1, integer=True), 1), accuracy=v.get("accuracy", boolean, True),
                           cpu_watts_per_core=v.get("cpu_watts_per_core", number(0, lo_open=True), 15.0),
                           max_steps=v.get("max_steps", number(1, integer=True), 1_000_000))
    v.finish()
    r.finish()
    for key, p in controllers.items():
        for mkey in ("model",):
            m = getattr(p, mkey, None)
            if m is not None and m not in models:
                raise ParamError(f"controllers.{key}.{mkey}", f"{m!r} is not one of the scenario's models {list(models)}")
        for i, m in enumerate(getattr(p, "models", None) or ()):
            if m not in models:
                raise ParamError(f"controllers.{key}.models[{i}]", f"{m!r} is not one of the scenario's models {list(models)}")
    for section in ("layers", "heads"):
        for m in getattr(exits, section) if isinstance(getattr(exits, section), dict) else ():
            if m not in models:
                raise ParamError(f"exits.{section}.{m}", f"{m!r} is not one of the scenario's models {list(models)}")
    lo, hi = workload.new_tokens_range()
    if workload.max_prompt_tokens is not None and workload.max_prompt_tokens + hi >= engine.max_model_len:
        raise ParamError("engine.max_model_len", f"{engine.max_model_len} tokens cannot hold a prompt of up to "
                   f"{workload.max_prompt_tokens} tokens (workload.max_prompt_tokens) plus {hi} new tokens")
    if rate_batch is not None and workload.arrival.kind not in ("poisson", "gamma", "piecewise"):
        raise ParamError("workload.rate_unit", f"rates relative to capacity apply to poisson, gamma and piecewise "
                                               f"arrivals; a {workload.arrival.kind} replays its own rates")
    return cls(name=name, models=models, workload=workload, seed=seed, slo=slo, engine=engine, exits=exits,
               rate_batch=rate_batch,
               sampling=sampling, repository=repo, backend=backend, evaluation=ev, controllers=controllers,
               path=source, lines=lines)


def _models(v: Any, key: str) -> tuple[str, ...]:
    if not isinstance(v, list) or not v:
        raise ParamError(key, "expected a non-empty list of model references (bundled name, folder, .gguf or hub id)")
    out = tuple(string(m, f"{key}[{i}]") for i, m in enumerate(v))
    for i, m in enumerate(out):
        if m in out[:i]:
            raise ParamError(f"{key}[{i}]", f"duplicate model {m!r}")
    return out


def _layers(v: Any, key: str) -> str | tuple[int, ...] | dict:
    if v == "auto":
        return "auto"
    if isinstance(v, dict):
        return {str(m): _layers(x, f"{key}.{m}") for m, x in v.items()}
    if not isinstance(v, list):
        raise ParamError(key, f"expected 'auto', a list of layer indices, or {{model: 'auto' or list}}, got {v!r}")
    return tuple(number(0, integer=True)(x, f"{key}[{i}]") for i, x in enumerate(v))


def _heads(v: Any, key: str) -> str | dict[str, str]:
    if isinstance(v, dict):
        return {str(m): string(x, f"{key}.{m}") for m, x in v.items()}
    return string(v, key)


def _threshold(v: Any, key: str) -> float | None:
    return None if v == "calibrated" else number(0, 1)(v, key)


def _slo_time(v: Any, key: str) -> tuple[float, tuple[float, int] | None]:
    """Seconds, or ``{x_step: M, batch: B}``: M times the static model's full-depth decode step at batch B
    on this machine (measured at calibration and resolved from the profile, so the scenario poses the same
    problem on a faster or slower machine)."""
    if isinstance(v, dict):
        k = Keys(v, key)
        mult = k.get("x_step", number(0, lo_open=True), required=True)
        batch = k.get("batch", number(1, integer=True), 1)
        k.finish()
        return float("nan"), (float(mult), int(batch))
    return number(0, lo_open=True)(v, key), None


def step_reference_model(sc: "Scenario") -> str:
    """The model whose full-depth decode step relative SLOs are multiples of (and the speed probe times):
    the static baseline's, else the scenario's first."""
    st = sc.controllers.get("static")
    return (st.model if st is not None and getattr(st, "model", None) else None) or sc.models[0]


def reference_batches(sc: "Scenario") -> tuple[int, ...]:
    """The batches at which this scenario's relative SLOs (``x_step``) and arrival rates (``rate_unit``) take
    the reference model's full-depth decode step: calibration measures the step at each of them."""
    return tuple(sorted({b for _, _, b in sc.slo.relative} | ({sc.rate_batch} if sc.rate_batch is not None else set())))


def _rate_unit(v: Any, key: str) -> int:
    """``{capacity_batch: B}``: the workload's arrival rates are multiples of the machine's decode capacity."""
    k = Keys(v, key)
    batch = k.get("capacity_batch", number(1, integer=True), required=True)
    k.finish()
    return int(batch)


def capacity_rps(sc: "Scenario", step_time, batch: int) -> float:
    """Requests/s the SLO reference model decodes at full depth at ``batch`` on this machine: ``batch`` tokens
    per ``step_time(model, batch)`` seconds, over the workload's mean new tokens per request (prefill not
    counted)."""
    lo, hi = sc.workload.new_tokens_range()
    return batch / step_time(step_reference_model(sc), batch) / ((lo + hi) / 2)


def resolve_rates(sc: "Scenario", step_time) -> "Scenario":
    """``sc`` with arrival rates written relative to capacity (``workload.rate_unit``) in requests/s."""
    if sc.rate_batch is None:
        return sc
    cap = capacity_rps(sc, step_time, sc.rate_batch)
    a = sc.workload.arrival
    arrival = replace(a, rate=a.rate * cap if a.rate is not None else None,
                      segments=tuple((t, r * cap) for t, r in a.segments))
    return replace(sc, workload=replace(sc.workload, arrival=arrival), rate_batch=None)


def slo_record(resolved: "Scenario", declared: "Scenario", reference: dict | None = None) -> dict:
    """The SLO a run served against, as results record it: every field in seconds as resolved on this machine,
    the relative terms it was resolved from (``[name, multiple, batch]``; empty when absolute) and the reference
    steps they were multiples of (``reference``: model, seconds by batch, and whether measured or fitted)."""
    from dataclasses import asdict

    out = {**asdict(resolved.slo), "relative": [list(r) for r in declared.slo.relative]}
    if reference is not None:
        out["reference"] = reference
    if declared.rate_batch is not None:  # the arrival rates the run served, resolved from capacity multiples
        a = resolved.workload.arrival
        out["arrival"] = {"rate_unit": {"capacity_batch": declared.rate_batch}, "rate": a.rate,
                          "segments": [list(x) for x in a.segments]}
    return out


def resolve_slo(sc: "Scenario", step_time) -> "Scenario":
    """``sc`` with its relative SLOs in seconds (and its relative arrival rates in requests/s, see
    :func:`resolve_rates`): ``step_time(model, batch)`` is the full-depth decode step of ``model`` at ``batch``
    (a calibrated profile's measured reference step, :meth:`~helios_rl.env.profile.SimProfile.reference_step`);
    the model is the static baseline's."""
    sc = resolve_rates(sc, step_time)
    if not sc.slo.relative:
        return sc
    model = step_reference_model(sc)
    values = {name: mult * step_time(model, batch) for name, mult, batch in sc.slo.relative}
    return replace(sc, slo=replace(sc.slo, relative=(), **values))


def _targets(v: Any, key: str) -> tuple[float, ...]:
    if not isinstance(v, list) or not v:
        raise ParamError(key, f"expected a non-empty list of precision targets in (0, 1], got {v!r}")
    return tuple(sorted({number(0, 1, lo_open=True)(x, f"{key}[{i}]") for i, x in enumerate(v)}, reverse=True))


def _int_list(v: Any, key: str) -> tuple[int, ...]:
    if not isinstance(v, list) or not v:
        raise ParamError(key, f"expected a non-empty list of integers, got {v!r}")
    return tuple(number(1, integer=True)(x, f"{key}[{i}]") for i, x in enumerate(v))


def _controller_names(v: Any, key: str) -> tuple[str, ...]:
    if isinstance(v, str):
        v = [x.strip() for x in v.split(",") if x.strip()]
    if not isinstance(v, list) or not v:
        raise ParamError(key, f"expected a list of controller names from {sorted(PARAMS)}")
    for i, name in enumerate(v):
        choice(tuple(PARAMS))(name, f"{key}[{i}]")
    return tuple(v)


# ----------------------------------------------------------------------------- line numbers
def _walk(node: Any, path: tuple, lines: dict[tuple, int]) -> None:
    """Record the line of every key and item; reject duplicate keys (YAML would keep the last)."""
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for k, v in node.value:
            key = path + (k.value,)
            lines[key] = k.start_mark.line + 1
            if k.value in seen:
                raise ParamError(".".join(map(str, key)), "duplicate key")
            seen.add(k.value)
            _walk(v, key, lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[path + (i,)] = item.start_mark.line + 1
            _walk(item, path + (i,), lines)


def _path(key: str) -> tuple:
    out: list = []
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", key):
        out.append(int(part[1:-1]) if part.startswith("[") else part)
    return tuple(out)


def _where(source: str, lines: dict[tuple, int], key: str, message: str) -> str:
    path = _path(key)
    while path and path not in lines:
        path = path[:-1]
    line = lines.get(path)
    return f"{source}:{line}: {key}: {message}" if line else f"{source}: {key}: {message}"
