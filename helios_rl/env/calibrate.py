"""Calibrate the simulator: profile the live engine over a grid and fit what the simulator needs.

For each model of the scenario: the admissible batch and resident bytes at every depth (from the
engine itself), the load cost (two timed loads: overhead + seconds per byte), and for every
(depth bucket, threshold) of the environment's grid the exit-layer distribution, breach rate, mean
confidence and agreement with the model's own full-depth greedy output on the scenario's prompts.
Steps of those runs plus a batch sweep give the step-time model, fitted by non-negative least
squares on :func:`~helios_rl.env.profile.step_features` (per model), with its relative residual.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Callable

import numpy as np

from helios_rl.engine.config import ServingConfig
from helios_rl.engine.engine import Engine
from helios_rl.engine.engine import slot_bytes as engine_slot_bytes
from helios_rl.engine.request import SamplingParams
from helios_rl.env.backend import admissible_table, config_hash, engine_version, thr_key
from helios_rl.env.profile import FEATURES, ModelSim, SimProfile, record_features
from helios_rl.evaluation.replay import format_prompt
from helios_rl.evaluation.probe import PROBE_BATCH, PrefillProbe, SpeedProbe
from helios_rl.evaluation.runtime import ModelLoader, Timer, VirtualClock, exit_layers_for, set_threads
from helios_rl.models.layered import release_freed_memory
from helios_rl.models.registry import resolve_model
from helios_rl.scenario import reference_batches, step_reference_model

DEFAULT_THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95)
#: The largest batch the staggered-arrival timing run grows to.
STAGGER_BATCH = 32


def depth_grid(num_layers: int, buckets: int = 4) -> list[int]:
    return sorted({max(1, math.ceil(f * num_layers)) for f in np.linspace(1 / buckets, 1.0, buckets)})


def accuracy_prompts(sc, min_tokens: int, new_tokens: int) -> tuple[list[tuple[str, str]], int]:
    """``(prompt, task)`` pairs, the same number per task of the scenario's workload, and the tokens each
    request generates (EOS ignored), so that one grid point serves at least ``min_tokens`` tokens:
    ``new_tokens`` each, or the workload's longest request where that is longer, more where the workload
    has too few distinct prompts (up to what the KV slot holds). Drawn from development workload seeds 0, 1, ... (never the held-out evaluation seeds)."""
    from helios_rl.env.workload import EpisodeWorkload

    wl = EpisodeWorkload(sc)
    counter = wl._counter()
    # every request the workload can draw is covered: a served request of k tokens is the first k tokens of
    # these continuations (greedy, EOS ignored), so the simulator scores it on exactly those
    new_tokens = max(new_tokens, int(sc.workload.new_tokens_range()[1]))
    by_task: dict[str, list[str]] = {}
    seeds = 0
    while seeds < 64:
        for r in wl.requests(seeds):
            text = format_prompt(r)
            if text not in by_task.setdefault(r.task, []):
                by_task[r.task].append(text)
        seeds += 1
        per = math.ceil(min_tokens / (len(by_task) * new_tokens))
        if all(len(v) >= per for v in by_task.values()):
            break
    per = math.ceil(min_tokens / (len(by_task) * new_tokens))
    items = [(t, task) for task in sorted(by_task) for t in by_task[task][:per]]
    room = sc.engine.max_model_len - 1 - max(counter(t) for t, _ in items)
    each = min(new_tokens, room)
    if len(items) * each < min_tokens:  # too few distinct prompts: longer continuations instead
        each = max(each, min(room, math.ceil(min_tokens / len(items))))
    return items, each


def point_stats(reqs, tasks: list[str], ref: list[list[int]], L: int, ppl: list[float] | None = None) -> dict:
    """Exit distribution, breach rate, confidence and free-running agreement of one grid point's requests,
    overall and per task, with every request's agreement and its token-by-token matches (the simulator
    draws from them, at each simulated request's own length) and a 95 % normal interval of the mean
    agreement over requests."""
    def agg(rows: list[int]) -> dict:
        counts = np.zeros(L, dtype=np.int64)
        breaches = tokens = match = 0
        conf, per_req, bits = [], [], []
        for i in rows:
            r = reqs[i]
            layers = np.asarray(r.exit_layers[1:], dtype=np.int64)  # decode tokens (the first comes from prefill)
            np.add.at(counts, layers, 1)
            breaches += int(sum(r.greedy_flags[1:]))
            tokens += len(layers)
            hits = "".join("1" if a == b else "0" for a, b in zip(r.output_ids, ref[i]))
            m = hits.count("1")
            match += m
            bits.append(hits)
            per_req.append(m / max(len(r.output_ids), 1))
            conf += list(r.confidences[1:])
        a = np.asarray(per_req, dtype=float)
        half = 1.96 * float(a.std(ddof=1)) / math.sqrt(len(a)) if len(a) > 1 else 1.0
        total = sum(len(reqs[i].output_ids) for i in rows)
        mean = match / total if total else 1.0
        out = {"p": (counts / max(counts.sum(), 1)).tolist(), "breach": breaches / tokens if tokens else 0.0,
               "agreement": mean, "agreement_ci": [round(max(0.0, mean - half), 4), round(min(1.0, mean + half), 4)],
               "request_agreements": [round(float(x), 4) for x in a],
               # position by position, whether the served token equals the reference's: a request of k tokens
               # serves exactly the first k of a longer greedy run, so its agreement is the first k bits' mean
               "request_matches": bits, "conf": float(np.mean(conf)) if conf else 0.0,
               "tokens": int(total), "requests": len(rows)}
        if ppl is not None:  # the reference model's perplexity of each request's text (same order)
            out["request_ppl"] = [round(float(ppl[i]), 4) for i in rows]
        return out

    out = agg(list(range(len(reqs))))
    out["by_task"] = {t: agg([i for i, x in enumerate(tasks) if x == t]) for t in sorted(set(tasks))}
    return out


def calibrate(scenario, thresholds: tuple[float, ...] | None = None, depth_buckets: int = 4,
              batches: tuple[int, ...] = (1, 4, 16), prompts: int = 4, new_tokens: int = 24, timing: str | None = None,
              say: Callable[[str], None] = lambda s: None, min_tokens: int = 1000) -> SimProfile:
    """Profile every model of ``scenario`` on the live engine (see module docstring). Every (depth,
    setting) point's exit and accuracy statistics rest on at least ``min_tokens`` served tokens,
    stratified by task; ``prompts`` sizes the timing runs."""
    from helios_rl.env.workload import EpisodeWorkload

    sc = scenario
    prev = set_threads(sc.engine.threads)
    # the CPU's matmul kernel per row count (models.kernels): read, or measured once per machine, now,
    # not inside a timed load; recorded with the profile
    from helios_rl.env.profile import current_linear_plan

    linear_plan = current_linear_plan(sc)
    timer = Timer(timing or sc.backend.timing)
    loader = ModelLoader(sc.engine.device, sc.engine.dtype, sc.exits.heads)
    texts = [format_prompt(r) for r in EpisodeWorkload(sc).requests(0)]
    acc_items, acc_tokens = accuracy_prompts(sc, min_tokens, new_tokens)
    # the exit settings controllers choose among: precision targets, or raw thresholds
    thr_grid = list(dict.fromkeys(list(thresholds if thresholds is not None else sc.exits.choices)
                                  + [sc.exits.setting]))
    models = {}
    t_start = time.perf_counter()
    # the machine's speed while it was calibrated (evaluation.probe), and the reference model's full-depth step
    # at every batch the scenario's relative SLOs and arrival rates name, measured beside it (the unit they are
    # resolved in: SimProfile.reference_step), each sampled before, between and after the models' calibrations
    probes: dict[int, SpeedProbe] = {}
    samples: dict[int, list[float]] = {}
    prefill: list = []  # the prefill probe (the drift correction prices prefill passes by it) and its samples
    prefill_samples: list[float] = []

    def sample() -> None:
        for b, pr in probes.items():
            samples.setdefault(b, []).append(pr.measure())
        for pr in prefill:
            prefill_samples.append(pr.measure())

    try:
        if timer.mode != "modeled":
            probes[PROBE_BATCH] = SpeedProbe(sc, timer)
            for b in reference_batches(sc):
                if b not in probes:
                    probes[b] = SpeedProbe(sc, timer, batch=b, model=probes[PROBE_BATCH].model)
            prefill.append(PrefillProbe(probes[PROBE_BATCH]))
            sample()
        for name in sc.models:
            models[name] = _model(sc, name, loader, timer, texts, thr_grid, depth_buckets, batches, prompts,
                                  acc_tokens, say, acc_items)
            sample()
        calibrate_switches(sc, models, loader, timer, texts, say)
        sample()
        for b in sorted(samples):
            say(f"  reference step ({step_reference_model(sc)}, full depth, batch {b}): "
                + ", ".join(f"{p * 1000:.0f}" for p in samples[b]) + " ms")
        if prefill_samples:
            say(f"  prefill probe ({prefill[0].tokens} tokens): "
                + ", ".join(f"{p * 1000:.0f}" for p in prefill_samples) + " ms")
    finally:
        for pr in prefill:
            pr.close()
        for b in sorted(probes, key=lambda b: b == PROBE_BATCH):  # the probe owning the model last
            probes[b].close()
        set_threads(prev)
    settings = {"memory_budget_bytes": sc.engine.memory_budget_bytes, "max_batch": sc.engine.max_batch,
                "max_model_len": sc.engine.max_model_len, "kv_strategy": sc.engine.kv_strategy,
                "max_prefill_tokens": sc.engine.max_prefill_tokens}
    meta = {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "calibration_s": round(time.perf_counter() - t_start, 2),
            "thresholds": [thr_key(t) for t in thr_grid], "batches": list(batches), "prompts": prompts,
            "new_tokens": new_tokens, "accuracy_new_tokens": acc_tokens, "min_tokens_per_point": min_tokens,
            "accuracy_prompts": {t: sum(1 for _, x in acc_items if x == t) for t in sorted({x for _, x in acc_items})},
            "calibration_tokens_min": min((v["tokens"] for m in models.values() for v in m.exits.values()),
                                          default=0)}
    if linear_plan is not None:  # the mode, machine and row counts taking each kernel other than F.linear
        meta["linear_plan"] = linear_plan
    if samples:  # medians over the calibration; the spread says whether the machine held still meanwhile
        meta["speed_probe"] = {"model": step_reference_model(sc), "batch": PROBE_BATCH,
                               "s": float(np.median(samples[PROBE_BATCH])),
                               "samples": [round(p, 5) for p in samples[PROBE_BATCH]],
                               "prefill_tokens": prefill[0].tokens, "prefill_s": float(np.median(prefill_samples)),
                               "prefill_samples": [round(p, 5) for p in prefill_samples]}
        meta["reference_steps"] = {"model": step_reference_model(sc),
                                   "s": {str(b): float(np.median(v)) for b, v in sorted(samples.items())},
                                   "samples": {str(b): [round(p, 5) for p in v] for b, v in sorted(samples.items())}}
    return SimProfile(engine_version(), sc.name, timer.mode, settings, models, meta)


def calibrate_switches(sc, models: dict[str, ModelSim], loader, timer, texts, say=lambda s: None) -> None:
    """Time real engine switches between every ordered pair of models (the engine does more than load
    bytes: it re-tokenizes accepted requests, compares tokenizers, frees the old model); stores the
    overhead beyond the new model's bytes in ``models[to].switch_from[from]``."""
    settings = replace(sc.engine.settings(sc.exits.measure, sc.exits.default_threshold), memory_budget_bytes=None)
    for a in models:
        for b in models:
            if a == b:
                continue
            engine = Engine(loader(a, 1), settings, loader=loader, clock=VirtualClock(0.0))
            t0 = timer.start()
            _ = engine.model.tokenizer
            models[a].tokenizer_s = timer.elapsed(t0) if timer.mode != "modeled" else 0.0
            for i in range(2):
                engine.add_request(texts[i % len(texts)], SamplingParams(max_new_tokens=4, ignore_eos=True))
            engine.step()
            t0 = timer.start()
            engine.apply(ServingConfig(model=b, depth=1, exit_layers=()))
            nbytes = engine.model.resident_bytes()
            cost = timer.load_cost(t0, nbytes)
            models[b].switch_from[a] = max(0.0, cost - nbytes * models[b].load_s_per_byte)
            engine.model.unload()
            engine.pool = None
            say(f"  switch {a} -> {b}: {cost:.3f} s")


def _model(sc, name, loader, timer, texts, thr_grid, depth_buckets, batches, prompts, new_tokens, say,
           acc_items) -> ModelSim:
    settings = sc.engine.settings(sc.exits.measure, sc.exits.default_threshold)
    # load costs as a switch pays them: load to depth 1 with the tokenizer (the engine re-tokenizes the
    # accepted requests), then deepen to full depth; the deepening gives seconds per byte, the rest of the
    # first load is the switch overhead. Unloading is timed at the end.
    t0 = timer.start()
    model = loader(name, 1)
    _ = model.tokenizer
    b1 = model.resident_bytes()
    c1 = timer.load_cost(t0, b1)
    t0 = timer.start()
    model.set_depth(model.num_layers)  # fully loaded: the budget is bookkeeping; the reference needs every layer
    b2 = model.resident_bytes()
    c2 = timer.load_cost(t0, b2 - b1)
    per_byte = c2 / (b2 - b1) if b2 > b1 else c1 / max(b1, 1)
    overhead = max(0.0, c1 - per_byte * b1)
    L = model.num_layers
    clock = VirtualClock(0.0)
    # the admissible batch under the scenario's budget, computed by the engine's own rule; the runs use
    # an engine without a budget (a depth the budget cannot hold is never run, a batch never exceeds it)
    admissible = admissible_table(settings, model)
    loadable = [d for d in range(1, L + 1) if admissible[d - 1] >= 1]
    if not loadable:  # before any run: the error comes at once, not after the reference continuations
        raise ValueError(f"{sc.name}: the memory budget ({settings.memory_budget_bytes} bytes) cannot hold {name} "
                         f"at any depth with one KV slot of {settings.max_model_len} tokens (the scenario's check "
                         f"warns of it; a profile needs every candidate: drop it from models: or raise "
                         f"engine.memory_budget)")
    engine = Engine(model, replace(settings, memory_budget_bytes=None), loader=None, clock=clock)
    targets = sc.exits.mode == "target"

    def layers_for(setting) -> list[int]:
        """Exit layers an exit setting uses on this model (a target names its own)."""
        if not targets:
            return exit_layers_for(model, sc.exits.layers_for(name), sc.exits.measure)
        if setting == "off" or not model.heads.targets:
            return []
        return [l for l in model.heads.target(setting).layers if l < L - 1]

    exits = sorted({l for t in thr_grid for l in layers_for(t)})
    if not exits:  # no exit layers: the setting changes nothing, one is enough
        thr_grid = [sc.exits.setting]
    weight_bytes = [int(model.weight_bytes_at_depth(d) + model.heads.nbytes()) for d in range(1, L + 1)]
    slot_bytes = [int(engine_slot_bytes(settings, model, d)) for d in range(1, L + 1)]
    X, y = [], []

    def run(depth: int, thr, batch: int, items: list[str], tokens_each: int = new_tokens, stagger: int = 0) -> list:
        """Serve ``items`` at ``depth`` under exit setting ``thr`` (``"off"``: no exits); every step is
        timed for the step-time fit. ``stagger``: add that many requests before each step instead of all at
        once, so prompts prefill beside a decoding batch that grows and then drains, as in serving.
        Returns the finished requests."""
        layers = layers_for(thr)
        if thr == "off":
            knob = {"threshold": 1.0, "exit_layers": ()}
        elif targets:
            knob = {"target": thr}
        else:
            knob = {"threshold": thr, "exit_layers": tuple(layers)}
        engine.apply(ServingConfig(depth=depth, max_batch=batch, measure=sc.exits.measure, **knob))
        if thr is None:  # back to the calibrated per-layer thresholds
            engine.config.threshold = None
            engine._policy = engine._exit_policy(engine.config, engine.model)
        params = SamplingParams(max_new_tokens=tokens_each, ignore_eos=True)
        todo, ids = list(items), []
        while todo or engine.has_unfinished():
            n = stagger or len(todo)
            ids += [engine.add_request(t, params) for t in todo[:n]]
            del todo[:n]
            rows = list(engine.running) + list(engine.waiting)[: max(0, engine.max_batch - len(engine.running))]
            ctx_mean = float(np.mean([r.seq_len for r in rows])) if rows else 0.0
            t0 = timer.start()
            engine.step()
            rec = engine.telemetry.steps[-1]
            cost = timer.step_cost(t0, rec)
            clock.advance(cost)
            X.append(record_features(rec, [] if thr == "off" else layers, ctx_mean))
            y.append(cost)
        reqs = [engine.requests[i] for i in ids]
        for i in ids:
            engine.release(i)
        return reqs

    run(L, "off", 1, texts[:1])  # warm-up (first calls allocate and dispatch slowly): not fitted
    del X[:], y[:]
    items, tasks = [t for t, _ in acc_items], [k for _, k in acc_items]
    cap = max(1, min(len(items), 32))
    # the free-running reference: the full model's own greedy continuation of every prompt, no exits
    ref = [list(r.output_ids) for r in run(L, "off", min(cap, admissible[L - 1] or cap), items)]
    exit_stats, seen = {}, {}
    depths = [d for d in depth_grid(L, depth_buckets) if admissible[d - 1] >= 1]
    if loadable[-1] not in depths:  # a budget that binds: the deepest load it allows is the point that matters
        depths.append(loadable[-1])
    t_acc = time.perf_counter()
    scorer = None
    if sc.slo.max_reference_ppl is not None:  # the quality floor on the reference model's perplexity
        from helios_rl.evaluation.scorer import ServedScorer

        scorer = ServedScorer(ModelLoader(sc.engine.device, sc.engine.dtype, "shared"), sc.engine.max_model_len + 64,
                              sc.reference_model())

    def reference_ppl(reqs, prompts) -> list[float]:
        out = []
        for r, p in zip(reqs, prompts):
            nll, n = scorer._reference_nll(p, r.output_text)
            out.append(math.exp(nll / n) if n else float("inf"))
        return out

    for d in depths:
        for thr in thr_grid:
            engine.apply(ServingConfig(depth=d, measure=sc.exits.measure,
                                       **({"target": thr} if targets else {"threshold": thr,
                                                                            "exit_layers": tuple(layers_for(thr))})))
            pol = engine._policy  # settings whose exits are identical at this depth are served once
            key = (d, tuple(sorted(pol.layers)), tuple(sorted((l, pol.thresholds.get(l)) for l in pol.layers)))
            if key not in seen:
                reqs = run(d, thr, min(cap, admissible[d - 1]), items)
                seen[key] = point_stats(reqs, tasks, ref, L, reference_ppl(reqs, items) if scorer else None)
            exit_stats[f"{d}:{thr_key(thr)}"] = {**seen[key], "layers": [int(l) for l in layers_for(thr)]}
        say(f"  {name}: depth {d}/{L}: {len(thr_grid)} exit settings profiled "
            f"({len(items)} prompts x {new_tokens} tokens per point)")
    say(f"  {name}: accuracy points took {time.perf_counter() - t_acc:.0f} s")
    if scorer is not None:
        scorer.close()
    default_thr = sc.exits.setting
    for d in sorted({depths[0], depths[-1]}):
        # the sweep always reaches the largest batch the budget admits at this depth: a step-time model
        # fitted on small batches alone extrapolates far too fast to the batches controllers really run
        # (on the default scenario: 34 simulated vs 25 live tokens/s at batch 64)
        for bb in sorted({min(b, admissible[d - 1]) for b in batches} | {admissible[d - 1]}):
            if bb >= 1:
                run(d, default_thr, bb, [texts[i % len(texts)] for i in range(bb)], 8)
        # serving's shape: one prompt arrives per step and prefills beside the decoding batch, which grows to the
        # batch cap and drains again, so every batch size up to it is timed with and without a prefill pass
        bb = min(STAGGER_BATCH, admissible[d - 1])
        if bb >= 2:
            run(d, default_thr, bb, [texts[i % len(texts)] for i in range(bb)], bb, stagger=1)
    say(f"  {name}: batch sweep done ({len(y)} steps measured)")
    coef, sigma = _fit(np.array(X), np.array(y))
    engine.pool = None
    t0 = timer.start()
    nbytes = engine.model.resident_bytes()
    engine.model.unload()
    release_freed_memory(engine.model.device)
    unload_per_byte = timer.elapsed(t0) / max(nbytes, 1) if timer.mode != "modeled" else 0.0
    return ModelSim(name=name, config_hash=config_hash(resolve_model(name, progress=False)), num_layers=L,
                    exit_layers=[int(x) for x in exits], admissible=admissible, weight_bytes=weight_bytes,
                    slot_bytes=slot_bytes, step_coef=coef, residual_sigma=sigma, load_overhead_s=overhead,
                    load_s_per_byte=per_byte, unload_s_per_byte=unload_per_byte, exits=exit_stats)


def _fit(X: np.ndarray, y: np.ndarray) -> tuple[dict[str, float], float]:
    """Non-negative least squares on column-scaled features; relative residual std."""
    from scipy.optimize import nnls

    scale = np.maximum(np.abs(X).max(axis=0), 1e-12)
    w = 1.0 / np.maximum(y, 1e-9)  # relative error: weight each step by 1 / its time
    sol, _ = nnls(X / scale * w[:, None], y * w)
    coef = sol / scale
    pred = X @ coef
    rel = y / np.maximum(pred, 1e-12) - 1.0
    return {k: float(v) for k, v in zip(FEATURES, coef)}, float(min(0.5, np.std(rel)))
