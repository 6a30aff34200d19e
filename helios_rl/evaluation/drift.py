"""The drift correction's bookkeeping: factors from speed-probe samples (:mod:`helios_rl.evaluation.probe`)."""

from __future__ import annotations

import statistics
from collections import deque


class _Window:
    """One probe's recent samples and the factor they give (calibrated seconds / median of the window)."""

    def __init__(self, calibrated_s: float, window: int) -> None:
        if not calibrated_s > 0:
            raise ValueError(f"calibrated probe time must be positive, got {calibrated_s!r}")
        self.calibrated_s = float(calibrated_s)
        self.samples: deque[float] = deque(maxlen=max(1, int(window)))  # kept across episodes: the machine's
        # speed does not reset when an episode does
        self.factor = 1.0  # nothing probed yet: costs as measured
        self.new_episode()

    def new_episode(self) -> None:
        self.probes, self.charges, self.factor_sum = 0, 0, 0.0
        self.factor_min, self.factor_max = float("inf"), float("-inf")
        self.measured_s = self.charged_s = 0.0

    def add(self, seconds: float) -> float:
        if seconds > 0:
            self.samples.append(float(seconds))
            self.probes += 1
            self.factor = self.calibrated_s / statistics.median(self.samples)
        return self.factor

    def charge(self, cost: float) -> float:
        f = self.factor
        self.charges += 1
        self.factor_sum += f
        self.factor_min, self.factor_max = min(self.factor_min, f), max(self.factor_max, f)
        self.measured_s += cost
        self.charged_s += cost * f
        return cost * f

    def summary(self, prefix: str = "") -> dict:
        if self.charges:
            mean, lo, hi = self.factor_sum / self.charges, self.factor_min, self.factor_max
        else:
            mean = lo = hi = self.factor
        return {f"calibrated_{prefix}probe_s": round(self.calibrated_s, 5), f"{prefix}probes": self.probes,
                f"{prefix}factor_mean": round(mean, 4), f"{prefix}factor_min": round(lo, 4),
                f"{prefix}factor_max": round(hi, 4), f"measured_{prefix}s": round(self.measured_s, 4),
                f"charged_{prefix}s": round(self.charged_s, 4)}


class DriftCorrection:
    """``factor`` = calibrated probe seconds / median of the last ``window`` probe samples; costs times the
    factor are seconds of the calibrated machine. The factor is recomputed when a probe sample arrives, not
    per cost (``scale`` runs once per engine step); an episode keeps the range and mean of the factors it
    charged with.

    With ``calibrated_prefill_s`` (a :class:`~helios_rl.evaluation.probe.PrefillProbe`'s calibrated time) a
    cost's prefill part (``scale(cost, prefill=...)``) is charged by the prefill probe's own factor and the
    rest by the decode probe's: a compute-bound prefill does not slow as a decode step does. The summary then
    also says what the decode factor alone would have charged (``charged_one_factor_s``), so the two
    corrections can be compared on the same episodes.

    How often to probe and how many samples to keep were chosen on development seeds by replaying recorded
    probe logs (``benchmarks/drift_estimators.py``): the machine's speed moves within seconds, so a dense probe
    and a short window (the decode probe every 1.25 s, ``backend.drift_interval_s``; the prefill probe every 5 s;
    a median of the last 3 samples, ``backend.drift_window``) charged repeats of the same episode about three
    times more alike than a decode probe every 5 s, a prefill probe every 10 s and a median of 5 (pooled SD of
    log charged seconds 0.022 -> 0.008 on the seeds it was chosen on, 0.017 -> 0.006 on two others;
    benchmarks/RESULTS.md, issue 14)."""

    def __init__(self, calibrated_s: float, window: int = 3, calibrated_prefill_s: float | None = None) -> None:
        self.decode = _Window(calibrated_s, window)
        self.prefill = _Window(calibrated_prefill_s, window) if calibrated_prefill_s is not None else None
        self.new_episode()

    @property
    def calibrated_s(self) -> float:
        return self.decode.calibrated_s

    @property
    def factor(self) -> float:
        return self.decode.factor

    def new_episode(self) -> None:
        self.decode.new_episode()
        if self.prefill is not None:
            self.prefill.new_episode()
        self.one_factor_s = 0.0

    def add(self, seconds: float) -> float:
        """A decode probe sample."""
        return self.decode.add(seconds)

    def add_prefill(self, seconds: float) -> float:
        """A prefill probe sample."""
        if self.prefill is None:
            raise ValueError("this correction has no calibrated prefill probe")
        return self.prefill.add(seconds)

    def scale(self, cost: float, prefill: float = 0.0) -> float:
        """``cost`` in seconds of the calibrated machine; ``prefill``: the part of it that was a prefill pass."""
        self.one_factor_s += cost * self.decode.factor
        if self.prefill is None:
            return self.decode.charge(cost)
        part = min(max(0.0, float(prefill)), cost)
        # (an episode's decode window counts every charge, prefill-only steps included: its factor range is
        # the one its steps saw)
        return self.decode.charge(cost - part) + (self.prefill.charge(part) if part > 0 else 0.0)

    def summary(self) -> dict:
        """What an episode records: the probe(s) it was corrected against and the factors it ran at."""
        out = self.decode.summary()
        if self.prefill is not None:
            out["measured_s"] = round(self.decode.measured_s + self.prefill.measured_s, 4)
            out["charged_s"] = round(self.decode.charged_s + self.prefill.charged_s, 4)
            out.update(self.prefill.summary("prefill_"))
            out["charged_one_factor_s"] = round(self.one_factor_s, 4)
        return out
