"""The scenario's workload for an episode seed, built once per seed and shared by both backends."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from helios_rl.workload.workload import RequestSpec, build_pool, build_workload


class EpisodeWorkload:
    """``requests(seed)``: the scenario's requests with workload seed ``scenario.workload.seed + seed``;
    ``arrays(seed)``: (arrival s, prompt tokens as served, max new tokens) for the simulator.

    The prompt pool is built once per scenario (building it reads and cuts every source text, about
    a second); a seed changes arrivals, task draws, prompt picks and lengths."""

    def __init__(self, scenario, max_cached: int = 8) -> None:
        self.scenario = scenario
        self._count = None
        self._cache: dict[int, tuple[list[RequestSpec], tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
        self.max_cached = max_cached
        self._pool = None  # the prompt pool, built once: only the trace, draws and lengths vary by seed

    def _counter(self):
        if self._count is None:
            from helios_rl.evaluation.harness import token_counter

            import functools

            # memoised: episodes draw from the same pool, so most texts (and their crops) repeat
            self._count = functools.lru_cache(maxsize=1 << 16)(token_counter(self.scenario)
                                                               or (lambda text: len(text.split())))
        return self._count

    def _build(self, seed: int):
        if seed not in self._cache:
            from helios_rl.evaluation.replay import format_prompt

            count = self._counter()
            spec = replace(self.scenario.workload, seed=self.scenario.workload.seed + int(seed))
            if self._pool is None:
                self._pool = build_pool(self.scenario.workload)
            reqs = build_workload(spec, count, pool=self._pool)
            arrays = (np.array([r.arrival_s for r in reqs], dtype=float),
                      np.array([max(1, count(format_prompt(r))) for r in reqs], dtype=np.int64),
                      np.array([r.max_new_tokens for r in reqs], dtype=np.int64))
            if len(self._cache) >= self.max_cached:
                self._cache.pop(next(iter(self._cache)))
            self._cache[seed] = (reqs, arrays)
        return self._cache[seed]

    def requests(self, seed: int) -> list[RequestSpec]:
        return self._build(seed)[0]

    def arrays(self, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self._build(seed)[1]

    __call__ = arrays

    def tasks(self, seed: int) -> list[str]:
        """Each request's task, in the order of :meth:`arrays`."""
        return [r.task for r in self.requests(seed)]

    def rates(self, seed: int) -> tuple[float, float]:
        """(mean arrival rate, mean new tokens per request) of the seed's trace (for normalisation)."""
        arr, _, new = self.arrays(seed)
        span = float(arr[-1] - arr[0]) if len(arr) > 1 else 1.0
        return (len(arr) / span if span > 0 else float(len(arr))), float(new.mean()) if len(new) else 1.0
