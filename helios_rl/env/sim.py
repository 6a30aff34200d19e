"""The calibrated discrete-event simulator backend.

It serves the scenario's workload the way the engine does (arrivals queue, admission up to the batch
cap at step boundaries, one token per running request per step, prefill on admission and after a
switch or a deeper load, preemption when the cap shrinks) but jumps from event to event: between an
admission, a finish, an arrival and the interval's end the batch is constant, so the time of ``k``
steps is closed form, ``T(k) = k a + b (k S0 + n k (k - 1) / 2)`` (``S0`` the batch's total context,
growing by ``n`` per step), from the step-time model a :class:`~helios_rl.env.profile.SimProfile`
fitted on the live engine. Exit layers, breaches and agreement come from the profile's measured
distributions of the config in force. Seeded noise: step-time jitter at the fit's residual, and
multinomial exit counts; ``randomize`` scales the step-time model per episode (domain randomisation).
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from helios_rl.engine.config import ServingConfig
from helios_rl.engine.telemetry import TelemetrySnapshot
from helios_rl.env.backend import Interval, episode_summary, percentile
from helios_rl.env.profile import ModelSim, SimProfile, head_evals_per_layer


class SimBackend:
    """Simulated serving loop (see module docstring). ``workload(seed)`` gives the request arrays."""

    def __init__(self, profile: SimProfile, scenario, workload, noise: bool = True, randomize: float = 0.0) -> None:
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

    # ------------------------------------------------------------------ control
    def admissible(self, model: str, depth: int) -> int:
        ms = self.profile.models[model]
        return int(ms.admissible[depth - 1]) if 1 <= depth <= ms.num_layers else 0

    def reset(self, seed: int, config: ServingConfig) -> None:
        self.rng = np.random.default_rng(seed)
        arr, ptok, newtok = self.workload(seed)
        self.arr_t, self.ptok, self.newtok = arr, ptok, newtok
        self.n_req = len(arr)
        self.next_i = 0
        self.now = 0.0
        self.waiting: deque = deque()  # [rem, ctx, arrival, first, ntok]
        self.rem = np.zeros(0, np.int64)
        self.ctx = np.zeros(0, np.int64)
        self.arrv = np.zeros(0)
        self.first = np.zeros(0)
        self.ntok = np.zeros(0, np.int64)
        self.pre = np.zeros(0, bool)
        self.ttfts: list[float] = []
        self.tpots: list[float] = []
        self.tokens = 0
        self.served = 0
        self.switches = self.loads = 0
        self.scale = 1.0 + (self.rng.uniform(-self.randomize, self.randomize) if self.randomize > 0 else 0.0)
        self.model = ""
        self.depth = 0
        self._set(config.model, config.depth or self.num_layers[config.model], config.max_batch, config.threshold)
        self.prev_end = 0.0

    def apply(self, config: ServingConfig) -> float:
        """Change the config (ValueError when the budget cannot hold it); returns seconds charged."""
        model = config.model or self.model
        if model not in self.profile.models:
            raise ValueError(f"unknown model {model!r}; the profile has {sorted(self.profile.models)}")
        L = self.num_layers[model]
        depth = config.depth if config.depth is not None else (self.depth if model == self.model else L)
        if not isinstance(depth, int) or not 1 <= depth <= L:
            raise ValueError(f"depth must be between 1 and {L} for {model}, got {depth!r}")
        if self.admissible(model, depth) < 1:
            raise ValueError(f"memory budget {self.budget} bytes cannot hold {model} at depth {depth} plus one "
                             f"request's KV")
        batch = config.max_batch if config.max_batch is not None else self.req_batch
        thr = config.threshold if config.threshold is not None or config.model not in (None, self.model) \
            else self.threshold
        ms = self.profile.models[model]
        cost = 0.0
        if model != self.model:
            cost = ms.load_seconds(0, depth, with_base=True)
            self.switches += 1
            self.loads += 1
            self.pre[:] = True
        elif depth > self.depth:
            cost = ms.load_seconds(self.depth, depth, with_base=False)
            self.loads += 1
            self.pre[:] = True
        cost *= self.scale
        self._set(model, depth, batch, thr)
        self.now += cost
        return cost

    def _set(self, model: str, depth: int, batch: int | None, threshold: float | None) -> None:
        ms = self.profile.models[model]
        self._ms, self.model, self.depth, self.threshold = ms, model, depth, threshold
        adm = self.admissible(model, depth)
        self.req_batch = batch
        self.max_batch = max(1, min(adm, batch or adm))
        while len(self.rem) > self.max_batch:  # preempt the newest rows; they resume by re-prefill
            i = len(self.rem) - 1
            self.waiting.appendleft([int(self.rem[i]), int(self.ctx[i]), float(self.arrv[i]), float(self.first[i]),
                                     int(self.ntok[i])])
            self._keep(np.arange(len(self.rem)) < i)
        p, self.breach_p, self.agreement, self.conf = ms.exit_stats(depth, threshold)
        self.p = p / p.sum() if p.sum() > 0 else p
        heads = head_evals_per_layer(ms.num_layers, depth, ms.exit_layers)
        m = float((self.p * np.arange(1, ms.num_layers + 1)).sum())
        h = float((self.p * heads).sum())
        c = ms.step_coef
        # per step: a0 + n * a1 + b * (total context); prefill adds c_prefill * tokens * depth
        self.a0 = c["c0"] + c["c_depth"] * depth
        self.a1 = c["c_tok"] + c["c_row_layer"] * m + c["c_head"] * h
        self.b = c["c_ctx"] * m
        self.c_pre = c["c_prefill"] * depth
        self.weight_bytes = ms.weight_bytes[depth - 1]
        self.kv_bytes = ms.slot_bytes[depth - 1] * self.max_batch

    def _keep(self, mask: np.ndarray) -> None:
        self.rem, self.ctx, self.arrv = self.rem[mask], self.ctx[mask], self.arrv[mask]
        self.first, self.ntok, self.pre = self.first[mask], self.ntok[mask], self.pre[mask]

    # ------------------------------------------------------------------ serving
    @property
    def finished(self) -> bool:
        return self.next_i >= self.n_req and not self.waiting and len(self.rem) == 0

    def _arrive(self) -> None:
        while self.next_i < self.n_req and self.arr_t[self.next_i] <= self.now:
            i = self.next_i
            self.waiting.append([int(self.newtok[i]), int(self.ptok[i]), float(self.arr_t[i]), math.nan, 0])
            self.next_i += 1

    def _admit(self) -> None:
        free = self.max_batch - len(self.rem)
        if free <= 0 or not self.waiting:
            return
        budget, rows = self.max_prefill, []
        while self.waiting and len(rows) < free:
            r = self.waiting[0]
            if rows and r[1] > budget:
                break
            self.waiting.popleft()
            rows.append(r)
            budget -= r[1]
        a = np.array(rows, dtype=float)
        self.rem = np.concatenate([self.rem, a[:, 0].astype(np.int64)])
        self.ctx = np.concatenate([self.ctx, a[:, 1].astype(np.int64)])
        self.arrv = np.concatenate([self.arrv, a[:, 2]])
        self.first = np.concatenate([self.first, a[:, 3]])
        self.ntok = np.concatenate([self.ntok, a[:, 4].astype(np.int64)])
        self.pre = np.concatenate([self.pre, np.ones(len(rows), bool)])

    def _steps_for(self, dt: float, alpha: float, beta: float, s0: float, n: int) -> int:
        """Smallest k >= 1 with T(k) >= dt."""
        if dt <= 0:
            return 1
        a = beta * n / 2.0
        if a <= 0:
            return max(1, math.ceil(dt / alpha - 1e-12))
        b = alpha + beta * s0 - a
        k = max(1, math.ceil((-b + math.sqrt(b * b + 4 * a * dt)) / (2 * a) - 1e-12))
        return k

    def advance(self, seconds: float) -> Interval:
        t0 = self.prev_end
        t_end = self.now + seconds
        jitter = self.scale * (float(self.rng.lognormal(0.0, self._ms.residual_sigma))
                               if self.noise and self._ms.residual_sigma > 0 else 1.0)
        tokens = prefill = steps = 0
        busy = 0.0
        ttfts, tpots = [], []
        met = missed = finished = 0
        arrivals0 = self.next_i
        slo_ttft, slo_tpot = self.slo.ttft_s, self.slo.tpot_s
        while True:
            self._arrive()
            self._admit()
            n = len(self.rem)
            if n == 0:
                if self.next_i >= self.n_req:
                    break
                t_next = float(self.arr_t[self.next_i])
                if t_next >= t_end:
                    self.now = max(self.now, t_end)
                    break
                self.now = t_next
                continue
            alpha = max(1e-7, (self.a0 + self.a1 * n) * jitter)
            beta = self.b * jitter
            s0 = float(self.ctx.sum())
            if self.pre.any():  # one step with prefill; every row (prefilled or not) yields a token
                ptoks = int(self.ctx[self.pre].sum())
                dt = alpha + beta * s0 + self.c_pre * ptoks * jitter
                k = 1
                prefill += ptoks
                self.pre[:] = False
            else:
                k = int(self.rem.min())
                if self.next_i < self.n_req and n < self.max_batch:
                    k = min(k, self._steps_for(float(self.arr_t[self.next_i]) - self.now, alpha, beta, s0, n))
                k = min(k, self._steps_for(t_end - self.now, alpha, beta, s0, n))
                dt = k * alpha + beta * (k * s0 + n * k * (k - 1) / 2.0)
            # the engine stamps a token with its step's start time (the clock moves after the step)
            last_start = self.now + dt - (dt if k == 1 else alpha + beta * (s0 + n * (k - 1)))
            nofirst = np.isnan(self.first)
            if nofirst.any():
                self.first[nofirst] = self.now
            self.now += dt
            busy += dt
            steps += k
            tokens += n * k
            self.rem -= k
            self.ctx += k
            self.ntok += k
            done = self.rem <= 0
            if done.any():
                for a, f, nt in zip(self.arrv[done], self.first[done], self.ntok[done]):
                    ttft = f - a
                    tpot = (last_start - f) / (nt - 1) if nt >= 2 else None
                    ttfts.append(ttft)
                    if tpot is not None:
                        tpots.append(tpot)
                    if ttft <= slo_ttft and (tpot is None or tpot <= slo_tpot):
                        met += 1
                    else:
                        missed += 1
                    finished += 1
                self._keep(~done)
            if self.now >= t_end:
                break
        self._arrive()
        self.ttfts += ttfts
        self.tpots += tpots
        self.tokens += tokens
        self.served += finished
        self.prev_end = self.now
        snap = self._snapshot(t0, tokens, prefill, steps, ttfts, tpots, finished, self.next_i - arrivals0)
        return Interval(snap, met, missed, self.agreement, busy)

    def _snapshot(self, t0: float, tokens: int, prefill: int, steps: int, ttfts, tpots, finished: int,
                  arrivals: int) -> TelemetrySnapshot:
        ms = self._ms
        window = max(self.now - t0, 1e-9)
        if tokens and self.noise:
            counts = self.rng.multinomial(tokens, self.p)
            breaches = int(self.rng.binomial(tokens, min(1.0, max(0.0, self.breach_p))))
        else:
            counts = np.round(self.p * tokens).astype(np.int64)
            breaches = int(round(tokens * self.breach_p))
        total = counts.sum()
        return TelemetrySnapshot(
            time=self.now, window_s=window, steps=steps, model=self.model, depth=self.depth, num_layers=ms.num_layers,
            max_batch=self.max_batch, running=len(self.rem), waiting=len(self.waiting),
            batch_mean=tokens / steps if steps else 0.0, batch_max=len(self.rem), exit_counts=counts.tolist(),
            mean_exit_layer=float((counts * np.arange(len(counts))).sum() / total) if total else 0.0,
            greedy_exits=breaches, breaches=breaches, breach_rate=breaches / tokens if tokens else 0.0,
            conf_mean=self.conf if tokens else 0.0, output_tokens=tokens, prefill_tokens=prefill,
            tokens_per_s=tokens / window, requests_finished=finished, arrivals=arrivals,
            ttft_p50=percentile(ttfts, 50), ttft_p95=percentile(ttfts, 95), ttft_p99=percentile(ttfts, 99),
            tpot_p50=percentile(tpots, 50), tpot_p95=percentile(tpots, 95), tpot_p99=percentile(tpots, 99),
            resident_bytes=self.weight_bytes + self.kv_bytes, weight_bytes=self.weight_bytes, kv_bytes=self.kv_bytes,
            budget_bytes=self.budget, switches=self.switches, loads=self.loads)

    def summary(self) -> dict:
        return episode_summary(self.ttfts, self.tpots, self.tokens, self.now, self.served, self.n_req)

    def close(self) -> None:
        self.rem = self.ctx = self.first = self.arrv = self.ntok = np.zeros(0)
        self.waiting = deque()
