"""benchmarks/drift_estimators.py: replaying a probe log with the library's estimator charges what it charged."""

import numpy as np
import pytest
from benchmark_scripts import load_benchmark

from helios_rl.evaluation.drift import DriftCorrection


@pytest.fixture(scope="module")
def est():
    return load_benchmark("drift_estimators")


def _episodes(rng, n=4):
    """Probe logs as drift_split.py --log-probes writes them: forced samples first, then charges and
    periodic samples (a prefill sample after every second decode sample)."""
    rows = []
    for i in range(n):
        log = [["d", float(rng.uniform(0.09, 0.14))], ["p", float(rng.uniform(0.3, 0.4))]]
        k = 0
        for _ in range(60):
            cost = float(rng.uniform(0.05, 0.3))
            log.append(["c", cost, float(rng.uniform(0, cost)) if rng.random() < 0.3 else 0.0])
            if rng.random() < 0.2:
                log.append(["d", float(rng.uniform(0.09, 0.14))])
                k += 1
                if k % 2 == 0:
                    log.append(["p", float(rng.uniform(0.3, 0.4))])
        rows.append({"method": "m", "seed": i % 2, "log": log})
    return rows


def _library(rows):
    """What DriftCorrection charges (split, and the decode factor alone) fed the same log."""
    lib = DriftCorrection(0.1, window=5, calibrated_prefill_s=0.33)
    split, one = [], []
    for r in rows:
        lib.new_episode()
        for e in r["log"]:
            if e[0] == "d":
                lib.add(e[1])
            elif e[0] == "p":
                lib.add_prefill(e[1])
            else:
                lib.scale(e[1], e[2])
        split.append(lib.summary()["charged_s"])
        one.append(lib.summary()["charged_one_factor_s"])
    return split, one


def test_replay_with_the_library_estimator_matches_drift_correction(est):
    rows = _episodes(np.random.default_rng(3))
    split, one = _library(rows)
    assert np.allclose(est.replay(rows, 0.1, 0.33, "median", 5, 1), split, atol=1e-3)  # the summary rounds
    assert np.allclose(est.replay(rows, 0.1, 0.33, "median", 5, 1, split=False), one, atol=1e-3)
    assert not np.allclose(est.replay(rows, 0.1, 0.33, "min", 5, 1), split, atol=1e-3)


def test_a_sparser_cadence_drops_periodic_samples_but_keeps_the_forced_ones(est):
    rows = [{"method": "m", "seed": 0, "log": [["d", 0.2], ["p", 0.33], ["c", 1.0, 0.0], ["d", 0.1], ["c", 1.0, 0.0],
                                               ["d", 0.1], ["c", 1.0, 0.0]]}]
    # every sample: factors 0.5 (forced), then median(0.2, 0.1) = 0.15 -> 2/3, then median(0.2, 0.1, 0.1) -> 1
    assert est.replay(rows, 0.1, 0.33, "median", 5, 1)[0] == pytest.approx(0.5 + 2 / 3 + 1.0)
    # every second periodic sample: the first periodic one kept (2/3), the second dropped
    assert est.replay(rows, 0.1, 0.33, "median", 5, 2)[0] == pytest.approx(0.5 + 2 / 3 + 2 / 3)
    assert est.replay(rows, 0.1, 0.33, "min", 5, 1)[0] == pytest.approx(0.5 + 1.0 + 1.0)
