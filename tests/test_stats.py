"""One seeded statistics path, equal to rliable's on fixed arrays."""

from __future__ import annotations

import numpy as np
import pytest

from helios_rl.agents.stats import iqm, method_stats, prob_improvement, ratio_of_iqms, stratified_bootstrap


def test_definitions():
    x = np.arange(1, 9, dtype=float).reshape(-1, 1)  # IQM of 1..8 = mean(3..6) = 4.5
    assert iqm(x) == pytest.approx(4.5)
    assert prob_improvement(x + 100, x) == 1.0 and prob_improvement(x, x) == pytest.approx(0.5)


@pytest.mark.parametrize("task_bootstrap", [False, True])
def test_the_bootstrap_equals_rliable_on_fixed_arrays(task_bootstrap):
    from rliable import library as rly

    x = np.random.default_rng(3).normal(size=(5, 4))
    state = np.random.get_state()
    try:
        np.random.seed(11)  # rliable draws from numpy's global state: seeded here to the same value
        ci = rly.StratifiedBootstrap(x, task_bootstrap=task_bootstrap).conf_int(iqm, reps=400, size=0.95,
                                                                              method="percentile")
    finally:
        np.random.set_state(state)
    lo, hi, method = stratified_bootstrap(iqm, [x], reps=400, seed=11, task_bootstrap=task_bootstrap)
    assert (lo, hi) == pytest.approx(tuple(np.ravel(ci)), abs=1e-12)
    assert "RandomState(11)" in method


def test_seeded_and_repeatable_and_independent_of_global_state():
    x, y = np.random.default_rng(0).normal(2, 1, size=(5, 6)), np.random.default_rng(1).normal(1, 1, size=(1, 6))
    a = stratified_bootstrap(ratio_of_iqms, [x + 5, y + 5], reps=300, seed=2, task_bootstrap=True)
    np.random.seed(123)
    np.random.normal(size=10)
    b = stratified_bootstrap(ratio_of_iqms, [x + 5, y + 5], reps=300, seed=2, task_bootstrap=True)
    assert a == b
    assert stratified_bootstrap(ratio_of_iqms, [x + 5, y + 5], reps=300, seed=3, task_bootstrap=True) != a


def test_paired_comparison_of_methods_with_different_numbers_of_runs():
    agent = np.array([[3.0, 4.0, 5.0], [3.5, 4.5, 5.5]])  # 2 training seeds x 3 test seeds
    base = np.array([[1.0, 2.0, 3.0]])  # a deterministic baseline: one run on the same seeds
    out = method_stats({"agent": agent, "base": base}, "base", reps=500, seed=0)
    r = out["agent"]
    assert r["vs_base_iqm_ratio"] == pytest.approx(iqm(agent) / iqm(base))
    lo, hi = r["vs_base_ci"]
    assert lo <= r["vs_base_iqm_ratio"] <= hi and lo > 1.0
    assert "paired" in r["vs_base_ci_method"] and r["runs"] == 2 and r["tasks"] == 3
    with pytest.raises(ValueError, match="same 3 tasks"):
        stratified_bootstrap(ratio_of_iqms, [agent, np.ones((1, 4))], reps=10)


def test_a_test_seed_used_for_training_is_refused(tiny_scenario, tiny_profile, tmp_path):
    from helios_rl.agents.train import train
    from helios_rl.seeds import TEST_SEED_BASE, SeedLeak

    with pytest.raises(SeedLeak, match="seed 1000000 is not a development seed"):
        train(str(tiny_scenario), "agents/ppo.yaml", seed=TEST_SEED_BASE, profile=str(tiny_profile),
              out=str(tmp_path), progress=False, say=lambda s: None)
    with pytest.raises(SeedLeak, match="its evaluation environment"):
        train(str(tiny_scenario), "agents/ppo.yaml", seed=TEST_SEED_BASE - 10, profile=str(tiny_profile),
              out=str(tmp_path), progress=False, say=lambda s: None)


def test_train_cli_trains_one_run_per_seed_and_refuses_a_test_seed_before_training(tiny_scenario, tiny_profile,
                                                                                  tmp_path, capsys):
    import json

    from helios_rl.cli import main

    agent = tmp_path / "ppo.yaml"
    agent.write_text("helios_rl/Serving-Sim-v0: {policy: MlpPolicy, n_timesteps: 32, n_envs: 1, n_steps: 16, "
                     "batch_size: 16}\nhelios: {eval_freq: 32, eval_episodes: 1, checkpoint_freq: 32}\n")
    common = ["train", "--env", str(tiny_scenario), "--agent", str(agent), "--profile", str(tiny_profile),
              "--out", str(tmp_path / "runs"), "--wandb", "disabled", "--no-progress"]
    # a test seed anywhere in the list: refused before the first (development) seed trains
    assert main(common + ["--seed", "0", "1000001"]) == 2
    assert "seed 1000001 is not a development seed" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    assert main(common + ["--seeds", "2"]) == 0
    out = capsys.readouterr().out
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and "2 runs; pool them: helios-rl compare --policies" in out
    seeds = sorted(json.loads((r / "config.json").read_text())["seed"] for r in runs)
    assert seeds == [0, 1]


def test_leaderboard_row_from_a_compare_result():
    from helios_rl.bench.leaderboard import leaderboard_row

    res = {"scenario": "s", "backend": "live", "seeds": [1_000_000, 1_000_001, 1_000_002],
           "episodes": {"policy:run0": [{"goodput_tps": v} for v in (6.0, 7.0, 8.0)],
                        "static": [{"goodput_tps": v} for v in (3.0, 3.5, 4.0)],
                        "helios": [{"goodput_tps": v} for v in (4.0, 4.5, 5.0)]}}
    row = leaderboard_row(res)
    assert row.startswith("| s | live | policy:run0 | helios | 1.556 |"), row
