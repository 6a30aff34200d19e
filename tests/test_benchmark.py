"""``helios-rl benchmark`` end to end on tiny models: a local Ray instance with two workers, the
leaderboard's statistics, and a resume after the process is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

AGENTS = {
    "ppo": "helios_rl/Serving-Sim-v0: {policy: MlpPolicy, n_timesteps: 64, n_envs: 1, n_steps: 32, batch_size: 16}\n",
    "dqn": "helios_rl/Serving-SimFlat-v0: {policy: MlpPolicy, n_timesteps: 64, learning_starts: 16, "
           "buffer_size: 200, batch_size: 8}\n",
}


@pytest.fixture
def tiny_suite(tiny_scenario, tmp_path):
    suite = tmp_path / "suite"
    suite.mkdir()
    text = tiny_scenario.read_text()
    (suite / "a.yaml").write_text(text.replace("name: tiny-env", "name: tiny-a-suite"))
    (suite / "b.yaml").write_text(text.replace("name: tiny-env", "name: tiny-b-suite")
                                  .replace("rate: 300.0", "rate: 150.0"))
    agents = tmp_path / "agents"
    agents.mkdir()
    for name, body in AGENTS.items():
        (agents / f"{name}.yaml").write_text(body)
    return suite, agents


def cli(suite, agents, out, *extra) -> list[str]:
    # suite and agents relative to the command's folder, as a user types them (Ray Tune runs trials elsewhere)
    return [sys.executable, "-m", "helios_rl.cli", "benchmark", suite.name, "--out", str(out), "--agents", "ppo,dqn",
            "--baselines", "static,best-static,helios,aimd,tuned-aimd", "--train-seeds", "2", "--test-seeds", "2",
            "--agents-dir", agents.name, "--workers", "2", *extra]


def test_a_tiny_suite_runs_on_ray_and_resumes_after_a_kill(tiny_suite, tmp_path):
    suite, agents = tiny_suite
    out = tmp_path / "bench"
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0"}
    proc = subprocess.Popen(cli(suite, agents, out, "--repeat", "2"), env=env, start_new_session=True, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while time.time() < deadline:  # kill it once the training wave has begun to finish
        if len(list((out / "trials").glob("train__*.json"))) >= 2:
            break
        if proc.poll() is not None:
            pytest.fail(f"benchmark exited early: {proc.stderr.read()[-3000:]}")
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {p.name: p.read_text() for p in (out / "trials").glob("*.json")}
    assert any(n.startswith("prepare__") for n in done_before) and not (out / "leaderboard.json").exists()
    subprocess.run(["ray", "stop", "--force"], capture_output=True)
    res = subprocess.run(cli(suite, agents, out, "--repeat", "2"), env=env, capture_output=True, text=True,
                         timeout=900, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "already done (resumed)" in res.stdout
    for name, text in done_before.items():  # finished trials were not run again
        assert (out / "trials" / name).read_text() == text
    board = json.loads((out / "leaderboard.json").read_text())
    assert set(board["summary"]) == {"a/sim", "a/live", "b/sim", "b/live"}
    for key, row in board["summary"].items():
        assert row["train_seeds"] == 2 and row["test_seeds"] == 2
        lo, hi = row["ci"]
        assert lo <= row["best_agent_vs_best_baseline_iqm"] <= hi
        assert row["repro_spread"] is not None and isinstance(row["ranking_stable"], bool)
        sc = board["scenarios"][key]["stats"]
        assert sc["methods"]["ppo"]["runs"] == 2 and sc["methods"]["static"]["runs"] == 1
        assert sc["methods"]["tuned-aimd"]["runs"] == 1
        tuned = board["scenarios"][key]["tuned_aimd"]  # searched on development seeds, recorded with its score
        prep = json.loads((out / "trials" / f"prepare__{key.split('/')[0]}.json").read_text())
        assert tuned == max(prep["tuned_aimd_grid"], key=lambda r: r["goodput_tps"])
    # the score divides the good tokens by the seed's SLO window, the same for every method (a rate over the
    # episode's own length, kept beside it, can rise by ending sooner)
    shard = json.loads(next((out / "trials").glob("eval__*live*.json")).read_text())
    assert len({ep["slo_window_s"] for ep in shard["episodes"].values()}) == 1
    for ep in shard["episodes"].values():
        assert ep["good_tokens"] >= 0 and ep["elapsed_s"] > 0 and ep["slo_window_s"] > 0
        assert abs(ep["good_tokens"] / ep["slo_window_s"] - ep["goodput_tps"]) <= 1e-9 * max(1.0, ep["goodput_tps"])
        assert abs(ep["good_tokens"] / ep["elapsed_s"] - ep["goodput_elapsed_tps"]) <= 1e-9 * max(
            1.0, ep["goodput_elapsed_tps"])
        assert len({json.dumps(r["point"], sort_keys=True) for r in prep["tuned_aimd_grid"]}) > 1
        assert sc["methods"]["ppo"]["tasks"] == 2
    shards = [json.loads(p.read_text()) for p in (out / "trials").glob("eval__*.json")]
    assert all(s["seed"] >= 1_000_000 for s in shards)
    assert all(s["worker"]["host"] for s in shards)
    from helios_rl.utils.provenance import git_revision

    assert sum(board["trial_revisions"].values()) == len(list((out / "trials").glob("*.json")))
    assert all(s["git"] == git_revision() for s in shards)
    md = (out / "leaderboard.md").read_text()
    assert md.startswith("# Leaderboard") and "| good share |" in md
    windows = board["scenarios"]["a/live"]["repro"]["repeat_windows"]
    assert [w["repeat"] for w in windows] == [0, 1] and all(w["finished_first"] <= w["finished_last"] for w in windows)
    assert "Repeats ran r0 " in md
    medians = board["scenarios"]["a/live"]["episode_medians"]
    assert set(medians) == set(sc["methods"]) and all(0 <= m["good_token_share"] <= 1 for m in medians.values())
    assert all((out / p).stat().st_size > 1000 for p in board["plots"])
    live = [s for s in shards if s["backend"] == "live"]
    assert live and all(e["agreement_source"] == "measured" for s in live for e in s["episodes"].values()
                        if e["agreement"] is not None)


def test_another_configuration_cannot_resume_into_the_same_folder(tiny_suite, tmp_path):
    from helios_rl.bench.plan import BenchConfig, suite_scenarios
    from helios_rl.bench.runner import run_benchmark

    suite, agents = tiny_suite
    out = tmp_path / "b2"
    out.mkdir()
    (out / "benchmark.json").write_text(json.dumps({"fingerprint": "other", "config": {}}))
    cfg = BenchConfig(scenarios=suite_scenarios(suite), agents=("ppo",), train_seeds=1, test_seeds=1)
    with pytest.raises(ValueError, match="another configuration"):
        run_benchmark(cfg, out, str(suite))


def test_a_larger_repeat_extends_a_finished_run_with_only_the_repeats_it_lacks(tiny_suite, tmp_path):
    from dataclasses import replace

    from helios_rl.bench.plan import BenchConfig, plan, suite_scenarios
    from helios_rl.bench.runner import claim

    suite, agents = tiny_suite
    one = BenchConfig(scenarios=suite_scenarios(suite), agents=("ppo",), train_seeds=2, test_seeds=2)
    three = replace(one, repeat=3)
    ids1, ids3 = [t.id for t in plan(one)], [t.id for t in plan(three)]
    assert set(ids1) < set(ids3)  # the first repeat's trials, training included, are the same trials
    added = set(ids3) - set(ids1)
    assert added and all(i.startswith("eval/") and ("/r1/" in i or "/r2/" in i) for i in added)
    assert len(added) == 2 * len([i for i in ids1 if i.startswith("eval/")])
    out = tmp_path / "run"
    out.mkdir()
    claim(out, one, str(suite))
    claim(out, three, str(suite))  # same run: resumes
    assert json.loads((out / "benchmark.json").read_text())["config"]["repeat"] == 3
    # a marker from before the fingerprint left `repeat` out (another hash, the same recorded configuration)
    (out / "benchmark.json").write_text(json.dumps({"fingerprint": "0ld", "config": one.to_dict()}))
    claim(out, three, str(suite))
    for other in (replace(one, test_seeds=3), replace(one, agents=("dqn",)), replace(three, score_version=1)):
        with pytest.raises(ValueError, match="another configuration"):
            claim(out, other, str(suite))


def test_unknown_methods_are_refused_before_anything_runs(tiny_suite, tmp_path):
    from helios_rl.bench.plan import BenchConfig, suite_scenarios

    suite, agents = tiny_suite
    with pytest.raises(ValueError, match=r"unknown baseline\(s\) \['tuned_aimd'\]; known: .*tuned-aimd"):
        BenchConfig(scenarios=suite_scenarios(suite), baselines=("static", "tuned_aimd"))
    with pytest.raises(ValueError, match=r"unknown backend\(s\) \['gpu'\]"):
        BenchConfig(scenarios=suite_scenarios(suite), backends=("gpu",))
    res = subprocess.run([sys.executable, "-m", "helios_rl.cli", "benchmark", suite.name, "--out", "x", "--agents",
                          "ppo,sac", "--agents-dir", agents.name], capture_output=True, text=True, cwd=tmp_path,
                         timeout=120)
    assert res.returncode != 0 and "no agent file for ['sac'] in agents/" in res.stderr
    assert not (tmp_path / "x").exists()


def _shards(scores: dict[str, list[float]], behaviour: dict[str, str]) -> list[dict]:
    seeds = (1_000_000, 1_000_001)
    return [{"seed": sd, "episodes": {f"{m}#0": {"goodput_tps": v[i], "behaviour": behaviour[m] + str(i)}
                                      for m, v in scores.items()}} for i, sd in enumerate(seeds)]


def test_identical_serving_ranks_as_one_entry_but_a_real_flip_is_unstable():
    """Two baselines that kept the same configs in force (HELIOS holding the static config) swap places on
    timing noise alone: the ranking ranks them as one entry. Two methods that served differently and swap
    places make the ranking unstable, and the strict order is reported beside it."""
    from helios_rl.bench.leaderboard import repro, same_behaviour, scenario_stats, score_matrices

    methods = {"static": 1, "helios": 1, "aimd": 1}
    same = {"static": "a", "helios": "a", "aimd": "b"}
    rep1 = _shards({"static": [10.0, 11.0], "helios": [10.1, 11.1], "aimd": [5.0, 6.0]}, same)
    rep2 = _shards({"static": [10.1, 11.1], "helios": [10.0, 11.0], "aimd": [5.0, 6.0]}, same)
    assert same_behaviour(rep1, methods) == [["helios", "static"]]
    stats = [scenario_stats(score_matrices(s, methods), [], list(methods), reps=200,
                            groups=same_behaviour(s, methods)) for s in (rep1, rep2)]
    assert stats[0]["ranking"] != stats[1]["ranking"]
    r = repro(stats)
    assert r["ranking_stable"] and not r["strict_ranking_stable"]
    assert r["rankings"][0] == ["helios=static", "aimd"] and r["tied_identical"] == [["helios", "static"]]
    assert r["repro_spread"] < 0.02

    differ = {"static": "a", "helios": "c", "aimd": "b"}  # same scores, but HELIOS served otherwise
    stats = [scenario_stats(score_matrices(_shards(sc, differ), methods), [], list(methods), reps=200,
                            groups=same_behaviour(_shards(sc, differ), methods))
             for sc in ({"static": [10.0, 11.0], "helios": [10.1, 11.1], "aimd": [5.0, 6.0]},
                        {"static": [10.1, 11.1], "helios": [10.0, 11.0], "aimd": [5.0, 6.0]})]
    r = repro(stats)
    assert not r["ranking_stable"] and r["tied_identical"] == []
    assert [f["pair"] for f in r["ranking_flips"]] == [["helios", "static"]]
    assert 0.009 < r["ranking_flips"][0]["largest_relative_gap"] < 0.0096  # IQMs 10.6 vs 10.5


def test_repro_spread_is_relative_but_floored_for_a_method_near_zero():
    """An agent at 0, 1 % and 0 of the best baseline moves by 1 % of it: its spread is measured against the
    floor (0.01 / 0.1), not against its mean (which gives 3.0, kept as the unfloored figure); a method near the
    baseline keeps its plain relative spread, and the worst method is named."""
    from helios_rl.bench.leaderboard import SPREAD_FLOOR, repro

    def rep(ppo, aimd):
        return {"best_baseline": "static", "ranking": ["static", "aimd", "ppo"],
                "methods": {"static": {"iqm": 10.0}, "aimd": {"iqm": 10 * aimd, "vs_static_iqm_ratio": aimd},
                            "ppo": {"iqm": 10 * ppo, "vs_static_iqm_ratio": ppo}}}

    r = repro([rep(0.0, 0.90), rep(0.01, 0.93), rep(0.0, 0.91)])
    assert SPREAD_FLOOR == 0.1
    assert abs(r["spread_by_method"]["ppo"] - 0.01 / 0.1) < 1e-9
    assert abs(r["spread_by_method"]["aimd"] - 0.03 / (2.74 / 3)) < 1e-9
    assert r["repro_spread_method"] == "ppo" and abs(r["repro_spread"] - 0.1) < 1e-9
    assert abs(r["repro_spread_unfloored"] - 3.0) < 1e-9
    r = repro([rep(0.5, 0.90), rep(0.51, 0.99), rep(0.5, 0.91)])  # ratios above the floor: plain relative spread
    assert r["repro_spread_method"] == "aimd" and abs(r["repro_spread"] - 0.09 / (2.8 / 3)) < 1e-9
    assert r["repro_spread"] == r["repro_spread_unfloored"]
    r = repro([rep(0.5, 0.9)] * 3)  # every ratio repeated exactly: a spread of 0 names no method
    assert r["repro_spread"] == 0.0 and r["repro_spread_method"] is None and r["ranking_stable"]


def test_git_revision_says_when_the_code_is_not_the_commit(tmp_path):
    import subprocess

    from helios_rl.utils.provenance import git_revision, short_revision

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    assert git_revision(tmp_path) is None  # not a checkout
    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "a")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert git_revision(tmp_path) == head
    (tmp_path / "new.txt").write_text("untracked output\n")  # untracked files (runs/, caches) do not count
    assert git_revision(tmp_path) == head
    (tmp_path / "a.py").write_text("x = 2\n")
    assert git_revision(tmp_path) == head + "+dirty"
    assert short_revision(head + "+dirty") == head[:12] + "+dirty" and short_revision(None) == "None"


def test_the_leaderboard_reports_how_far_the_machine_drifted():
    """Live episodes under ``backend.drift: probe`` carry their correction factors; the leaderboard's range is
    over every episode (the slowest and fastest moment of the run), and absent where nothing probed."""
    from helios_rl.bench.leaderboard import drift_range, markdown

    eps = [{"calibrated_probe_s": 0.15, "probes": 9, "factor_mean": 0.98, "factor_min": 0.95, "factor_max": 1.01},
           {"calibrated_probe_s": 0.15, "probes": 8, "factor_mean": 0.55, "factor_min": 0.52, "factor_max": 0.97},
           {"calibrated_probe_s": 0.15, "probes": 7, "factor_mean": 1.02, "factor_min": 1.0, "factor_max": 1.04}]
    d = drift_range(eps)
    assert (d["factor_min"], d["factor_max"], d["factor_median"], d["episodes"]) == (0.52, 1.04, 0.98, 3)
    assert drift_range([]) is None

    def md(drift: dict) -> str:
        return markdown({"suite": "s", "run": "r", "git": None, "date": "d",
                         "config": {"train_seeds": 1, "test_seeds": 1, "repeat": 1},
                         "scenarios": {"x/live": {"stats": {"best_baseline": "static", "ranking": ["static"],
                                                            "methods": {"static": {"runs": 1, "iqm": 1.0,
                                                                                   "iqm_ci": [1, 1]}}},
                                                  "repro": {}, "drift": drift}}})

    assert "factors 0.52-1.04, median episode 0.98 over 3 episodes." in md(d) and "prefill" not in md(d)
    # with the prefill probe: its factors, which priced the steps' prefill passes, beside the decode probe's
    pre = [{**e, "calibrated_prefill_probe_s": 0.4, "prefill_factor_mean": f, "prefill_factor_min": f - 0.01,
            "prefill_factor_max": f + 0.01} for e, f in zip(eps, (0.9, 0.7, 1.1))]
    d = drift_range(pre)
    assert (d["prefill_factor_min"], d["prefill_factor_max"], d["prefill_factor_median"]) == pytest.approx((0.69, 1.11, 0.9))
    assert "prefill passes by the prefill probe (400 ms): 0.69-1.11, median 0.90." in md(d)
    assert "probed every" not in md(d)
    # the probe's cadence and window, recorded by each episode, printed with the range; mixed settings refused
    probed = [{**e, "interval_s": 1.25, "window": 3, "prefill_every": 4} for e in pre]
    assert "probed every 1.25 s, median of the last 3, the prefill probe every 4th time)" in md(drift_range(probed))
    with pytest.raises(ValueError, match="different settings"):
        drift_range(probed[:2] + [{**probed[2], "interval_s": 5.0, "window": 5}])
    with pytest.raises(ValueError, match="different settings"):
        drift_range(probed[:2] + [{**probed[2], "prefill_every": 2}])


def test_best_static_search_covers_every_config_an_agent_can_hold(tiny_scenario, tiny_profile):
    """The search's candidates include every action of the flat action space (so no fixed-action policy can beat
    best-static with a cap the search skipped), and racing keeps the best of the first seed among its finalists:
    with every point a finalist it is the brute-force best mean."""
    from helios_rl.agents.compare import run_episode
    from helios_rl.bench.trials import search_static, static_grid
    from helios_rl.controllers import ControllerContext
    from helios_rl.controllers.params import StaticParams
    from helios_rl.controllers.static import StaticController
    from helios_rl.env import HeliosServingEnv
    from helios_rl.evaluation.profiling import ensure_repository
    from helios_rl.evaluation.runtime import ModelLoader, Timer
    from helios_rl.scenario import Scenario

    flat = HeliosServingEnv(str(tiny_scenario), backend="sim", action_mode="flat", profile=str(tiny_profile))
    grid = static_grid(flat, flat.backend.admissible)
    assert {tuple(t) for t in flat.tuples} <= set(grid)
    assert any(b == 1 for _, _, b, _ in grid)  # the smallest cap an agent can choose is searched
    sc = Scenario.from_yaml(tiny_scenario)
    ctx = ControllerContext.for_scenario(sc, ensure_repository(sc, ModelLoader("cpu", None, sc.exits.heads),
                                                               Timer(sc.backend.timing)))
    points = [StaticParams(model=m, depth=d, max_batch=b, setting=t) for m, d, b, t in grid[::3]]
    seeds = [500_000, 500_001]
    mean = [sum(run_episode(flat, StaticController(ctx, p), s)["goodput_tps"] for s in seeds) / 2 for p in points]
    best, table = search_static(flat, ctx, points, seeds, finalists=len(points))
    assert abs(best["goodput_tps"] - max(mean)) < 1e-9 and len(table) == len(points)
    best2, table2 = search_static(flat, ctx, points, seeds, finalists=2)
    assert sum("goodput_tps" in r for r in table2) == 2
    top = max(range(len(points)), key=lambda i: table2[i]["screen_goodput_tps"])
    assert "goodput_tps" in table2[top] and best2["goodput_tps"] >= table2[top]["goodput_tps"] - 1e-9
    flat.close()
