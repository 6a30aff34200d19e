"""The calibrated discrete-event simulator backend.

It serves the scenario's workload the way the engine does (arrivals queue, admission up to the batch
cap at step boundaries, one token per running request per step, prefill on admission and after a
switch or a deeper load, preemption when the cap shrinks) but jumps from event to event: between an
admission, a finish, an arrival and the interval's end the batch is constant, so the time of ``k``
steps is closed form, ``T(k) = k a + b (k S0 + n k (k - 1) / 2)`` (``S0`` the batch's total context,
growing by ``n`` per step), from the step-time model a :class:`~helios_rl.env.profile.SimProfile`
fitted on the live engine. Exit layers, breaches and agreement come from the profile's measured
distributions of the config in force, per task of the workload: each finishing request draws its
free-running agreement (and, where calibrated, its reference perplexity) from the measured requests
of its task under the config in force, over its own length (the profile records each calibrated request's
token-by-token matches; agreement falls with length, as one divergence shifts every later token), so a
task-mix or length shift changes what the simulator predicts, and
goodput counts a request only if it meets the SLO and the quality floors, as on the live backend.
The step-time model uses the config's exit distribution over all tasks. Seeded noise: step-time jitter at the fit's residual, and
multinomial exit counts; ``randomize`` scales the step-time model per episode (domain randomisation).

The noise that decides the score is drawn as *common random numbers*: each request of a seed is one of its task's
calibrated requests (the calibration serves the same prompts, in the same order, at every config point), chosen
by a uniform number fixed per (seed, request) and independent of the config, and the k-th interval's step-time
jitter is fixed per (seed, k). Two configs on one seed are therefore compared on the same requests and the same
machine noise: a request that fails the agreement floor at a config fails it under every config that serves it
that way, whatever the batch cap or the order requests finished in. (Before 2026-12-05 every draw came from one
stream, so changing only the batch cap re-dealt which requests failed the floor: on shift-v4's test seeds SmolLM2
at full depth and the 0.99 target served 0.78-0.91 of its tokens well at cap 8 and 0.86-0.93 at cap 16, every
request meeting the SLO at both, so the simulator ranked two configs of equal quality 8 % apart on noise.)
"""

from __future__ import annotations

import heapq
import math
from collections import deque

import numpy as np

from helios_rl.engine.config import ServingConfig
from helios_rl.scenario import exit_setting
from helios_rl.engine.telemetry import TelemetrySnapshot
from helios_rl.env.backend import Interval, episode_summary, percentiles, require_resolved_slo
from helios_rl.env.profile import ModelSim, SimProfile, step_cost, step_features


class SimBackend:
    """Simulated serving loop (see module docstring). ``workload(seed)`` gives the request arrays."""

    def __init__(self, profile: SimProfile, scenario, workload, noise: bool = True, randomize: float = 0.0) -> None:
        require_resolved_slo(scenario, "the simulator")
        self.profile, self.scenario, self.workload = profile, scenario, workload
        self.noise, self.randomize = bool(noise), float(randomize)
        self.models = tuple(scenario.models)
        self.num_layers = {m: profile.models[m].num_layers for m in self.models}
        self.max_prefill = int(scenario.engine.max_prefill_tokens)
        self.budget = scenario.engine.memory_budget_bytes
        self.slo = scenario.slo
        self.rng = np.random.default_rng(0)
        self.now = 0.0
        self._ms: ModelSim | None = None
        self._derived: dict[tuple, tuple] = {}

    # ------------------------------------------------------------------ control
    def admissible(self, model: str, depth: int) -> int:
        ms = self.profile.models[model]
        return int(ms.admissible[depth - 1]) if 1 <= depth <= ms.num_layers else 0

    def reset(self, seed: int, config: ServingConfig) -> None:
        self.rng = np.random.default_rng(seed)
        # common random numbers (module docstring): streams of their own, so no config changes what they deal
        self._jitter_rng = np.random.default_rng([seed, 1])
        arr, ptok, newtok = self.workload(seed)
        self.arr_t, self.ptok, self.newtok = arr.tolist(), ptok.tolist(), newtok.tolist()
        tasks = self.workload.tasks(seed) if hasattr(self.workload, "tasks") else ["all"] * len(arr)
        self.task_names = sorted(set(tasks)) or ["all"]
        self.task_of = [self.task_names.index(t) for t in tasks]
        self.run_tasks = np.zeros(len(self.task_names), dtype=np.int64)
        self.n_req = len(arr)
        self._quality_u = np.random.default_rng([seed, 2]).random(self.n_req)  # which calibrated request each is
        self.next_i = 0
        self.now = 0.0
        # Rows are kept relative to G, the number of decode steps the batch has taken: a row admitted
        # with r tokens to go and context c at G0 has end = G0 + r and base = c - G0, so a chunk of k
        # steps is just G += k (no per-row update); a heap of ends gives the next finish.
        self.G = 0
        self.tok_loaded = False
        # id -> [end, base, arrival, first, ntok_off, needs_prefill, task, request index]
        self.running: dict[int, list] = {}
        self.heap: list[tuple[int, int]] = []
        self.sum_base = 0
        self.pre_ids: list[int] = []
        self.waiting: deque = deque()  # [rem, ctx, arrival, first, ntok, task, request index]
        self._ids = 0
        self.ttfts: list[float] = []
        self.tpots: list[float] = []
        self.tokens = 0
        self.served = 0
        self.agree_sum, self.agree_tokens = 0.0, 0
        self.switches = self.loads = 0
        self.scale = 1.0 + (self.rng.uniform(-self.randomize, self.randomize) if self.randomize > 0 else 0.0)
        self.model = ""
        self.depth = 0
        self._set(config.model, config.depth or self.num_layers[config.model], config.max_batch, exit_setting(config))
        self.prev_end = 0.0

    def apply(self, config: ServingConfig) -> float:
        """Change the config (ValueError when the budget cannot hold it); returns seconds charged."""
        model = config.model or self.model
        if model not in self.profile.models:
            raise ValueError(f"unknown model {model!r}; the profile has {sorted(self.profile.models)}")
        L = self.num_layers[model]
        depth = config.depth if config.depth is not None else (self.depth if model == self.model else L)
        if not isinstance(depth, (int, np.integer)) or not 1 <= depth <= L:
            raise ValueError(f"depth must be between 1 and {L} for {model}, got {depth!r}")
        depth = int(depth)
        if self.admissible(model, depth) < 1:
            raise ValueError(f"memory budget {self.budget} bytes cannot hold {model} at depth {depth} plus one "
                             f"request's KV")
        batch = config.max_batch if config.max_batch is not None else self.req_batch
        thr = exit_setting(config) if exit_setting(config) is not None else self.threshold
        ms = self.profile.models[model]
        cost = 0.0
        if model != self.model:
            old = self._ms
            if old.name in ms.switch_from:  # measured on the engine: everything a switch does, beyond the bytes
                cost = ms.switch_from[old.name] + ms.weight_bytes[depth - 1] * ms.load_s_per_byte
                if not self.tok_loaded:  # the engine compares tokenizers: the old one loads now if no request did
                    cost += old.tokenizer_s
                self.tok_loaded = True
            else:
                cost = ms.load_seconds(0, depth, with_base=True) + old.unload_s_per_byte * old.weight_bytes[self.depth - 1]
            self.switches += 1
            self.loads += 1
            self._all_prefill()
        elif depth > self.depth:
            cost = ms.load_seconds(self.depth, depth, with_base=False)
            self.loads += 1
            self._all_prefill()
        cost *= self.scale
        self._set(model, depth, batch, thr)
        self.now += cost
        return cost

    def _all_prefill(self) -> None:
        for rid, row in self.running.items():
            if not row[5]:
                row[5] = True
                self.pre_ids.append(rid)

    def _set(self, model: str, depth: int, batch: int | None, threshold: float | None) -> None:
        ms = self.profile.models[model]
        self._ms, self.model, self.depth, self.threshold = ms, model, depth, threshold
        adm = self.admissible(model, depth)
        self.req_batch = batch
        self.max_batch = max(1, min(adm, batch or adm))
        while len(self.running) > self.max_batch:  # preempt the newest rows; they resume by re-prefill
            rid = next(reversed(self.running))
            end, base, arrival, first, off, _, task, req = self.running.pop(rid)
            self.sum_base -= base
            self.run_tasks[task] -= 1
            G = self.G
            self.waiting.appendleft([end - G, base + G, arrival, first, off + G, task, req])
        self.pre_ids = [i for i in self.pre_ids if i in self.running]
        key = (model, depth, threshold)
        if key not in self._derived:
            self._derived[key] = self._derive(ms, depth, threshold)
        self.p, self.breach_p, self.agreement, self.conf, self.pricer, self.b = self._derived[key]
        tkey = (model, depth, threshold, "tasks")
        if tkey not in self._derived:
            per = []
            for t in self.task_names:
                p, breach, agree, _ = ms.exit_stats(depth, threshold, t)
                draws, ppl, matches = ms.request_draws(depth, threshold, t)
                per.append((p / p.sum() if p.sum() > 0 else p, breach, agree, np.asarray(draws, dtype=float),
                            np.asarray(ppl, dtype=float) if ppl else None, self._prefix_hits(matches, len(draws))))
            self._derived[tkey] = per
        self.task_stats = self._derived[tkey]
        self.weight_bytes = ms.weight_bytes[depth - 1]
        self.kv_bytes = ms.slot_bytes[depth - 1] * self.max_batch

    @staticmethod
    def _derive(ms: ModelSim, depth: int, threshold: float | None) -> tuple:
        """Exit statistics and step pricing of one config (cached per config)."""
        p, breach, agreement, conf = ms.exit_stats(depth, threshold)
        p = p / p.sum() if p.sum() > 0 else p
        m = float((p * np.arange(1, ms.num_layers + 1)).sum())
        # context costs c_ctx per row-layer per context token: b * (total context of the running rows)
        return (p, breach, agreement, conf, _StepPricer(ms.step_coef, depth, p, ms.layers_for(threshold)),
                ms.step_coef.get("c_ctx", 0.0) * m)

    # ------------------------------------------------------------------ serving
    @property
    def finished(self) -> bool:
        return self.next_i >= self.n_req and not self.waiting and not self.running

    def _arrive(self) -> None:
        arr, now = self.arr_t, self.now
        if self.next_i < self.n_req and arr[self.next_i] <= now:
            self.tok_loaded = True  # the engine tokenizes a request on arrival
        while self.next_i < self.n_req and arr[self.next_i] <= now:
            i = self.next_i
            self.waiting.append([self.newtok[i], self.ptok[i], arr[i], math.nan, 0, self.task_of[i], i])
            self.next_i += 1

    def _admit(self) -> None:
        free = self.max_batch - len(self.running)
        budget, n = self.max_prefill, 0
        G = self.G
        while self.waiting and n < free:
            rem, ctx, arrival, first, ntok, task, req = self.waiting[0]
            if n and ctx > budget:
                break
            self.waiting.popleft()
            budget -= ctx
            n += 1
            rid = self._ids
            self._ids += 1
            self.running[rid] = [G + rem, ctx - G, arrival, first, ntok - G, True, task, req]
            self.run_tasks[task] += 1
            heapq.heappush(self.heap, (G + rem, rid))
            self.sum_base += ctx - G
            self.pre_ids.append(rid)

    def _steps_for(self, dt: float, alpha: float, beta: float, s0: float, n: int) -> int:
        """Smallest k >= 1 with T(k) >= dt."""
        if dt <= 0:
            return 1
        a = beta * n / 2.0
        if a <= 0:
            return max(1, math.ceil(dt / alpha - 1e-12))
        b = alpha + beta * s0 - a
        return max(1, math.ceil((-b + math.sqrt(b * b + 4 * a * dt)) / (2 * a) - 1e-12))

    def advance(self, seconds: float) -> Interval:
        t0 = self.prev_end
        t_end = self.now + seconds
        jitter = self.scale * (float(self._jitter_rng.lognormal(0.0, self._ms.residual_sigma))
                               if self.noise and self._ms.residual_sigma > 0 else 1.0)
        tokens = prefill = steps = pre_tokens = cap_waits = 0
        busy = 0.0
        ttfts, tpots = [], []
        met = missed = finished = met_tokens = good_tokens = 0
        agree_sum, agree_tokens = 0.0, 0
        task_tokens = np.zeros(len(self.task_names), dtype=np.int64)
        floor, max_ppl = self.slo.agreement_floor, self.slo.max_reference_ppl
        arrivals0 = self.next_i
        slo_ttft, slo_tpot = self.slo.ttft_s, self.slo.tpot_s
        pricer, b, running, heap = self.pricer, self.b, self.running, self.heap
        while True:
            if self.next_i < self.n_req and self.arr_t[self.next_i] <= self.now:
                self._arrive()
            if self.waiting and len(running) < self.max_batch:
                self._admit()
            n = len(running)
            if n == 0:
                if self.next_i >= self.n_req:
                    break
                t_next = self.arr_t[self.next_i]
                if t_next >= t_end:
                    self.now = max(self.now, t_end)
                    break
                self.now = t_next
                continue
            G = self.G
            alpha = max(1e-7, pricer.decode(n) * jitter)
            beta = b * jitter
            s0 = float(self.sum_base + n * G)
            if self.pre_ids:  # one step with prefill; every row (prefilled or not) yields a token
                n_pre = len(self.pre_ids)
                ptoks = 0
                for rid in self.pre_ids:
                    row = running[rid]
                    ptoks += row[1] + G
                    row[5] = False
                    if row[3] != row[3]:  # NaN: no token yet; the engine stamps the step's start
                        row[3] = self.now
                self.pre_ids = []
                dt = max(1e-7, pricer.mixed(n - n_pre, n_pre, ptoks) * jitter + beta * s0)
                k = 1
                prefill += ptoks
                pre_tokens += n_pre
            else:
                k = heap[0][0] - G
                if self.next_i < self.n_req and n < self.max_batch:
                    k = min(k, self._steps_for(self.arr_t[self.next_i] - self.now, alpha, beta, s0, n))
                k = min(k, self._steps_for(t_end - self.now, alpha, beta, s0, n))
                k = max(k, 1)
                dt = k * alpha + beta * (k * s0 + n * k * (k - 1) / 2.0)
            if n >= self.max_batch and (self.waiting or (self.next_i < self.n_req
                                                         and self.arr_t[self.next_i] < self.now + dt)):
                cap_waits += k if self.waiting else 1  # requests waited at the batch cap (an arrival mid-run: 1)
            # the engine stamps a token with its step's start time (the clock moves after the step)
            last_start = self.now + dt - (dt if k == 1 else alpha + beta * (s0 + n * (k - 1)))
            self.now += dt
            busy += dt
            steps += k
            tokens += n * k
            task_tokens += self.run_tasks * k
            self.G = G = G + k
            while heap and heap[0][0] <= G:
                _, rid = heapq.heappop(heap)
                row = running.pop(rid, None)
                if row is None or row[0] > G:  # preempted (lazy heap entry)
                    if row is not None:
                        running[rid] = row
                    continue
                self.sum_base -= row[1]
                self.run_tasks[row[6]] -= 1
                first, nt = row[3], row[4] + G
                ttft = first - row[2]
                ttfts.append(ttft)
                ok = ttft <= slo_ttft
                if nt >= 2:
                    tpot = (last_start - first) / (nt - 1)
                    tpots.append(tpot)
                    ok = ok and tpot <= slo_tpot
                met, missed, finished = met + ok, missed + (not ok), finished + 1
                met_tokens += nt if ok else 0
                a, passes = self._quality(row[6], nt, floor, max_ppl, row[7])
                agree_sum, agree_tokens = agree_sum + a * nt, agree_tokens + nt
                if ok:
                    good_tokens += nt * passes
            if self.now >= t_end:
                break
        self._arrive()
        self.ttfts += ttfts
        self.tpots += tpots
        self.tokens += tokens
        self.served += finished
        self.prev_end = self.now
        snap = self._snapshot(t0, tokens, pre_tokens, prefill, steps, ttfts, tpots, finished, self.next_i - arrivals0,
                              task_tokens, cap_waits)
        agreement = agree_sum / agree_tokens if agree_tokens else None
        self.agree_sum += agree_sum
        self.agree_tokens += agree_tokens
        extra = {"agreement_source": "predicted" if agreement is not None else "none (no request finished)",
                 "predicted_agreement": self.agreement, "scored": {"tokens": agree_tokens, "agreement": agreement}}
        return Interval(snap, met, missed, agreement, busy, slo_met_tokens=met_tokens, good_tokens=good_tokens,
                        extra=extra)

    @staticmethod
    def _prefix_hits(matches: list[str], n: int) -> np.ndarray | None:
        """``[n, K + 1]`` cumulative hits of the calibrated requests' token-by-token matches (cut to the
        shortest, K tokens): the agreement of every request over its first k tokens is column k / k. None
        where the profile recorded no matches (the calibrated per-request agreements are used instead)."""
        if not matches or len(matches) != n or min(map(len, matches)) < 1:
            return None
        K = min(map(len, matches))
        bits = np.array([[c == "1" for c in m[:K]] for m in matches], dtype=np.int64)
        return np.concatenate((np.zeros((n, 1), dtype=np.int64), np.cumsum(bits, axis=1)), axis=1)

    def _quality(self, task: int, tokens: int, floor: float, max_ppl: float | None,
                 req: int) -> tuple[float, float]:
        """A finishing request's free-running agreement under the config in force, and whether it meets the
        quality floors (agreement, and the reference perplexity where calibrated). With noise: one of its
        task's measured requests, the one request ``req``'s common random number picks (the same calibrated
        prompt under every config; passes 1 or 0). Without: the mean over them, and the *share* of
        them that meets the floors, so goodput is the noisy simulator's expectation (one mean agreement
        for every request would pass or fail them all at once). Where the profile recorded token-by-token
        matches, agreement is over the request's first ``tokens`` tokens (what a request of this length
        serves: free-running agreement falls with length, as one divergence shifts every later token);
        the perplexity stays the calibrated continuation's. No measured requests: the task's mean."""
        _, _, mean, draws, ppl, hits = self.task_stats[task]
        if not len(draws):
            return float(mean), float(mean >= floor)
        rows = slice(None) if not self.noise else min(int(self._quality_u[req] * len(draws)), len(draws) - 1)
        if hits is None:
            a = draws[rows]
        else:
            k = min(max(int(tokens), 1), hits.shape[1] - 1)
            a = hits[rows, k] / k
        ok = a >= floor
        if max_ppl is not None and ppl is not None:
            ok = ok & (ppl[rows] <= max_ppl)
        return (float(a), float(ok)) if self.noise else (float(np.mean(a)), float(np.mean(ok)))

    def _snapshot(self, t0: float, tokens: int, pre_tokens: int, prefill: int, steps: int, ttfts, tpots,
                  finished: int, arrivals: int, task_tokens: np.ndarray | None = None,
                  cap_waits: int = 0) -> TelemetrySnapshot:
        ms = self._ms
        window = max(self.now - t0, 1e-9)
        dec = tokens - pre_tokens
        p, breach_p = self.p, self.breach_p
        if task_tokens is not None and task_tokens.sum() > 0:  # the interval's task mix
            w = task_tokens / task_tokens.sum()
            p = sum(wi * st[0] for wi, st in zip(w, self.task_stats))
            p = p / p.sum() if p.sum() > 0 else self.p
            breach_p = float(sum(wi * st[1] for wi, st in zip(w, self.task_stats)))
        if dec and self.noise:
            counts = self.rng.multinomial(dec, p)
            breaches = int(self.rng.binomial(dec, min(1.0, max(0.0, breach_p))))
        else:
            counts = np.round(p * dec).astype(np.int64)
            breaches = int(round(dec * breach_p))
        counts[self.depth - 1] += pre_tokens
        total = counts.sum()
        tt, tp = percentiles(ttfts, (50, 95, 99)), percentiles(tpots, (50, 95, 99))
        return TelemetrySnapshot(
            time=self.now, window_s=window, steps=steps, model=self.model, depth=self.depth, num_layers=ms.num_layers,
            max_batch=self.max_batch, running=len(self.running), waiting=len(self.waiting),
            batch_mean=tokens / steps if steps else 0.0, batch_max=len(self.running), exit_counts=counts.tolist(),
            mean_exit_layer=float((counts * np.arange(len(counts))).sum() / total) if total else 0.0,
            greedy_exits=breaches, breaches=breaches, breach_rate=breaches / tokens if tokens else 0.0,
            conf_mean=self.conf if tokens else 0.0, output_tokens=tokens, prefill_tokens=prefill,
            tokens_per_s=tokens / window, requests_finished=finished, arrivals=arrivals,
            ttft_p50=tt[0], ttft_p95=tt[1], ttft_p99=tt[2], tpot_p50=tp[0], tpot_p95=tp[1], tpot_p99=tp[2],
            resident_bytes=self.weight_bytes + self.kv_bytes, weight_bytes=self.weight_bytes, kv_bytes=self.kv_bytes,
            budget_bytes=self.budget, switches=self.switches, loads=self.loads, cap_waits=cap_waits)

    def summary(self) -> dict:
        agreement = self.agree_sum / self.agree_tokens if self.agree_tokens else None
        return episode_summary(self.ttfts, self.tpots, self.tokens, self.now, self.served, self.n_req, agreement)

    def close(self) -> None:
        self.running, self.heap, self.waiting = {}, [], deque()


class _StepPricer:
    """Seconds of one step of a config from the profile's fitted step-time model (context aside): the
    same features calibration fitted on, at the expected rows each layer runs when ``n`` rows leave by
    the config's exit distribution ``p``."""

    def __init__(self, coef: dict[str, float], depth: int, p: np.ndarray, exit_layers: list[int]) -> None:
        self.coef, self.depth, self.p, self.layers = coef, depth, np.asarray(p, dtype=float), list(exit_layers)
        self._decode: dict[int, float] = {}

    def decode(self, n: int) -> float:
        """A decode-only step of ``n`` rows."""
        t = self._decode.get(n)
        if t is None:
            t = self._decode[n] = step_cost(self.coef, step_features(self.depth, n * self.p, self.layers, 0.0))
        return t

    def mixed(self, n_decode: int, n_prefill: int, prefill_tokens: int) -> float:
        """A step that prefills ``n_prefill`` whole prompts (``prefill_tokens`` positions) beside ``n_decode``
        decoding rows: two passes over the loaded layers where both are present."""
        return step_cost(self.coef, step_features(self.depth, n_decode * self.p, self.layers, 0.0, prefill_tokens,
                                                  n_prefill, n_prefill))
