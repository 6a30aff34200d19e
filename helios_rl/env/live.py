"""The live backend: the real engine serving the scenario's real prompts, interval by interval.

It reuses the evaluation replay's pieces (:class:`ModelLoader`, :class:`VirtualClock`,
:class:`Timer`, ``exit_layers_for``, ``format_prompt``): under the virtual clock (default) arrivals
are placed on a clock that advances by each step's measured compute time (the scenario's
``backend.timing``), and jumps to the next arrival when the engine is idle, so nothing sleeps; under
the wall clock time passes by itself and idle gaps are slept. Load and switch costs are real: the
engine really loads the layers and the clock is charged what that cost. With ``backend.drift: probe``
every cost is corrected for how far the machine's speed has moved since calibration, measured by a
probe step every few seconds (:mod:`helios_rl.evaluation.probe`; the factors are in the episode summary).

Every request that finishes is scored on what it was served (:mod:`helios_rl.evaluation.scorer`:
free-running agreement with the serving model's own full-depth output, teacher-forced agreement,
reference-model perplexity; ``score="agreement"`` measures only what goodput and the reward read), outside
the episode's clock and the memory budget; an interval's ``agreement`` is that measurement, and the simulator
profile's prediction, where one is loaded, is kept beside it in ``Interval.extra``. The references (the full
models' own continuations) of an episode's requests are computed together, batched, the first time a model's
are needed (:meth:`ServedScorer.expect`), and kept for the backend's life: every method served on the same
workload seed is scored against the same references.
"""

from __future__ import annotations

import gc
import time

import torch

from helios_rl.controllers.repository import checkpoint_facts
from helios_rl.engine.config import ServingConfig
from helios_rl.scenario import exit_setting
from helios_rl.engine.engine import Engine
from helios_rl.engine.request import RequestError, SamplingParams
from helios_rl.env.backend import Interval, admissible_table, episode_summary, require_resolved_slo
from helios_rl.evaluation.accuracy import Segment
from helios_rl.evaluation.replay import format_prompt
from helios_rl.evaluation.scorer import ScoreTotals, ServedRequest, quality_ok
from helios_rl.evaluation.runtime import ModelLoader, Timer, VirtualClock, exit_layers_for
from helios_rl.models.layered import release_freed_memory
from helios_rl.utils.device import parse_dtype, resolve_device


class WallClock:
    """Seconds since the episode started; ``jump_to`` sleeps until then, ``advance`` is a no-op."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    @property
    def now(self) -> float:
        return time.perf_counter() - self.t0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        pass

    def jump_to(self, t: float) -> None:
        delay = t - self.now
        if delay > 0:
            time.sleep(delay)

    def exclude(self, seconds: float) -> None:
        """Take ``seconds`` (work outside serving, e.g. scoring) off the episode's clock."""
        self.t0 += seconds


# ``backend.drift: probe``: the prefill probe (a 0.33 s step on the project's VM) runs every this many probe events:
# every 5 s at the default 1.25 s interval, the cadence chosen with the window on development seeds
# (benchmarks/drift_estimators.py; benchmarks/RESULTS.md, issue 14)
PREFILL_EVERY = 4
# what the live backend measures on every finished request: "all" (free-running agreement, teacher-forced
# agreement, reference perplexity), "agreement" (the free-running agreement, and the reference perplexity only
# where the SLO has a floor on it: what goodput and the reward read), "none" (the profile's prediction)
SCORES = {True: "all", "all": "all", "agreement": "agreement", False: "none", "none": "none"}


class LiveBackend:
    """The real engine under control (see module docstring). ``score``: see :data:`SCORES`."""

    def __init__(self, scenario, workload, clock: str = "virtual", timing: str | None = None, profile=None,
                 score: bool | str = True) -> None:
        if clock not in ("virtual", "wall"):
            raise ValueError(f"clock must be 'virtual' or 'wall', got {clock!r}")
        sc = self.scenario = scenario
        require_resolved_slo(sc, "the live backend")
        self.workload, self.clock_kind = workload, clock
        self.timer = Timer("wall" if clock == "wall" else (timing or sc.backend.timing))
        self.device = resolve_device(sc.engine.device)
        elem = torch.tensor([], dtype=parse_dtype(sc.engine.dtype, self.device)).element_size()
        self.facts = {m: checkpoint_facts(m, elem).as_profile() for m in sc.models}
        self.models = tuple(sc.models)
        self.num_layers = {m: f.num_layers for m in sc.models for f in [self.facts[m]]}
        self.mem = sc.engine.memory()
        self.loader = ModelLoader(sc.engine.device, sc.engine.dtype, sc.exits.heads)
        self.settings = sc.engine.settings(sc.exits.measure, sc.exits.default_threshold)
        self.sim_profile = None
        if profile is not None:
            from helios_rl.env.profile import SimProfile

            self.sim_profile = SimProfile.load(profile)
            self.sim_profile.check(sc, str(profile))
        self.engine: Engine | None = None
        self._adm: dict[str, list[int]] = {}  # model -> admissible batch per depth (the engine's rule)
        for m in self.models:  # now, not mid-episode: without a profile this loads each model once at depth 1
            self.admissible(m, 1)
        if score not in SCORES:
            raise ValueError(f"score must be one of {sorted(SCORES, key=str)}, got {score!r}")
        self.score = SCORES[score]
        self.scorer = None
        if self.score == "none" and profile is None:
            raise ValueError("the live backend needs to score what it serves (score=True) or a simulator profile "
                             "to predict agreement: an interval without an accuracy value cannot be rewarded")
        if self.score != "none":
            from helios_rl.evaluation.scorer import ServedScorer

            # "agreement": the secondary figures only where a reward or SLO reads them (the perplexity floor)
            self.scorer = ServedScorer(ModelLoader(sc.engine.device, sc.engine.dtype, "shared"),
                                       sc.engine.max_model_len + 64, sc.reference_model(),
                                       teacher_forced=self.score == "all",
                                       reference_ppl=self.score == "all" or sc.slo.max_reference_ppl is not None)
        self.probe = self.prefill_probe = self.drift = None
        if sc.backend.drift == "probe":
            self._start_probe()
        self.clock = VirtualClock(0.0)
        self.now = 0.0

    def _start_probe(self) -> None:
        """``backend.drift: probe``: the calibrated probe time, and a probe of this machine (evaluation.probe)."""
        from helios_rl.evaluation.drift import DriftCorrection
        from helios_rl.evaluation.probe import PrefillProbe, SpeedProbe

        sc = self.scenario
        if self.clock_kind != "virtual" or self.timer.mode == "modeled":
            raise ValueError(f"{sc.name}: backend.drift: probe corrects measured costs on the virtual clock; this "
                             f"backend runs clock {self.clock_kind!r}, timing {self.timer.mode!r}")
        cal = (self.sim_profile.meta.get("speed_probe") if self.sim_profile is not None else None) or {}
        if not cal.get("s"):
            raise ValueError(f"{sc.name}: backend.drift: probe needs a calibrated profile with a speed probe (the "
                             f"machine's speed at calibration); "
                             + ("none was given" if self.sim_profile is None else "this one has none: re-calibrate"))
        if self.sim_profile.timing != self.timer.mode:
            raise ValueError(f"{sc.name}: the profile's speed probe was timed as {self.sim_profile.timing!r}, this "
                             f"backend times {self.timer.mode!r}")
        self.probe = SpeedProbe(sc, self.timer)
        if self.probe.model_name != cal.get("model"):
            raise ValueError(f"{sc.name}: the profile's speed probe ran {cal.get('model')!r}, this scenario's SLO "
                             f"reference model is {self.probe.model_name!r}")
        if not cal.get("prefill_s"):
            raise ValueError(f"{sc.name}: backend.drift: probe prices prefill passes by a prefill probe; this "
                             f"profile's speed probe has no prefill time (calibrated before it existed): re-calibrate")
        self.prefill_probe = PrefillProbe(self.probe)
        if self.prefill_probe.tokens != cal.get("prefill_tokens"):
            raise ValueError(f"{sc.name}: the profile's prefill probe ran {cal.get('prefill_tokens')!r} tokens, this "
                             f"backend's runs {self.prefill_probe.tokens}: re-calibrate")
        self.drift = DriftCorrection(float(cal["s"]), window=sc.backend.drift_window,
                                     calibrated_prefill_s=float(cal["prefill_s"]))
        self._probed_at = -float("inf")
        self._probe_events = 0

    def _cost(self, seconds: float, prefill: float = 0.0) -> float:
        """A measured cost as the virtual clock is charged it (drift-corrected where the backend probes;
        ``prefill``: the part of it that was a prefill pass, priced by the prefill probe)."""
        return self.drift.scale(seconds, prefill) if self.drift is not None else seconds

    def _maybe_probe(self, force: int = 0) -> None:
        """Probe the machine every ``drift_interval_s`` of wall time: the decode probe each time, the prefill
        probe (a longer step) every :data:`PREFILL_EVERY`-th time; ``force``: both, that many steps each (an
        episode's start)."""
        if self.probe is None:
            return
        if force:
            self.drift.add(self.probe.measure(force))
            self.drift.add_prefill(self.prefill_probe.measure(force))
        elif time.perf_counter() - self._probed_at >= self.scenario.backend.drift_interval_s:
            self.drift.add(self.probe.step())
            self._probe_events += 1
            if self._probe_events % PREFILL_EVERY == 0:
                self.drift.add_prefill(self.prefill_probe.step())
        else:
            return
        self._probed_at = time.perf_counter()

    # ------------------------------------------------------------------ control
    def admissible(self, model: str, depth: int) -> int:
        """The engine's own rule (weights, exit heads, prefill activations, KV slots and exit logits), whatever
        is loaded now: the calibrated profile's table (measured by that rule), else the rule applied once to the
        model loaded at depth 1. (Checkpoint headers alone do not know the exit heads' bytes: a batch cap
        taken from them changed with which model the engine happened to hold, so the same controller served
        the same seed with another batch cap after a switch.)"""
        if not 1 <= depth <= self.num_layers[model]:
            return 0
        if model not in self._adm:  # filled for every model at construction, before any engine exists
            prof = self.sim_profile.models.get(model) if self.sim_profile is not None else None
            if prof is not None and len(prof.admissible) == self.num_layers[model]:
                self._adm[model] = [int(a) for a in prof.admissible]
            else:
                lm = self.loader(model, 1)
                self._adm[model] = admissible_table(self.settings, lm)
                lm.unload()
                del lm
                release_freed_memory(self.device)
        return self._adm[model][depth - 1]

    def _exit_layers(self) -> tuple[int, ...]:
        m = self.engine.model
        return tuple(exit_layers_for(m, self.scenario.exits.layers_for(m.name), self.scenario.exits.measure))

    def reset(self, seed: int, config: ServingConfig) -> None:
        self._drop_engine(keep_model=config.model)
        self.clock = VirtualClock(0.0) if self.clock_kind == "virtual" else WallClock()
        model = getattr(self, "_kept", None)
        self._kept = None
        if model is not None and model.name == config.model:
            model.set_depth(config.depth or model.num_layers)
        else:
            if model is not None:
                model.unload()
            model = self.loader(config.model, config.depth)
        self.engine = Engine(model, self.settings, loader=self.loader, clock=self.clock)
        self.engine.apply(ServingConfig(max_batch=config.max_batch, threshold=config.threshold, target=config.target,
                                        exit_layers=self._exit_layers(), measure=self.scenario.exits.measure))
        if self.drift is not None:
            self.drift.new_episode()
            self._maybe_probe(force=3)
        self.seed = seed
        self.pending = sorted(self.workload.requests(seed), key=lambda r: r.arrival_s)
        self.specs = {r.request_id: r for r in self.pending}
        if self.scorer is not None:
            self.scorer.expect([(format_prompt(r), r.max_new_tokens) for r in self.pending])
        self.segments: dict[str, list] = {}
        self.scores: list = []  # every request scored this episode
        self.i = 0
        self.errors = 0
        self.n_records = 0
        self.ttfts: list[float] = []
        self.tpots: list[float] = []
        self.tokens = 0
        self.served = 0
        self.prev_end = 0.0
        self.now = self.clock.now

    def apply(self, config: ServingConfig) -> float:
        eng = self.engine
        before_model, before_bytes = eng.model.name, eng.model.resident_bytes()
        switching = config.model is not None and config.model != before_model
        t0 = self.timer.start()
        cfg = ServingConfig(model=config.model, depth=config.depth, max_batch=config.max_batch,
                            threshold=config.threshold, target=config.target, exit_layers=() if switching else None)
        eng.apply(cfg)  # ValueError when infeasible: the engine keeps its config
        if switching and eng.config.target is None:  # raw thresholds: the new model's exit layers
            eng.apply(ServingConfig(exit_layers=self._exit_layers()))
        after = eng.model.resident_bytes()
        loaded = after if eng.model.name != before_model else max(0, after - before_bytes)
        cost = self._cost(self.timer.load_cost(t0, loaded)) if (switching or loaded) else 0.0
        self.clock.advance(cost)
        self.now = self.clock.now
        return cost

    # ------------------------------------------------------------------ serving
    @property
    def finished(self) -> bool:
        return self.engine is not None and self.i >= len(self.pending) and not self.engine.has_unfinished()

    def _admit(self) -> None:
        sp, eng, clock = self.scenario.sampling, self.engine, self.clock
        while self.i < len(self.pending) and self.pending[self.i].arrival_s <= clock.now:
            r = self.pending[self.i]
            params = SamplingParams(max_new_tokens=r.max_new_tokens, temperature=sp.temperature, top_p=sp.top_p,
                                    seed=self.seed * 100_003 + self.i if sp.temperature > 0 else None,
                                    ignore_eos=sp.ignore_eos)
            try:
                eng.add_request(format_prompt(r), params, request_id=r.request_id, arrival_time=r.arrival_s)
            except RequestError:
                self.errors += 1
            self.i += 1

    def advance(self, seconds: float) -> Interval:
        eng, clock = self.engine, self.clock
        t_end = clock.now + seconds
        busy, failure = 0.0, None
        while True:
            self._admit()
            if not eng.has_unfinished():
                if self.i >= len(self.pending):
                    break
                clock.jump_to(min(self.pending[self.i].arrival_s, t_end))
                if clock.now >= t_end:
                    break
                continue
            self._maybe_probe()
            t0 = self.timer.start()
            try:
                events = eng.step()
            except Exception as exc:  # a real serving failure ends the episode
                failure = f"{type(exc).__name__}: {exc}"
                break
            self._track(events, eng.model.name)
            rec = eng.telemetry.steps[-1]
            cost = self._cost(self.timer.step_cost(t0, rec), self.timer.prefill_part(rec))
            clock.advance(cost)
            busy += cost
            if clock.now >= t_end:
                break
        snap = eng.snapshot(since=self.prev_end)
        self.prev_end = clock.now
        self.now = clock.now
        met = missed = met_tokens = good_tokens = 0
        recs = eng.telemetry.requests
        new = list(recs)[self.n_records - len(recs):] if self.n_records < len(recs) else []
        self.n_records = len(recs)
        slo = self.scenario.slo
        scores = self._score(new)
        totals = ScoreTotals()
        for r in new:
            if r.ttft is not None:
                self.ttfts.append(r.ttft)
            if r.tpot is not None:
                self.tpots.append(r.tpot)
            ok = r.ttft is not None and r.ttft <= slo.ttft_s and (r.tpot is None or r.tpot <= slo.tpot_s)
            met, missed = met + ok, missed + (not ok)
            met_tokens += r.output_tokens if ok else 0
            s = scores.get(r.request_id)
            if s is not None:
                totals.add(s)
            if ok and quality_ok(s, slo):
                good_tokens += r.output_tokens
        self.served += len(new)
        self.tokens += snap.output_tokens
        for r in new:
            eng.release(r.request_id)
            self.segments.pop(r.request_id, None)
        predicted = None
        if self.sim_profile is not None and snap.model in self.sim_profile.models:
            predicted = self.sim_profile.models[snap.model].exit_stats(snap.depth, exit_setting(eng.config))[2]
        if self.scorer is not None:
            agreement, source = totals.agreement, "measured"
        else:
            agreement, source = predicted, "predicted"
            good_tokens = met_tokens if predicted is not None and predicted >= slo.agreement_floor else 0
        scored = totals.to_dict() | ({"measured": self.scorer.measures} if self.scorer is not None else {})
        extra = {"agreement_source": source if agreement is not None else "none (no request finished)",
                 "predicted_agreement": predicted, "scored": scored}
        return Interval(snap, met, missed, agreement, busy, failure, slo_met_tokens=met_tokens,
                        good_tokens=good_tokens, extra=extra)

    def _track(self, events, model: str) -> None:
        """Record each served token under the model that served it (a switch starts a new segment)."""
        for e in events:
            if e.token_id < 0:
                continue
            segs = self.segments.setdefault(e.request_id, [])
            if not segs or segs[-1].model != model:
                segs.append(Segment(model))
            segs[-1].ids.append(int(e.token_id))
            segs[-1].exit_layers.append(int(e.exit_layer))

    def _score(self, finished) -> dict:
        """Score the requests that finished (off the episode's clock: a wall clock is set back)."""
        if self.scorer is None or not finished:
            return {}
        served = []
        for r in finished:
            req, spec = self.engine.requests.get(r.request_id), self.specs.get(r.request_id)
            prompt = format_prompt(spec) if spec is not None else (req.prompt_text if req else "")
            served.append(ServedRequest(r.request_id, prompt, list(self.segments.get(r.request_id, [])),
                                        spec.task if spec is not None else None,
                                        req.output_text if req is not None else None))
        wall0 = time.perf_counter()
        out = {s.request_id: s for s in self.scorer.score(served)}
        self.scores.extend(out.values())
        exclude = getattr(self.clock, "exclude", None)
        if exclude is not None:
            exclude(time.perf_counter() - wall0)
        return out

    def summary(self) -> dict:
        tok = sum(s.tokens for s in self.scores)
        agreement = sum(s.match for s in self.scores) / tok if tok else None
        out = episode_summary(self.ttfts, self.tpots, self.tokens, self.now, self.served, len(self.pending),
                              agreement)
        if self.drift is not None:
            out["drift"] = self.drift.summary() | {"interval_s": self.scenario.backend.drift_interval_s,
                                                   "window": self.scenario.backend.drift_window,
                                                   "prefill_every": PREFILL_EVERY}
        return out

    # ------------------------------------------------------------------ memory
    def _drop_engine(self, keep_model: str | None = None) -> None:
        if self.engine is None:
            return
        model = self.engine.model
        self.engine.pool = None
        self.engine.loop = None
        self.engine = None
        if keep_model is not None and model.name == keep_model:
            self._kept = model
        else:
            model.unload()
        gc.collect()
        release_freed_memory(self.device)

    def close(self) -> None:
        """Unload every layer and drop the KV pool (the process gives the memory back)."""
        self._drop_engine()
        kept = getattr(self, "_kept", None)
        if kept is not None:
            kept.unload()
            self._kept = None
        if self.scorer is not None:
            self.scorer.close()
        if self.prefill_probe is not None:
            self.prefill_probe.close()
            self.prefill_probe = None
        if self.probe is not None:
            self.probe.close()
            self.probe = None
        gc.collect()
        release_freed_memory(self.device)
