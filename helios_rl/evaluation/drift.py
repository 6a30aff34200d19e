"""The drift correction's bookkeeping: factors from speed-probe samples (:mod:`helios_rl.evaluation.probe`)."""

from __future__ import annotations

import statistics
from collections import deque


class DriftCorrection:
    """``factor`` = calibrated probe seconds / median of the last ``window`` probe samples; costs times the
    factor are seconds of the calibrated machine. The factor is recomputed when a probe sample arrives, not
    per cost (``scale`` runs once per engine step); an episode keeps the range and mean of the factors it
    charged with."""

    def __init__(self, calibrated_s: float, window: int = 5) -> None:
        if not calibrated_s > 0:
            raise ValueError(f"calibrated probe time must be positive, got {calibrated_s!r}")
        self.calibrated_s = float(calibrated_s)
        self.samples: deque[float] = deque(maxlen=max(1, int(window)))  # kept across episodes: the machine's
        # speed does not reset when an episode does
        self.factor = 1.0  # nothing probed yet: costs as measured
        self.new_episode()

    def new_episode(self) -> None:
        self.probes = 0
        self.charges, self.factor_sum = 0, 0.0
        self.factor_min, self.factor_max = float("inf"), float("-inf")
        self.measured_s = self.charged_s = 0.0  # this episode's costs as measured and as charged

    def add(self, seconds: float) -> float:
        if seconds > 0:
            self.samples.append(float(seconds))
            self.probes += 1
            self.factor = self.calibrated_s / statistics.median(self.samples)
        return self.factor

    def scale(self, cost: float) -> float:
        f = self.factor
        self.charges += 1
        self.factor_sum += f
        self.factor_min, self.factor_max = min(self.factor_min, f), max(self.factor_max, f)
        self.measured_s += cost
        self.charged_s += cost * f
        return cost * f

    def summary(self) -> dict:
        """What an episode records: the probe it was corrected against and the factors it ran at."""
        if self.charges:
            mean, lo, hi = self.factor_sum / self.charges, self.factor_min, self.factor_max
        else:
            mean = lo = hi = self.factor
        return {"calibrated_probe_s": round(self.calibrated_s, 5), "probes": self.probes,
                "factor_mean": round(mean, 4), "factor_min": round(lo, 4), "factor_max": round(hi, 4),
                "measured_s": round(self.measured_s, 4), "charged_s": round(self.charged_s, 4)}
