"""Simulator profiles: what ``helios-rl calibrate`` measured on the live engine, as JSON.

Per model: the step-time model (seconds of one engine step from its work: rows x layers run, head
evaluations, context, prefill), load costs, the admissible batch and resident bytes per depth, and
per (depth, threshold) the exit-layer distribution, breach rate, confidence and agreement with
full-depth greedy output. A profile records the engine version and each model's config hash; using
it with another engine or another model is a :class:`ProfileError`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from helios_rl.env.backend import engine_version, thr_key
from helios_rl.utils.io import atomic_write_json

PROFILE_FORMAT = "helios_rl.sim_profile/1"
#: Row counts where a layer's or a head's cost per row may change slope (CPU matmuls read the weights once
#: up to some rows, then grow with them; see models.kernels): the cost of one layer (or head) call on n rows is
#: fitted as a non-negative mix of n, min(n, k) and max(0, n - k), i.e. any increasing piecewise-linear
#: curve with these knots (min(n, 1): a fixed cost per call), not a straight line through a few batch sizes.
KNOTS = (1, 4, 8, 16)


def _knotted(name: str) -> tuple[str, ...]:
    return (*(f"c_{name}_min{k}" for k in KNOTS), f"c_{name}_over{KNOTS[-1]}")


#: Step-time features, in order (see :func:`step_features`). Profiles written before a feature existed lack its
#: coefficient, which then counts as 0.
FEATURES = ("c0", "c_depth", "c_tok", "c_row_layer", "c_head", "c_ctx", "c_prefill", "c_pass", "c_lm",
            *_knotted("layer"), *_knotted("head"), *_knotted("lm"))


class ProfileError(ValueError):
    """A profile that cannot serve this scenario (other engine version, other model, malformed)."""


def _knots(rows: np.ndarray) -> list[float]:
    """``sum min(rows, k)`` for every knot, then ``sum max(0, rows - last knot)`` (see ``KNOTS``)."""
    return [float(np.minimum(rows, k).sum()) for k in KNOTS] + [float(np.maximum(rows - KNOTS[-1], 0.0).sum())]


def step_features(depth: int, decode_counts: np.ndarray, exit_layers: list[int], ctx_mean: float,
                  prefill_tokens: int = 0, prefill_rows: int = 0, prefill_done: int = 0) -> np.ndarray:
    """Feature vector of one engine step (``FEATURES`` order): its work, not its time.

    A step runs up to two passes over the loaded layers (``Engine.step``): a prefill pass over
    ``prefill_tokens`` prompt positions of ``prefill_rows`` requests (``prefill_done`` of them finish their
    prompt and take their first token from the final head), and a decode pass whose rows leave at the layers
    ``decode_counts`` counts (length >= ``depth``; fractional where the simulator passes expected rows). At
    each layer the decode pass runs the rows that have not left yet; every exit layer of ``exit_layers``
    below the last loaded one reads them out over its exit vocabulary (``c_head``; a leaving row's
    full-width logits are an expansion, priced per token), and the last loaded layer's full-width head
    (``c_lm``: Gemma3's is 262k rows) runs once on the rows that reach it and once on the prefill pass's.
    """
    counts = np.asarray(decode_counts, dtype=float)[:depth]
    reach = np.cumsum(counts[::-1])[::-1]  # rows running each loaded layer
    ex = sorted(l for l in exit_layers if l < depth - 1)
    readouts = reach[ex]  # an exit head reads out (over its exit vocabulary) the rows reaching its layer
    # the last loaded layer's full-width head: once for the decode rows reaching it, once for the prefill pass
    lm = np.asarray(([reach[-1]] if len(reach) else []) + ([prefill_rows] if prefill_rows else []), dtype=float)
    tokens = float(counts.sum()) + prefill_done
    rows_layers = float(reach.sum()) + prefill_done * depth
    both = depth if prefill_rows and counts.sum() > 0 else 0  # a second pass over the loaded layers
    return np.array([1.0, depth, tokens, rows_layers, float(readouts.sum()), rows_layers * ctx_mean,
                     prefill_tokens * depth, both, float(lm.sum()), *_knots(reach), *_knots(readouts), *_knots(lm)])


def record_features(rec, exit_layers: list[int], ctx_mean: float) -> np.ndarray:
    """:func:`step_features` of a step the engine ran (its ``StepRecord``): a prompt that finished in the prefill
    pass counts its first token at the last loaded layer, which the decode pass did not run."""
    decode = np.asarray(rec.exit_counts, dtype=float).copy()
    decode[rec.depth - 1] -= rec.prefill_done
    return step_features(rec.depth, decode, exit_layers, ctx_mean, rec.prefill_tokens, rec.prefill_rows,
                         rec.prefill_done)


def step_cost(coef: dict[str, float], features: np.ndarray) -> float:
    """Seconds the fitted step-time model gives a feature vector (coefficients a profile lacks count as 0)."""
    return float(np.dot([coef.get(k, 0.0) for k in FEATURES], features))


@dataclass
class ModelSim:
    """Everything the simulator knows about one model."""

    name: str
    config_hash: str
    num_layers: int
    exit_layers: list[int]
    admissible: list[int]  # index depth-1
    weight_bytes: list[int]  # resident weights at each depth
    slot_bytes: list[int]  # KV bytes of one request slot at each depth
    step_coef: dict[str, float]
    residual_sigma: float = 0.0  # relative std of measured step time around the fit
    load_overhead_s: float = 0.0
    load_s_per_byte: float = 0.0
    unload_s_per_byte: float = 0.0  # freeing a model's weights when switching away from it
    switch_from: dict[str, float] = field(default_factory=dict)  # measured engine switch overhead from model X
    tokenizer_s: float = 0.0  # loading this model's tokenizer (a switch away loads it if no request did)
    exits: dict[str, dict] = field(default_factory=dict)  # "depth:thr" -> {p, breach, agreement, conf}

    def exit_stats(self, depth: int, threshold: float | None,
                   task: str | None = None) -> tuple[np.ndarray, float, float, float]:
        """(exit distribution over layers, breach rate, agreement, mean confidence) at a config, for
        one task of the workload where the profile measured it per task (else over all tasks).

        Measured points are used as they are; others are derived from the deepest measured depth at
        the nearest threshold: tokens that would exit deeper than the loaded depth exit at its last
        layer as breaches, and agreement is interpolated between measured depths.
        """
        def pick(v: dict) -> dict:
            return v.get("by_task", {}).get(task, v) if task is not None else v

        key = f"{depth}:{thr_key(threshold)}"
        st = self.exits.get(key)
        if st is not None:
            st = pick(st)
            return np.asarray(st["p"], dtype=float), st["breach"], st["agreement"], st["conf"]
        tk = self._nearest_thr(threshold)
        rows = sorted((int(k.split(":")[0]), pick(v)) for k, v in self.exits.items() if k.split(":")[1] == tk)
        if not rows:
            p = np.zeros(self.num_layers)
            p[depth - 1] = 1.0
            return p, 0.0, 1.0 if depth == self.num_layers else 0.0, 0.0
        deeper = [v for d, v in rows if d >= depth] or [rows[-1][1]]
        full = np.asarray(deeper[0]["p"], dtype=float)
        p = full.copy()
        p[depth - 1] = full[depth - 1:].sum()
        p[depth:] = 0.0
        # below full depth every token reaching the last loaded layer is a breach, unless that layer is
        # one of the setting's exit layers (then the tokens that exited there confidently are not)
        at_cut = 0.0 if depth - 1 in self.layers_for(threshold) else float(full[depth - 1])
        breach = float(full[depth:].sum()) + at_cut if depth < self.num_layers else 0.0
        ds = [d for d, _ in rows]
        agree = float(np.interp(depth, ds, [v["agreement"] for _, v in rows]))
        conf = float(np.interp(depth, ds, [v["conf"] for _, v in rows]))
        return p, breach, agree, conf

    def request_draws(self, depth: int, threshold: float | None, task: str | None) -> tuple[list, list, list]:
        """Measured per-request agreements, reference perplexities (where calibrated) and token-by-token
        matches (``"1"``/``"0"`` strings; profiles calibrated before they were recorded have none) of a
        config and task, to draw simulated requests from; empty where the point was not measured."""
        st = self.exits.get(f"{depth}:{thr_key(threshold)}")
        if st is None:
            return [], [], []
        st = st.get("by_task", {}).get(task, st) if task is not None else st
        return (list(st.get("request_agreements", [])), list(st.get("request_ppl", [])),
                list(st.get("request_matches", [])))

    def layers_for(self, threshold: float | None) -> list[int]:
        """The exit layers an exit setting uses (a precision target names its own; recorded per point)."""
        tk = self._nearest_thr(threshold)
        for k, v in self.exits.items():
            if k.split(":")[1] == tk and "layers" in v:
                return [int(l) for l in v["layers"]]
        return list(self.exit_layers)

    def _nearest_thr(self, threshold: float | None) -> str:
        keys = {k.split(":")[1] for k in self.exits}
        want = thr_key(threshold)
        if want in keys or not keys:
            return want
        numeric = [k for k in keys if k != "cal"]
        if threshold is None or not numeric:
            return "cal" if "cal" in keys else sorted(keys)[0]
        return min(numeric, key=lambda k: abs(float(k) - float(threshold)))

    def step_time(self, batch: int, ctx_tokens: float = 64.0, depth: int | None = None) -> float:
        """Fitted seconds of one full-depth (or ``depth``) decode step of ``batch`` rows without exits."""
        d = depth or self.num_layers
        counts = np.zeros(d)
        counts[d - 1] = batch
        return step_cost(self.step_coef, step_features(d, counts, [], ctx_tokens))

    def load_seconds(self, from_depth: int, to_depth: int, with_base: bool) -> float:
        base = 0 if with_base or from_depth < 1 else self.weight_bytes[from_depth - 1]
        nbytes = self.weight_bytes[to_depth - 1] - base
        return (self.load_overhead_s if with_base else 0.0) + max(0, nbytes) * self.load_s_per_byte


@dataclass
class SimProfile:
    """A calibrated profile of the live engine for one scenario's models (see module docstring)."""

    engine_version: str
    scenario: str
    timing: str
    settings: dict
    models: dict[str, ModelSim]
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"format": PROFILE_FORMAT, "engine_version": self.engine_version, "scenario": self.scenario,
                "timing": self.timing, "settings": self.settings, "meta": self.meta,
                "models": {k: asdict(v) for k, v in self.models.items()}}

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "SimProfile":
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ProfileError(f"{path}: cannot read simulator profile: {exc}") from None
        if not isinstance(d, dict) or d.get("format") != PROFILE_FORMAT:
            raise ProfileError(f"{path}: not a simulator profile (expected format {PROFILE_FORMAT!r}); "
                               f"write one with `helios-rl calibrate SCENARIO --out {path}`")
        try:
            models = {k: ModelSim(**v) for k, v in d["models"].items()}
            return cls(d["engine_version"], d["scenario"], d["timing"], d["settings"], models, d.get("meta", {}))
        except (KeyError, TypeError) as exc:
            raise ProfileError(f"{path}: malformed simulator profile: {exc}") from None

    def reference_step(self, model: str, batch: int) -> float:
        """Seconds of ``model``'s full-depth decode step at ``batch``: the relative SLOs' and arrival rates' unit.

        Measured at calibration (``meta["reference_steps"]``, the median of speed-probe steps taken before,
        between and after the models' calibrations), not read off the step-time fit, so what a scenario poses
        does not move with the fit's error at one point. A profile timed as ``modeled`` has no machine to
        measure: its (modeled) fit answers. Otherwise a batch calibration did not measure is an error."""
        ref = self.meta.get("reference_steps") or {}
        if ref.get("model") == model and str(int(batch)) in ref.get("s", {}):
            return float(ref["s"][str(int(batch))])
        if self.timing == "modeled":
            return self.models[model].step_time(batch)
        have = sorted(int(b) for b in ref.get("s", {})) if ref.get("model") == model else []
        raise ProfileError(f"profile of {self.scenario!r} has no measured full-depth step of {model} at batch {batch} "
                           f"(measured: {have or 'none'}); re-calibrate it for this scenario")

    def reference_record(self, model: str, batches) -> dict:
        """What :meth:`reference_step` answered, as results record it beside the resolved SLO."""
        measured = (self.meta.get("reference_steps") or {}).get("model") == model and self.timing != "modeled"
        return {"model": model, "source": "measured" if measured else f"step-time fit (timing: {self.timing})",
                "step_s": {str(b): round(self.reference_step(model, b), 6) for b in batches}}

    def check(self, scenario, where: str = "profile") -> None:
        """Raise :class:`ProfileError` unless this profile was measured on this engine and these models."""
        from helios_rl.env.backend import config_hash
        from helios_rl.models.registry import resolve_model

        here = engine_version()
        if self.engine_version != here:
            raise ProfileError(f"{where}: measured on engine version {self.engine_version}, this engine is {here}; "
                               f"re-run `helios-rl calibrate {scenario.path} --out {where}`")
        missing = [m for m in scenario.models if m not in self.models]
        if missing:
            raise ProfileError(f"{where}: has no calibration for model(s) {missing} of scenario {scenario.name!r} "
                               f"(profiled: {sorted(self.models)})")
        for m in scenario.models:
            h = config_hash(resolve_model(m, progress=False))
            if self.models[m].config_hash != h:
                raise ProfileError(f"{where}: model {m!r} has config hash {h}, the profile measured "
                                   f"{self.models[m].config_hash} (another model under the same name)")
        budget = scenario.engine.memory_budget_bytes
        if self.settings.get("memory_budget_bytes") != budget or self.settings.get("max_batch") != scenario.engine.max_batch:
            raise ProfileError(f"{where}: measured with memory budget {self.settings.get('memory_budget_bytes')} and "
                               f"max_batch {self.settings.get('max_batch')}; the scenario has {budget} and "
                               f"{scenario.engine.max_batch}")
        for key in ("max_model_len", "kv_strategy", "max_prefill_tokens"):  # they size the batches it admits
            if key in self.settings and self.settings[key] != getattr(scenario.engine, key):
                raise ProfileError(f"{where}: measured with engine.{key} {self.settings[key]!r}; the scenario has "
                                   f"{getattr(scenario.engine, key)!r}")
        recorded = self.meta.get("linear_plan")
        if isinstance(recorded, dict) and "mode" in recorded:  # step times rest on the kernels the plan chose
            here_plan = current_linear_plan(scenario, rows=False)
            if here_plan is not None and (here_plan["mode"], here_plan["machine"]) != (recorded["mode"],
                                                                                       recorded.get("machine")):
                raise ProfileError(f"{where}: measured under the CPU linear-kernel plan of HELIOS_RL_LINEAR_PLAN="
                                   f"{recorded['mode']} on machine {recorded.get('machine')}; this process runs "
                                   f"{here_plan['mode']} on {here_plan['machine']} (helios_rl.models.kernels): its "
                                   f"step times are not this engine's; re-calibrate")
        from helios_rl.scenario import reference_batches, step_reference_model

        for b in reference_batches(scenario):  # relative SLOs and rates are resolved from measured steps
            try:
                self.reference_step(step_reference_model(scenario), b)
            except ProfileError as exc:
                raise ProfileError(f"{where}: {exc}") from None


def current_linear_plan(scenario, rows: bool = True) -> dict | None:
    """What a CPU engine of ``scenario`` multiplies with (at the scenario's thread count), as calibration records
    it: ``{"mode": HELIOS_RL_LINEAR_PLAN's mode, "machine": the plan's machine key, "rows": the plan}``; None off
    the CPU. A profile is checked against the mode and machine only (``rows=False``: nothing is measured or read
    for the check); the rows are a record (a plan measured again on the same machine may differ at near-ties,
    which is not another engine)."""
    from helios_rl.evaluation.runtime import set_threads
    from helios_rl.utils.device import resolve_device

    if resolve_device(scenario.engine.device).type != "cpu":
        return None
    from helios_rl.models.kernels import plan_identity, plan_record

    prev = set_threads(scenario.engine.threads)
    try:
        return plan_record() if rows else plan_identity()
    finally:
        set_threads(prev)


# the slo keys a calibration reads (a perplexity floor decides whether served text is scored against the
# reference model, and which model that is); targets and floors on latency and agreement are not among them,
# nor the perplexity floor's value (the calibration records every request's perplexity, whatever the floor)
_SLO_CALIBRATED = ("max_reference_ppl", "reference_model")


def _calibrated_slo(key: str, value):
    """What of an SLO key enters the profile key: the perplexity floor only as scored / not scored."""
    return "scored" if key == "max_reference_ppl" and value is not None else value


def resolve_scenario(scenario, prof: SimProfile):
    """``scenario`` with its relative SLOs and arrival rates in seconds and requests/s on the machine ``prof``
    calibrated (multiples of its measured reference steps), and the record of those steps (None when the
    scenario has no relative term)."""
    from helios_rl.scenario import reference_batches, resolve_slo, step_reference_model

    batches = reference_batches(scenario)
    ref = prof.reference_record(step_reference_model(scenario), batches) if batches else None
    return resolve_slo(scenario, prof.reference_step), ref


def default_profile_path(scenario, calibrate_kwargs: dict | None = None) -> Path:
    """Where ``helios-rl calibrate`` keeps the profile of ``scenario`` when no ``--out`` is given: the
    cache, keyed by the scenario's name and a hash of its file's content (or its dict form) without comments
    and without the SLO's latency and agreement targets: those do not enter a calibration (relative ones are
    resolved from the profile when an environment is built), so a scenario whose SLO is re-chosen keeps its
    profile; whether served text is scored for a perplexity floor, and by which reference model, does enter it
    and stays in the key (the floor's value does not: re-choosing it keeps the profile), and so do the batches
    a relative SLO or arrival rate names (calibration measures the reference step at each)."""
    import hashlib

    import yaml

    from helios_rl.utils.paths import cache_dir

    src = Path(scenario.path) if scenario.path and scenario.path != "<dict>" else None
    if src is not None and src.exists():
        data = yaml.safe_load(src.read_text(encoding="utf-8"))
        if isinstance(data, dict) and isinstance(data.get("slo"), dict):
            kept = {k: _calibrated_slo(k, v) for k, v in data["slo"].items() if k in _SLO_CALIBRATED}
            # a relative SLO's batch (where calibration measures the reference step), not its multiple: read
            # from the file, so the scenario as written and as resolved share one key
            kept.update({k: {"batch": v.get("batch", 1)} for k, v in data["slo"].items()
                         if k in ("ttft_s", "tpot_s") and isinstance(v, dict)})
            data["slo"] = kept
            if not kept:
                del data["slo"]
        text = json.dumps(data, sort_keys=True, default=str).encode()
    else:
        from dataclasses import replace

        from helios_rl.scenario import reference_batches

        slo = scenario.slo
        kept = [_calibrated_slo(k, getattr(slo, k)) for k in _SLO_CALIBRATED]
        text = repr(replace(scenario, slo=None)).encode() + repr(kept).encode()
        # the batches whose reference step calibration measures (relative SLOs' batches enter, their multiples not)
        text += repr(reference_batches(scenario)).encode()
    if calibrate_kwargs:  # a profile calibrated another way (fewer tokens per point, ...) is another profile
        text += json.dumps(calibrate_kwargs, sort_keys=True, default=str).encode()
    key = hashlib.sha256(text).hexdigest()[:12]
    folder = cache_dir() / "profiles"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{scenario.name}-{key}.json"


def ensure_profile(scenario, say=lambda s: None, **calibrate_kwargs) -> Path:
    """The cached profile of ``scenario``, calibrated now (once, under a file lock) when missing or
    stale (another engine version or model)."""
    import fcntl

    path = default_profile_path(scenario, calibrate_kwargs)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            try:
                SimProfile.load(path).check(scenario, str(path))
                return path
            except ProfileError as exc:
                say(f"recalibrating: {exc}")
        from helios_rl.env.calibrate import calibrate

        say(f"calibrating the simulator for {scenario.name} (once; cached in {path})")
        calibrate(scenario, say=say, **calibrate_kwargs).save(path)
    return path
