"""The drift correction's bookkeeping: factors from speed-probe samples (:mod:`helios_rl.evaluation.probe`)."""

from __future__ import annotations

import statistics
from collections import deque


class DriftCorrection:
    """``factor`` = calibrated probe seconds / median of the last ``window`` probe samples; costs times the
    factor are seconds of the calibrated machine. Records every factor it served with."""

    def __init__(self, calibrated_s: float, window: int = 5) -> None:
        if not calibrated_s > 0:
            raise ValueError(f"calibrated probe time must be positive, got {calibrated_s!r}")
        self.calibrated_s = float(calibrated_s)
        self.samples: deque[float] = deque(maxlen=max(1, int(window)))  # kept across episodes: the machine is
        self.factors: list[float] = []  # this episode's
        self.probes = 0  # this episode's
        self.measured_s = self.charged_s = 0.0  # this episode's costs as measured and as charged

    def new_episode(self) -> None:
        self.factors, self.probes = [], 0
        self.measured_s = self.charged_s = 0.0

    def add(self, seconds: float) -> float:
        if seconds > 0:
            self.samples.append(float(seconds))
            self.probes += 1
        return self.factor

    @property
    def factor(self) -> float:
        if not self.samples:
            return 1.0
        return self.calibrated_s / statistics.median(self.samples)

    def scale(self, cost: float) -> float:
        f = self.factor
        self.factors.append(f)
        self.measured_s += cost
        self.charged_s += cost * f
        return cost * f

    def summary(self) -> dict:
        """What an episode records: the probe it was corrected against and the factors it ran at."""
        fs = self.factors or [self.factor]
        return {"calibrated_probe_s": round(self.calibrated_s, 5), "probes": self.probes,
                "factor_mean": round(statistics.fmean(fs), 4), "factor_min": round(min(fs), 4),
                "factor_max": round(max(fs), 4), "measured_s": round(self.measured_s, 4),
                "charged_s": round(self.charged_s, 4)}
