"""The simulator backend on a synthetic profile (no models): event-to-event timing, conservation, seeding."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from helios_rl.controllers.base import SLO
from helios_rl.engine.config import ServingConfig
from helios_rl.env.profile import FEATURES, ModelSim, SimProfile, step_cost, step_features
from helios_rl.env.sim import SimBackend

COEF = {"c0": 1e-3, "c_depth": 1e-4, "c_tok": 2e-4, "c_row_layer": 5e-5, "c_head": 0.0, "c_ctx": 1e-6,
        "c_prefill": 2e-5}


def _profile(sigma: float = 0.0, **coef) -> SimProfile:
    L = 4
    p_full = [0.5, 0.0, 0.2, 0.3]
    ms = ModelSim(name="m", config_hash="x", num_layers=L, exit_layers=[0, 2], admissible=[16, 12, 8, 4],
                  weight_bytes=[100, 200, 300, 400], slot_bytes=[10, 20, 30, 40], step_coef={**COEF, **coef},
                  residual_sigma=sigma, load_overhead_s=1e-3, load_s_per_byte=1e-6,
                  exits={"4:0.900": {"p": p_full, "breach": 0.0, "agreement": 1.0, "conf": 0.8},
                         "2:0.900": {"p": [0.5, 0.5, 0.0, 0.0], "breach": 0.5, "agreement": 0.6, "conf": 0.5}})
    return SimProfile("v", "s", "modeled", {}, {"m": ms})


def _scenario():
    return SimpleNamespace(models=("m",), engine=SimpleNamespace(max_prefill_tokens=4096, memory_budget_bytes=1000),
                           slo=SLO(ttft_s=1.0, tpot_s=0.1))


def _workload(seed: int, n: int = 40):
    rng = np.random.default_rng(seed)
    return (np.cumsum(rng.exponential(0.01, n)), rng.integers(4, 20, n), rng.integers(2, 12, n))


def _episode(sim: SimBackend, seed: int, configs=()) -> tuple[list, dict]:
    sim.reset(seed, ServingConfig(model="m", depth=4, max_batch=8, threshold=0.9))
    out, k = [], 0
    while not sim.finished and k < 10_000:
        iv = sim.advance(0.02)
        out.append((iv.snapshot.output_tokens, iv.snapshot.exit_counts, round(iv.snapshot.time, 12)))
        if k < len(configs) and configs[k] is not None:
            sim.apply(configs[k])
        k += 1
    return out, sim.summary()


def test_steps_for_is_the_smallest_k_reaching_the_time():
    sim = SimBackend(_profile(), _scenario(), _workload)
    for alpha, beta, s0, n, dt in [(1e-3, 0.0, 0, 4, 0.0105), (2e-3, 1e-6, 300, 8, 0.05), (1e-3, 1e-5, 50, 3, 0.2)]:
        k = sim._steps_for(dt, alpha, beta, s0, n)
        T = lambda k: k * alpha + beta * (k * s0 + n * k * (k - 1) / 2)  # noqa: E731
        assert T(k) >= dt - 1e-12 and (k == 1 or T(k - 1) < dt)


def test_every_request_is_served_with_all_its_tokens():
    sim = SimBackend(_profile(), _scenario(), _workload, noise=False)
    steps, summ = _episode(sim, 0, [None, ServingConfig(depth=2), None, ServingConfig(max_batch=2),
                                    ServingConfig(depth=4, max_batch=16)])
    arr, _, new = _workload(0)
    assert summ["served"] == len(arr) and summ["output_tokens"] == int(new.sum())
    assert sum(s[0] for s in steps) == int(new.sum())
    assert summ["ttft_p95"] > 0 and summ["tpot_p95"] > 0


def test_unmeasured_depth_derives_exits_and_breaches_from_the_full_depth():
    ms = _profile().models["m"]
    p, breach, agree, _ = ms.exit_stats(3, 0.9)
    assert p.tolist() == pytest.approx([0.5, 0.0, 0.5, 0.0]) and breach == pytest.approx(0.3)
    assert 0.6 <= agree <= 1.0


def test_seeded_noise_is_reproducible_and_randomisation_changes_timing():
    a = _episode(SimBackend(_profile(0.1), _scenario(), _workload), 3)
    b = _episode(SimBackend(_profile(0.1), _scenario(), _workload), 3)
    assert a == b
    c = _episode(SimBackend(_profile(0.1), _scenario(), _workload, randomize=0.5), 3)
    assert c[1]["elapsed_s"] != a[1]["elapsed_s"]


def test_infeasible_config_is_rejected_without_change():
    sim = SimBackend(_profile(), _scenario(), _workload)
    sim.reset(0, ServingConfig(model="m", depth=4, max_batch=8, threshold=0.9))
    with pytest.raises(ValueError, match="depth must be between"):
        sim.apply(ServingConfig(depth=9))
    with pytest.raises(ValueError, match="unknown model"):
        sim.apply(ServingConfig(model="other"))
    assert sim.depth == 4 and sim.max_batch == 4  # 8 requested, the budget admits 4 at full depth


@pytest.mark.parametrize("noise", [False, True])
def test_a_requests_agreement_is_its_calibrated_matches_over_its_own_length(noise):
    """Free-running agreement falls with length (one divergence shifts every later token), so a simulated
    request of k tokens scores the first k of a calibrated request's token-by-token matches."""
    prof = _profile()
    point = prof.models["m"].exits["4:0.900"]
    point["request_agreements"] = [0.25, 0.25]
    point["request_matches"] = ["1111" + "0" * 12, "1111" + "0" * 12]  # 16 tokens: agree on the first 4

    def workload(length):
        return lambda seed: (np.arange(6) * 0.01, np.full(6, 5), np.full(6, length))

    def agreement(profile, length):
        sim = SimBackend(profile, _scenario(), workload(length), noise=noise)
        _, summ = _episode(sim, 0)
        assert summ["served"] == 6
        return summ["agreement"]

    assert agreement(prof, 4) == pytest.approx(1.0)
    assert agreement(prof, 8) == pytest.approx(0.5)
    assert agreement(prof, 16) == pytest.approx(0.25)
    assert agreement(prof, 40) == pytest.approx(0.25)  # longer than calibrated: the calibrated length
    del point["request_matches"]  # a profile without matches: the calibrated per-request agreements
    assert agreement(prof, 4) == pytest.approx(0.25)


def test_a_backend_refuses_an_slo_still_relative_to_the_machine():
    """An x_step SLO is NaN seconds until resolved from a profile: every request would miss it silently."""
    sc = _scenario()
    sc.slo = SLO(ttft_s=float("nan"), tpot_s=float("nan"), relative=(("ttft_s", 40.0, 8), ("tpot_s", 2.0, 8)))
    with pytest.raises(ValueError, match=r"relative to the machine \(x_step\) and not resolved"):
        SimBackend(_profile(), sc, _workload)


def test_without_noise_goodput_is_the_expected_share_of_requests_meeting_the_floor():
    """One mean agreement for every request would pass or fail them all at once under a per-request floor;
    the deterministic simulator credits each request with the share of its calibrated draws that pass."""
    prof = _profile()
    prof.models["m"].exits["4:0.900"]["request_agreements"] = [1.0, 0.5]  # mean 0.75: under the floor
    sc = _scenario()
    sc.slo = SLO(ttft_s=100.0, tpot_s=100.0, agreement_floor=0.9)

    def good(noise: bool, seed: int = 0) -> tuple[float, int]:
        sim = SimBackend(prof, sc, _workload, noise=noise)
        sim.reset(seed, ServingConfig(model="m", depth=4, max_batch=8, threshold=0.9))
        g = 0.0
        while not sim.finished:
            g += sim.advance(0.02).good_tokens
        return g, sim.summary()["output_tokens"]

    g, total = good(False)
    assert g == pytest.approx(0.5 * total)
    g, total = good(True)  # with noise each request draws one measured request: all of its tokens or none
    assert 0 < g < total and float(g).is_integer()


def test_a_request_meets_the_floor_or_not_under_every_batch_cap_alike():
    """Common random numbers: which calibrated request a simulated request is depends on the seed and the
    request, not on the config, so configs of equal quality that differ only in the batch cap (or change it
    mid-episode, preempting rows) serve the same requests well; another seed deals other requests. Before,
    every draw came from one stream and a different cap re-dealt them (the simulator ranked equal configs
    apart on noise)."""
    prof = _profile(sigma=0.2)  # step-time jitter on: its draws must not shift the quality draws either
    prof.models["m"].exits["4:0.900"]["request_agreements"] = [1.0, 0.5, 1.0, 0.2, 1.0]
    sc = _scenario()
    sc.slo = SLO(ttft_s=100.0, tpot_s=100.0, agreement_floor=0.9)  # every request meets the SLO

    def passes(seed: int, batch: int, later: ServingConfig | None = None) -> dict[int, float]:
        sim = SimBackend(prof, sc, _workload)
        seen: dict[int, float] = {}
        quality = sim._quality

        def record(task, tokens, floor, max_ppl, req):
            a, ok = quality(task, tokens, floor, max_ppl, req)
            seen[req] = ok
            return a, ok

        sim._quality = record
        sim.reset(seed, ServingConfig(model="m", depth=4, max_batch=batch, threshold=0.9))
        k = 0
        while not sim.finished:
            sim.advance(0.02)
            k += 1
            if k == 3 and later is not None:
                sim.apply(later)
        return seen

    base = passes(0, 8)
    assert sorted(base) == list(range(40)) and 0 < sum(base.values()) < 40  # some pass, some fail
    assert passes(0, 2) == base and passes(0, 16) == base
    assert passes(0, 16, later=ServingConfig(max_batch=1)) == base  # rows preempted and re-admitted keep theirs
    assert passes(1, 8) != base


def test_step_features_count_each_pass_and_the_rows_every_layer_and_head_runs():
    # decode rows leaving at layers 0, 2, 3 (2, 1, 3 of them); exit heads at layers 0 and 2
    decode = step_features(4, np.array([2, 0, 1, 3]), [0, 2], 10.0)
    f = dict(zip(FEATURES, decode))
    reach = [6, 4, 4, 3]  # rows running each layer
    assert (f["c0"], f["c_depth"], f["c_tok"], f["c_row_layer"]) == (1, 4, 6, sum(reach))
    assert f["c_head"] == 6 + 4  # exit heads read out the rows reaching them
    assert (f["c_lm"], f["c_lm_min1"]) == (3, 1)  # the full-width head: one call on the rows reaching the end
    assert f["c_ctx"] == sum(reach) * 10.0 and f["c_prefill"] == 0 and f["c_pass"] == 0
    assert (f["c_layer_min1"], f["c_layer_min4"], f["c_layer_min8"], f["c_layer_over16"]) == (4, 15, 17, 0)
    assert (f["c_head_min1"], f["c_head_min4"], f["c_head_min8"]) == (2, 8, 10)
    # the same step with a prefill pass of two prompts (one finishing) beside it: a second pass of 4 layers
    # and a second call of the full-width head
    mixed = dict(zip(FEATURES, step_features(4, np.array([2, 0, 1, 3]), [0, 2], 10.0, 20, 2, 1)))
    assert (mixed["c_pass"], mixed["c_prefill"], mixed["c_tok"]) == (4, 80, 7)
    assert (mixed["c_row_layer"], mixed["c_head"], mixed["c_lm"], mixed["c_lm_min1"]) == (sum(reach) + 4, 10, 5, 2)
    # a prefill-only step is one pass
    assert dict(zip(FEATURES, step_features(4, np.zeros(4), [0, 2], 0.0, 20, 2, 2)))["c_pass"] == 0


def test_the_fit_recovers_a_bent_row_cost_a_straight_line_misses():
    """CPU layers cost about one weight read up to some rows, then grow with them: the knotted features
    recover such a curve from steps at mixed batches; the features without knots cannot."""
    from helios_rl.env.calibrate import _fit

    rng = np.random.default_rng(0)
    true = {"c0": 0.01, "c_depth": 0.002, "c_tok": 1e-4, "c_row_layer": 2e-4, "c_layer_min8": 1.5e-3,
            "c_head_min4": 3e-3, "c_lm_min1": 5e-3, "c_lm": 1e-4, "c_pass": 2e-3, "c_prefill": 1e-5}
    X, y = [], []
    for _ in range(400):
        n, pre = int(rng.integers(1, 33)), int(rng.integers(0, 3))
        counts = np.zeros(6)
        counts[[2, 5]] = rng.multinomial(n, [0.3, 0.7])
        x = step_features(6, counts, [2], 50.0, 40 * pre, pre, pre)
        X.append(x)
        y.append(step_cost(true, x))
    coef, sigma = _fit(np.array(X), np.array(y))
    assert sigma < 1e-3
    split = np.array([0, 0, 0.3, 0, 0, 0.7])  # a decode step of n rows as the workload splits them (in expectation)
    full = lambda c, n: step_cost(c, step_features(6, split * n, [2], 50.0))  # noqa: E731
    for n in (1, 3, 6, 10, 16, 24, 32):
        assert full(coef, n) == pytest.approx(full(true, n), rel=0.01)
    X = np.array(X)
    X[:, [i for i, k in enumerate(FEATURES) if "_min" in k or "_over" in k]] = 0.0
    line, _ = _fit(X, np.array(y))
    assert max(abs(full(line, n) / full(true, n) - 1) for n in range(1, 33)) > 0.05


def test_the_simulator_prices_the_second_pass_of_a_prefill_beside_decoding_rows():
    """Prompts that arrive while others decode prefill in a pass of their own; its cost (c_pass) lengthens
    exactly the steps that carry one, so requests' TPOT grows with it and a lone decode step does not."""
    plain = SimBackend(_profile(), _scenario(), _workload, noise=False)
    paid = SimBackend(_profile(c_pass=2e-3), _scenario(), _workload, noise=False)
    a, b = _episode(plain, 0)[1], _episode(paid, 0)[1]
    assert b["tpot_p95"] > a["tpot_p95"] and b["elapsed_s"] > a["elapsed_s"]
    assert paid.pricer.decode(5) == plain.pricer.decode(5)
    assert paid.pricer.mixed(5, 1, 10) == pytest.approx(plain.pricer.mixed(5, 1, 10) + 4 * 2e-3)
    assert paid.pricer.mixed(0, 1, 10) == plain.pricer.mixed(0, 1, 10)
