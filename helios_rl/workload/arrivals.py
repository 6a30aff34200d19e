"""Seeded request arrival processes: Poisson, bursty Gamma, and time-varying rates.

All processes are one construction: a renewal process with unit-mean Gamma
inter-arrivals (coefficient of variation ``cv``; ``cv = 1`` is exponential, i.e.
Poisson) in *operational time*, mapped to wall time through the inverse of the
cumulative rate ``Lambda(t) = integral of rate``. For a constant rate that is just a
division by the rate; for piecewise rates it is the standard time-rescaling method, which
is exact for Poisson and keeps the requested burstiness locally for ``cv != 1``.

Sampling always takes an explicit ``numpy.random.Generator`` (or an int seed), never
global random state, so the same seed gives the same arrival times.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

RngLike = np.random.Generator | int


def as_rng(rng: RngLike) -> np.random.Generator:
    """A ``Generator`` from a generator or an int seed."""
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise TypeError(f"expected a numpy Generator or an int seed, got {type(rng).__name__}")


class ArrivalProcess(ABC):
    """Base class: subclasses define the cumulative rate and its inverse, and ``cv``."""

    cv: float

    @abstractmethod
    def cumulative(self, t: np.ndarray) -> np.ndarray:
        """Expected number of arrivals in ``[0, t]`` (``Lambda(t)``)."""

    @abstractmethod
    def inverse_cumulative(self, s: np.ndarray) -> np.ndarray:
        """Wall time at which ``Lambda`` reaches ``s`` (``inf`` past a trailing zero rate)."""

    def max_cumulative(self) -> float:
        """Supremum of ``Lambda`` (``inf`` unless the rate ends at zero)."""
        return math.inf

    def sample(self, rng: RngLike, *, duration_s: float | None = None,
               count: int | None = None) -> np.ndarray:
        """Sorted arrival times (seconds from 0) in ``[0, duration_s)``, at most ``count`` of them.

        At least one of ``duration_s`` and ``count`` is required. Fewer than ``count``
        come back only when the horizon or a trailing zero rate ends the process first.
        """
        if duration_s is None and count is None:
            raise ValueError("give duration_s, count, or both")
        if duration_s is not None and not (math.isfinite(duration_s) and duration_s > 0):
            raise ValueError(f"duration_s must be a positive finite number, got {duration_s}")
        if count is not None and (int(count) != count or count < 0):
            raise ValueError(f"count must be a non-negative integer, got {count}")
        rng = as_rng(rng)
        s_max = self.max_cumulative()
        if duration_s is not None:
            s_max = min(s_max, float(self.cumulative(np.array([duration_s]))[0]))
        if count is None and not math.isfinite(s_max):
            raise ValueError("the rate never ends, so a duration_s is needed")
        want = math.inf if count is None else int(count)
        shape, scale = 1.0 / self.cv**2, self.cv**2
        out: list[np.ndarray] = []
        s, n = 0.0, 0
        while n < want:
            remaining = want - n if math.isfinite(want) else math.inf
            expected = s_max - s if math.isfinite(s_max) else math.inf
            block = int(min(remaining, expected + 10.0 * math.sqrt(expected + 1.0) * max(1.0, self.cv) + 16))
            gaps = rng.exponential(1.0, block) if self.cv == 1.0 else rng.gamma(shape, scale, block)
            pts = s + np.cumsum(gaps)
            if math.isfinite(s_max) and pts[-1] >= s_max:
                pts = pts[pts < s_max]
                out.append(pts)
                n += pts.size
                break
            out.append(pts)
            n += pts.size
            s = float(pts[-1])
        ops = np.concatenate(out) if out else np.empty(0)
        if math.isfinite(want):
            ops = ops[: int(want)]
        times = self.inverse_cumulative(ops)
        if duration_s is not None:
            times = times[times < duration_s]
        return np.sort(times)


def _check_cv(cv: float) -> float:
    cv = float(cv)
    if not (math.isfinite(cv) and cv > 0):
        raise ValueError(f"cv must be a positive finite number, got {cv}")
    return cv


@dataclass(frozen=True)
class Gamma(ArrivalProcess):
    """Constant ``rate`` (requests/s) with Gamma inter-arrivals of coefficient of variation ``cv``.

    ``cv > 1`` is bursty (clumps of near-simultaneous requests and long gaps), ``cv < 1``
    more regular than Poisson.
    """

    rate: float
    cv: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(float(self.rate)) and self.rate > 0):
            raise ValueError(f"rate must be a positive finite number, got {self.rate}")
        object.__setattr__(self, "rate", float(self.rate))
        object.__setattr__(self, "cv", _check_cv(self.cv))

    def cumulative(self, t: np.ndarray) -> np.ndarray:
        return np.asarray(t, dtype=float) * self.rate

    def inverse_cumulative(self, s: np.ndarray) -> np.ndarray:
        return np.asarray(s, dtype=float) / self.rate


@dataclass(frozen=True)
class Poisson(Gamma):
    """Poisson arrivals at ``rate`` requests/s (exponential inter-arrivals, ``cv = 1``)."""

    rate: float
    cv: float = field(default=1.0, init=False)


@dataclass(frozen=True)
class PiecewiseRate(ArrivalProcess):
    """Rate that steps over time: ``segments = [(t_start, rate), ...]`` starting at ``t = 0``.

    Each rate holds until the next segment's start; the last holds forever. Zero rates
    are allowed (idle periods). ``cv`` sets the burstiness as in :class:`Gamma`.
    """

    segments: Sequence[tuple[float, float]]
    cv: float = 1.0
    _starts: np.ndarray = field(init=False, repr=False, compare=False)
    _rates: np.ndarray = field(init=False, repr=False, compare=False)
    _cum: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        segs = []
        for i, seg in enumerate(self.segments):
            try:
                t, r = (float(x) for x in seg)
            except (TypeError, ValueError):
                raise ValueError(f"segments[{i}] must be a (t_start, rate) pair, got {seg!r}") from None
            if not (math.isfinite(t) and math.isfinite(r) and r >= 0):
                raise ValueError(f"segments[{i}]: need finite t_start and rate >= 0, got {seg!r}")
            segs.append((t, r))
        if not segs:
            raise ValueError("segments must not be empty")
        if segs[0][0] != 0.0:
            raise ValueError(f"segments[0] must start at t=0, got t={segs[0][0]}")
        for i in range(1, len(segs)):
            if segs[i][0] <= segs[i - 1][0]:
                raise ValueError(f"segments[{i}]: start times must strictly increase")
        if not any(r > 0 for _, r in segs):
            raise ValueError("segments: at least one rate must be positive")
        starts = np.array([t for t, _ in segs])
        rates = np.array([r for _, r in segs])
        cum = np.concatenate([[0.0], np.cumsum(np.diff(starts) * rates[:-1])])
        object.__setattr__(self, "segments", tuple(segs))
        object.__setattr__(self, "cv", _check_cv(self.cv))
        object.__setattr__(self, "_starts", starts)
        object.__setattr__(self, "_rates", rates)
        object.__setattr__(self, "_cum", cum)

    def rate_at(self, t: float | np.ndarray) -> np.ndarray:
        """The rate in force at time(s) ``t``."""
        idx = np.searchsorted(self._starts, np.asarray(t, dtype=float), side="right") - 1
        return self._rates[np.clip(idx, 0, None)]

    def cumulative(self, t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=float)
        idx = np.clip(np.searchsorted(self._starts, t, side="right") - 1, 0, None)
        return self._cum[idx] + (t - self._starts[idx]) * self._rates[idx]

    def inverse_cumulative(self, s: np.ndarray) -> np.ndarray:
        s = np.asarray(s, dtype=float)
        idx = np.clip(np.searchsorted(self._cum, s, side="right") - 1, 0, None)
        rate = self._rates[idx]
        with np.errstate(divide="ignore", invalid="ignore"):
            t = self._starts[idx] + np.where(rate > 0, (s - self._cum[idx]) / rate, np.inf)
        return t

    def max_cumulative(self) -> float:
        return math.inf if self._rates[-1] > 0 else float(self._cum[-1])
