"""Controllers: HELIOS phases driven by telemetry alone, baselines, and the repository's memory model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helios_rl.controllers import (
    SLO,
    ControllerContext,
    HeliosController,
    MemorySettings,
    ModelProfile,
    ParamError,
    make_controller,
    parse_params,
)
from helios_rl.controllers.params import BestStaticParams, HeliosParams
from helios_rl.controllers.static import BestStaticController, RandomController
from helios_rl.engine.config import EngineSettings
from helios_rl.engine.engine import Engine
from helios_rl.engine.telemetry import TelemetrySnapshot
from helios_rl.models.layered import LayeredModel

MB = 1 << 20


def profile(name: str, layers: int = 12, early: float = 0.9, exit_layer: int = 1, speed: float = 1.0) -> ModelProfile:
    """A synthetic profile: ``early`` of the tokens exit at ``exit_layer``, the rest at the last layer."""
    share = [0.0] * layers
    share[exit_layer] = early
    share[-1] = 1.0 - early
    options = {l + 1 for l in (1, 3, 5, 7, 9) if l + 1 < layers} | {layers}
    return ModelProfile(name=name, num_layers=layers, non_layer_bytes=2 * MB, layer_bytes=[MB] * layers,
                        adapter_bytes=0, kv_bytes_per_token_layer=1024, hidden_size=64, elem_bytes=4,
                        max_positions=256, exit_layers=[1, 3, 5, 7, 9], heads="trained", exit_share=share,
                        agreement={d: 1.0 for d in options}, breach_rate={d: 0.0 for d in options},
                        step_coef=[1e-3 / speed, 1e-4 / speed, 1e-3 / speed, 1e-4 / speed],
                        prefill_s_per_token_layer=1e-6, load_s_per_byte=1e-9)


def context(*profiles: ModelProfile, budget: int = 24 * MB, objective: str = "throughput") -> ControllerContext:
    mem = MemorySettings(budget_bytes=budget, max_batch=256, max_model_len=128, pending_window=8, recompute=True)
    return ControllerContext(tuple(p.name for p in profiles), {p.name: p for p in profiles}, mem,
                             SLO(ttft_s=10, tpot_s=1.0, objective=objective))


def snap(model: str, depth: int, layers: int = 12, finished: int = 0, tokens: int = 50, breaches: int = 0,
         exit_at: int | None = None, steps: int = 10, t: float = 0.0) -> TelemetrySnapshot:
    counts = [0] * layers
    counts[exit_at if exit_at is not None else depth - 1] = tokens
    return TelemetrySnapshot(time=t, window_s=steps * 0.01, steps=steps, model=model, depth=depth, num_layers=layers,
                             running=5, batch_mean=5.0, exit_counts=counts, output_tokens=tokens, breaches=breaches,
                             requests_finished=finished, conf_mean=0.9, arrivals=finished, prefill_tokens=100)


def run_profiles(ctrl: HeliosController, exit_at: int = 1) -> object:
    """Feed the profiling phase until HELIOS serves; returns the serving config."""
    cfg = ctrl.decide(TelemetrySnapshot())
    for _ in range(10):
        assert cfg.max_batch == ctrl.ctx.admissible(cfg.model, cfg.depth)  # profiling: no throttle by default
        cfg = ctrl.decide(snap(cfg.model, cfg.depth, finished=ctrl.params.profile_requests, exit_at=exit_at))
        if ctrl.phase == "serve":
            return cfg
    raise AssertionError("HELIOS never left profiling")


def test_helios_profiles_each_candidate_then_serves_shallow_when_exits_concentrate_early():
    ctx = context(profile("a"), profile("b", speed=0.5))
    ctrl = HeliosController(ctx, HeliosParams(coverage=0.85, profile_batch="requests"))
    first = ctrl.decide(TelemetrySnapshot())
    assert ctrl.phase == "profile:a" and first.model == "a" and first.depth == 12 and first.max_batch == 5
    # not enough finished requests yet: keep profiling
    assert ctrl.decide(snap("a", 12, finished=2, exit_at=1)) is None
    second = ctrl.decide(snap("a", 12, finished=3, exit_at=1))
    assert ctrl.phase == "profile:b" and second.model == "b"
    # 5 requests finished on b, but b produced fewer tokens than 5 requests carry: keep profiling
    assert ctrl.decide(snap("b", 12, finished=5, tokens=40, exit_at=1)) is None
    serve = ctrl.decide(snap("b", 12, finished=0, tokens=60, exit_at=1))
    assert ctrl.phase == "serve"
    assert serve.model == "a"  # twice as fast per step
    assert serve.depth == 2  # 90% of tokens exit at layer 1: load layers 0..1 only
    assert ctx.admissible("a", 2) > 3 * ctx.admissible("a", 12)
    assert serve.exit_layers == (1, 3, 5, 7, 9)


def test_helios_loads_deeper_when_exits_do_not_concentrate():
    ctx = context(profile("a"))
    ctrl = HeliosController(ctx, HeliosParams(coverage=0.9))
    cfg = run_profiles(ctrl, exit_at=11)  # live profile: every token needs the last layer
    assert cfg.depth == 12


def test_helios_overflow_grows_depth_when_no_other_candidate():
    ctx = context(profile("a"))
    ctrl = HeliosController(ctx, HeliosParams(coverage=0.85, breach_window=100, breach_limit=50))
    cfg = run_profiles(ctrl)
    assert cfg.depth == 2
    assert ctrl.decide(snap("a", 2, tokens=100, breaches=30)) is None  # 30/100: below the limit
    grown = ctrl.decide(snap("a", 2, tokens=100, breaches=80))
    assert grown is not None and grown.model == "a" and grown.depth > 2
    assert any(e["event"] == "overflow" and e["action"] == "grow" for e in ctrl.log)


def test_helios_overflow_switches_when_the_other_candidate_is_cheaper():
    # b is 10x faster per step; a profiles better only because b's live profile ran slow
    a, b = profile("a"), profile("b", speed=10.0)
    ctrl = HeliosController(context(a, b), HeliosParams(coverage=0.85, grow_fraction=0.9))
    cfg = ctrl.decide(TelemetrySnapshot())
    while ctrl.phase != "serve":
        slow = 100 if cfg.model == "b" else 1
        s = snap(cfg.model, cfg.depth, finished=5, exit_at=1)
        s.window_s *= slow
        cfg = ctrl.decide(s) or cfg
    assert cfg.model == "a"
    ctrl.ratio["b"] = 0.5  # b's measured speed recovered (e.g. a noisy profile)
    out = ctrl.decide(snap("a", cfg.depth, tokens=200, breaches=180))
    assert out is not None and out.model == "b"
    assert any(e["event"] == "overflow" and e["action"] == "switch" for e in ctrl.log)


def test_helios_reprofiles_every_interval_starting_with_the_loaded_model():
    ctrl = HeliosController(context(profile("a"), profile("b")), HeliosParams(reprofile_interval=20))
    cfg = run_profiles(ctrl)
    served_model = cfg.model
    for _ in range(3):
        assert ctrl.decide(snap(served_model, cfg.depth, finished=6)) is None
    again = ctrl.decide(snap(served_model, cfg.depth, finished=6))
    assert ctrl.phase == f"profile:{served_model}" and again.model == served_model
    assert again.max_batch == ctrl.ctx.admissible(again.model, again.depth)


def test_helios_overflow_does_not_postpone_reprofiling():
    """Regression: an overflow's grow restarted the count of requests toward re-profiling."""
    ctrl = HeliosController(context(profile("a")), HeliosParams(coverage=0.85, reprofile_interval=20))
    cfg = run_profiles(ctrl)
    assert ctrl.decide(snap("a", cfg.depth, finished=15, tokens=100, breaches=10)) is None
    grown = ctrl.decide(snap("a", cfg.depth, finished=2, tokens=100, breaches=90))
    assert grown is not None and grown.depth > cfg.depth and ctrl.served == 17
    again = ctrl.decide(snap("a", grown.depth, finished=3))
    assert ctrl.phase == "profile:a" and again is not None  # 20 served since profiling, overflow or not


def test_helios_same_inputs_same_decisions():
    def trace():
        ctrl = HeliosController(context(profile("a"), profile("b", speed=0.7)), HeliosParams())
        cfg = run_profiles(ctrl)
        ctrl.decide(snap(cfg.model, cfg.depth, tokens=150, breaches=120))
        return ctrl.log

    assert trace() == trace()


def test_helios_skips_candidates_that_do_not_fit_and_respects_agreement_floor():
    big = profile("big")
    big.non_layer_bytes = 100 * MB
    a = profile("a")
    a.agreement = {d: (0.5 if d < 6 else 1.0) for d in a.agreement}
    ctx = context(a, big)
    ctx.slo = SLO(agreement_floor=0.9)
    ctrl = HeliosController(ctx, HeliosParams(coverage=0.85))
    assert ctrl.shortlist == ["a"]
    cfg = run_profiles(ctrl)
    assert cfg.depth == 6  # coverage says 2, the floor needs 6


def test_static_sends_full_depth_once():
    ctrl = make_controller("static", context(profile("a"), profile("b")))
    cfg = ctrl.decide(TelemetrySnapshot())
    assert (cfg.model, cfg.depth, cfg.exit_layers) == ("a", 12, (1, 3, 5, 7, 9))
    assert ctrl.decide(snap("a", 12)) is None
    ctrl.reset()
    assert ctrl.decide(TelemetrySnapshot()) is not None


def test_random_is_seeded_and_feasible():
    ctx = context(profile("a"), profile("b"))

    def draws(seed):
        ctrl = RandomController(ctx, parse_params("random", {"change_prob": 0.5}))
        ctrl.reset(seed)
        out = [ctrl.decide(snap("a", 12)) for _ in range(30)]
        return [(c.model, c.depth, c.max_batch) if c else None for c in out]

    assert draws(3) == draws(3)
    assert draws(3) != draws(4)
    for c in draws(3):
        if c:
            assert 1 <= c[2] <= ctx.admissible(c[0], c[1])


def test_best_static_grid_keeps_full_depth_and_needs_a_search():
    ctx = context(profile("a"), profile("b"))
    ctrl = BestStaticController(ctx, BestStaticParams(max_points=4))
    grid = ctrl.grid()
    assert len(grid) <= 4 and any(p.depth == 12 for p in grid)
    with pytest.raises(RuntimeError, match="hindsight"):
        ctrl.decide(TelemetrySnapshot())
    ctrl.choose(grid[0])
    assert ctrl.decide(TelemetrySnapshot()).depth == grid[0].depth


def test_params_are_strict():
    with pytest.raises(ParamError, match=r"controllers\.helios\.coverag: unknown parameter \(did you mean 'coverage'"):
        parse_params("helios", {"coverag": 0.5})
    with pytest.raises(ParamError, match="breach_limit: must be <= breach_window"):
        parse_params("helios", {"breach_window": 10, "breach_limit": 20})
    with pytest.raises(ParamError, match="coverage: must be > 0"):
        parse_params("helios", {"coverage": 0})
    assert parse_params("helios", None) == HeliosParams()


def test_repository_memory_model_matches_engine(tiny_dirs):
    """The admissible batch a controller predicts is the one the engine computes."""
    model = LayeredModel(tiny_dirs["llama"], device="cpu", dtype=torch.float32)
    prof = ModelProfile(name="m", num_layers=model.num_layers, non_layer_bytes=model.weight_bytes_at_depth(0),
                        layer_bytes=[model.layer_bytes(i) for i in range(model.num_layers)], adapter_bytes=0,
                        kv_bytes_per_token_layer=model.kv_bytes_per_token_layer(), hidden_size=model.hidden_size,
                        elem_bytes=4, max_positions=model.max_positions, exit_layers=[],
                        vocab_size=model.vocab_size, intermediate_size=model.intermediate_size,
                        num_heads=model.num_heads, num_kv_heads=model.num_kv_heads, head_dim=model.head_dim)
    full = model.weight_bytes_at_depth(model.num_layers)
    for extra in (300_000, 700_000, 3_000_000):
        for strategy in ("recompute", "copy"):
            settings = EngineSettings(memory_budget_bytes=full + extra, max_batch=64, max_model_len=96,
                                      kv_strategy=strategy, pending_window=8, max_prefill_tokens=16)
            eng = Engine(model, settings)
            mem = MemorySettings(full + extra, 64, 96, 8, strategy == "recompute", settings.max_prefill_tokens)
            for d in range(1, model.num_layers + 1):
                assert prof.admissible_batch(d, mem) == eng.admissible_batch(d), (extra, strategy, d)
            assert prof.admissible_batch(model.num_layers, mem) >= 1
    assert np.isclose(prof.weight_bytes(model.num_layers), model.resident_bytes())


def test_helios_limits_the_predicted_agreement_drop():
    a = profile("a")
    a.agreement = {2: 0.90, 4: 0.97, 6: 0.99, 8: 0.995, 10: 1.0, 12: 1.0}
    cfg = run_profiles(HeliosController(context(a), HeliosParams(coverage=0.85)))
    assert cfg.depth == 6  # coverage alone says 2; 0.90 and 0.97 are more than 0.02 below full depth
    cfg = run_profiles(HeliosController(context(a), HeliosParams(coverage=0.85, max_agreement_drop=None)))
    assert cfg.depth == 2


def test_helios_does_not_shortlist_a_candidate_the_budget_keeps_too_shallow():
    a, shallow = profile("a"), profile("shallow")
    shallow.layer_bytes = [3 * MB] * 12  # fits the 24 MiB budget only a few layers deep
    shallow.agreement = {d: (0.3 if d < 12 else 1.0) for d in shallow.agreement}
    ctx = context(a, shallow)
    assert 1 <= shallow.max_feasible_depth(ctx.memory) < 12
    assert HeliosController(ctx, HeliosParams()).shortlist == ["a"]


def test_helios_skips_a_profile_config_that_never_takes_effect():
    ctrl = HeliosController(context(profile("a"), profile("b")), HeliosParams())
    first = ctrl.decide(TelemetrySnapshot())
    assert first.model == "a"
    out = None
    for _ in range(3):  # the engine keeps serving something else (e.g. it rejected the config)
        out = ctrl.decide(snap("b", 4))
    assert out is not None and out.model == "b" and ctrl.phase == "profile:b"
    assert ctrl.log[-2]["event"] == "profile-skipped"


def test_aimd_cuts_the_batch_on_a_tpot_miss_and_grows_it_with_headroom():
    from helios_rl.controllers.aimd import AimdController
    from helios_rl.controllers.params import AimdParams

    ctx = context(profile("a"), objective="goodput")
    ctrl = AimdController(ctx, AimdParams(initial_batch=10, increase=3, decrease=0.5))
    first = ctrl.decide(TelemetrySnapshot())
    assert first.model == "a" and first.max_batch == 10
    miss = TelemetrySnapshot(steps=5, requests_finished=3, tpot_p95=2.0, waiting=4)  # SLO tpot 1.0
    assert ctrl.decide(miss).max_batch == 5
    ok = TelemetrySnapshot(steps=5, requests_finished=3, tpot_p95=0.5, waiting=4)
    assert ctrl.decide(ok).max_batch == 8
    idle = TelemetrySnapshot(steps=5, requests_finished=3, tpot_p95=0.5, waiting=0)
    assert ctrl.decide(idle) is None
    for _ in range(200):
        ctrl.decide(ok)
    assert ctrl.cap == ctx.admissible("a", first.depth)  # never above what the budget admits


def test_aimd_serves_its_depth_and_setting_and_refuses_a_depth_beyond_the_model():
    from helios_rl.controllers.aimd import AimdController
    from helios_rl.controllers.params import AimdParams

    from dataclasses import replace

    ctx = replace(context(profile("a"), objective="goodput"), threshold=0.95, exit_mode="target")
    first = AimdController(ctx, AimdParams(depth=12, setting=0.99)).decide(TelemetrySnapshot())
    assert first.depth == 12 and first.target == 0.99 and first.threshold is None
    default = AimdController(ctx, AimdParams()).decide(TelemetrySnapshot())
    assert default.target == 0.95
    with pytest.raises(ValueError, match="controllers.aimd.depth: 13 is beyond a's 12 layers"):
        AimdController(ctx, AimdParams(depth=13)).decide(TelemetrySnapshot())


def test_aimd_holds_a_new_cap_and_can_judge_it_by_the_step_time():
    from helios_rl.controllers.aimd import AimdController
    from helios_rl.controllers.params import AimdParams

    ctx = context(profile("a"), objective="goodput")
    ctrl = AimdController(ctx, AimdParams(initial_batch=10, decrease=0.5, hold=2))
    ctrl.decide(TelemetrySnapshot())
    miss = TelemetrySnapshot(steps=5, requests_finished=3, tpot_p95=2.0, waiting=4)  # SLO tpot 1.0
    assert [ctrl.decide(miss) for _ in range(2)] == [None, None]  # held: the first cap's own requests
    assert ctrl.decide(miss).max_batch == 5
    assert ctrl.decide(miss) is None  # the new cap is held again
    # step_time: 5 steps in 10 s is 2 s a token, a miss although no request finished in the window
    step = AimdController(ctx, AimdParams(initial_batch=10, decrease=0.5, signal="step_time"))
    step.decide(TelemetrySnapshot())
    slow = TelemetrySnapshot(steps=5, window_s=10.0, requests_finished=0, tpot_p95=0.0, waiting=4)
    assert step.decide(slow).max_batch == 5
    fast = TelemetrySnapshot(steps=20, window_s=1.0, requests_finished=0, waiting=4)
    assert step.decide(fast).max_batch == 7
    with pytest.raises(ParamError, match="controllers.aimd.signal"):
        parse_params("aimd", {"signal": "ttft"})


def test_aimd_without_the_ttft_decrease_ignores_queueing():
    from helios_rl.controllers.aimd import AimdController
    from helios_rl.controllers.params import AimdParams

    ctx = context(profile("a"), objective="goodput")
    queued = TelemetrySnapshot(steps=5, requests_finished=3, tpot_p95=0.5, ttft_p95=1e6, waiting=4)
    on, off = (AimdController(ctx, AimdParams(initial_batch=10, ttft_decrease=t)) for t in (True, False))
    on.decide(TelemetrySnapshot()), off.decide(TelemetrySnapshot())
    assert on.decide(queued).max_batch == 7 and off.decide(queued).max_batch == 12
