"""Accuracy measured on what was served, one contract on both backends, and probes for reward hacking."""

from __future__ import annotations

import pytest

import helios_rl.env  # noqa: F401
from helios_rl.engine.config import ServingConfig
from helios_rl.env.env import HeliosServingEnv
from helios_rl.evaluation.replay import format_prompt


def run_policy(env, choose, seed: int = 0, steps: int = 400):
    """Run one episode with ``choose(env, t) -> ServingConfig | None``; returns (total reward, goodput
    tokens, infos)."""
    env.reset(seed=seed)
    total, good, infos = 0.0, 0, []
    for t in range(steps):
        _, r, term, trunc, info = env.step_config(choose(env, t))
        total += r
        good += info["goodput_tokens"]
        infos.append(info)
        if term or trunc:
            break
    return total, good, infos


def _depths(env, m):
    return env.depth_values[m] if isinstance(env.depth_values, dict) else env.depth_values


def shallowest(env, t):
    """The shallowest depth the action space offers, at the scenario's default exit setting."""
    m = env._cfg["model"]
    return ServingConfig(model=m, depth=min(_depths(env, m)))


def loosest(env, t):
    """Full depth at the exit setting that lets the most tokens out (lowest target / threshold)."""
    m = env._cfg["model"]
    return ServingConfig(model=m, depth=env.L[m], **env.scenario.exits.knob(min(env.thresholds)))


def full(env, t):
    """Full depth at the strictest exit setting."""
    m = env._cfg["model"]
    return ServingConfig(model=m, depth=env.L[m], **env.scenario.exits.knob(max(env.thresholds)))


@pytest.mark.parametrize("hack", [shallowest, loosest], ids=["shallowest-depth", "loosest-exits"])
@pytest.mark.parametrize("backend", ["live", "sim"])
def test_cheap_configs_earn_less_reward_and_goodput_than_full_depth(probe_scenario, probe_profile, backend, hack):
    env = HeliosServingEnv(str(probe_scenario), backend=backend, profile=str(probe_profile))
    r_shallow, g_shallow, infos = run_policy(env, hack)
    r_full, g_full, full_infos = run_policy(env, full)
    env.close()
    assert g_full > 0 and g_shallow < g_full
    assert r_shallow < r_full
    scored = [i for i in infos if i["agreement"] is not None]
    assert scored and all(i["agreement_source"] == ("measured" if backend == "live" else "predicted") for i in scored)
    # the accuracy term is never zero when the served config's agreement is below the floor
    below = [i for i in scored if i["agreement"] < 0.9]
    assert below and all(i["reward_terms"]["agreement"] < 0 for i in below)
    if backend == "live":  # full depth, no exits: the measured free-running agreement is exactly 1
        assert all(i["agreement"] == 1.0 for i in full_infos if i["agreement"] is not None)


@pytest.mark.parametrize("backend", ["live", "sim"])
def test_switching_every_interval_pays_the_measured_switch_cost(probe_scenario, probe_profile, backend):
    env = HeliosServingEnv(str(probe_scenario), backend=backend, profile=str(probe_profile))
    models = list(env.models)

    def flip(env, t):
        other = models[(models.index(env._cfg["model"]) + 1) % len(models)]
        return ServingConfig(model=other)

    _, _, infos = run_policy(env, flip, steps=6)
    env.close()
    switched = [i for i in infos if i["rejected"] is None]
    assert len(switched) >= 3
    w = env.weights["switch"]
    for i in switched:
        assert i["switch_cost_s"] > 0
        assert i["reward_terms"]["switch"] == pytest.approx(-w * i["switch_cost_s"] / env.interval_s)


def test_live_scores_served_tokens_against_the_full_models_own_continuation(probe_scenario):
    """The scorer's free-running agreement equals an independent count against the full model's greedy output."""
    from helios_rl.engine import Engine, EngineSettings, SamplingParams
    from helios_rl.evaluation.runtime import ModelLoader

    env = HeliosServingEnv(str(probe_scenario), backend="live", timing="cpu")
    env.reset(seed=1)
    m = env._cfg["model"]
    infos = _episode(env, ServingConfig(model=m, depth=2), seed=1)
    scores = list(env.backend.scores)
    segs_ok = all(s.tokens > 0 for s in scores)
    cost = env.backend.scorer.cost()
    env.close()
    assert scores and segs_ok and cost["cpu_s"] > 0 and cost["cpu_s_per_token"] > 0
    measured = sum(s.match for s in scores) / sum(s.tokens for s in scores)
    per_interval = [i for i in infos if i["agreement"] is not None]
    tok = sum(i["scored"]["tokens"] for i in per_interval)
    assert tok == sum(s.tokens for s in scores)
    assert sum(i["agreement"] * i["scored"]["tokens"] for i in per_interval) / tok == pytest.approx(measured)
    # independently: the full model's own continuation of one served prompt, compared position by position
    spec = env.backend.specs[scores[0].request_id]
    lm = ModelLoader("cpu", None, "shared")(m, None)

    eng = Engine(lm, EngineSettings(max_batch=1, max_model_len=128))
    (ref,) = eng.generate([format_prompt(spec)], SamplingParams(max_new_tokens=spec.max_new_tokens, ignore_eos=True))
    assert scores[0].tokens == len(ref.output_ids)
    assert 0 <= scores[0].match <= scores[0].tokens


def test_a_finished_request_without_an_accuracy_value_is_an_error(probe_scenario, probe_profile, monkeypatch):
    env = HeliosServingEnv(str(probe_scenario), backend="live", profile=str(probe_profile))
    env.reset(seed=0)
    monkeypatch.setattr(env.backend, "_score", lambda finished: {})
    monkeypatch.setattr(env.backend, "scorer", env.backend.scorer)
    from helios_rl.env import live

    monkeypatch.setattr(live.ScoreTotals, "agreement", property(lambda self: None))
    with pytest.raises(RuntimeError, match="without an accuracy value"):
        for _ in range(400):
            env.step_config(None)
    env.close()


def test_live_backend_refuses_to_run_without_scoring_or_a_profile(probe_scenario):
    from helios_rl.env.live import LiveBackend
    from helios_rl.env.workload import EpisodeWorkload
    from helios_rl.scenario import Scenario

    sc = Scenario.from_yaml(probe_scenario)
    with pytest.raises(ValueError, match="needs to score what it serves"):
        LiveBackend(sc, EpisodeWorkload(sc), score=False)


def _episode(env, cfg, seed: int = 1) -> list[dict]:
    env.reset(seed=seed)
    infos = []
    for _ in range(400):
        _, _, term, trunc, info = env.step_config(cfg)
        infos.append(info)
        if term or trunc:
            break
    return infos


def test_agreement_only_scoring_serves_the_same_signals_and_leaves_the_secondary_figures_unmeasured(probe_scenario,
                                                                                                    probe_profile):
    """score="agreement" (compare, benchmark): the same per-interval agreement and goodput as the full scorer, the
    teacher-forced agreement and reference perplexity None (not a default), and the figures measured named."""
    runs = {}
    for score in ("all", "agreement"):
        env = HeliosServingEnv(str(probe_scenario), backend="live", profile=str(probe_profile), score=score)
        cfg = ServingConfig(model=env.models[0], depth=2)
        runs[score] = _episode(env, cfg)
        env.close()
    full, lean = ([i for i in runs[k] if i["agreement"] is not None] for k in ("all", "agreement"))
    assert full and [i["agreement"] for i in full] == [i["agreement"] for i in lean]
    assert [i["goodput_tokens"] for i in runs["all"]] == [i["goodput_tokens"] for i in runs["agreement"]]
    assert all(i["scored"]["teacher_forced_agreement"] is not None and i["scored"]["reference_ppl"] is not None
               and i["scored"]["measured"] == ["agreement", "teacher_forced_agreement", "reference_ppl"] for i in full)
    assert all(i["scored"]["teacher_forced_agreement"] is None and i["scored"]["reference_ppl"] is None
               and i["scored"]["measured"] == ["agreement"] for i in lean)
    with pytest.raises(ValueError, match="score must be one of"):
        HeliosServingEnv(str(probe_scenario), backend="live", profile=str(probe_profile), score="some")


def test_references_of_an_episode_are_computed_at_once_and_equal_each_prompts_own_greedy_continuation(
        probe_scenario, probe_profile):
    """The scorer expects the episode's requests: the first finished request makes it compute every request's
    reference continuation in one batched pass; each equals that prompt's own full-depth greedy continuation
    (float64 tiny models: batching changes nothing), and a shorter segment reads its prefix."""
    from helios_rl.engine import Engine, EngineSettings, SamplingParams
    from helios_rl.evaluation.runtime import ModelLoader

    env = HeliosServingEnv(str(probe_scenario), backend="live", profile=str(probe_profile), score="agreement")
    m = env.models[0]
    infos = _episode(env, ServingConfig(model=m, depth=2), seed=3)
    first = next(k for k, i in enumerate(infos) if i["agreement"] is not None)
    acc, specs = env.backend.scorer.acc, list(env.backend.pending)
    refs = dict(acc.refs)
    env.close()
    assert len(specs) >= 4 and len(refs) == len({format_prompt(s) for s in specs}), "one per prompt, computed once"
    assert sum(i["scored"]["requests"] for i in infos[: first + 1]) < len(specs), "computed before most finished"
    lm = ModelLoader("cpu", None, "shared")(m, None)
    for spec in specs[:4]:
        eng = Engine(lm, EngineSettings(max_batch=1, max_model_len=256))
        (own,) = eng.generate([format_prompt(spec)], SamplingParams(max_new_tokens=spec.max_new_tokens,
                                                                   ignore_eos=True))
        ctx = lm.tokenizer(format_prompt(spec), add_special_tokens=True)["input_ids"]
        assert acc.reference(m, ctx, spec.max_new_tokens) == list(own.output_ids)
        assert acc.reference(m, ctx, 2) == list(own.output_ids)[:2]


def test_sim_draws_agreement_per_task_so_a_task_mix_shift_changes_the_prediction(probe_profile, probe_scenario):
    from helios_rl.env.profile import SimProfile

    prof = SimProfile.load(probe_profile)
    ms = next(iter(prof.models.values()))
    point = next(v for k, v in ms.exits.items() if k.startswith("2:"))
    assert set(point["by_task"]) == {"chat", "completion"}
    assert point["tokens"] >= 200 and all(len(t["request_agreements"]) >= 1 for t in point["by_task"].values())
    a = {t: ms.exit_stats(2, 0.06, t)[2] for t in point["by_task"]}
    assert a["chat"] != a["completion"], "the tasks' measured agreements differ on these prompts"
    lo, hi = point["agreement_ci"]
    assert lo <= point["agreement"] <= hi
    # each request's token-by-token matches are recorded, agree with its agreement, and cover the longest
    # request the workload draws (the simulator scores a request of k tokens on the first k)
    from helios_rl.scenario import Scenario

    longest = Scenario.from_yaml(probe_scenario).workload.new_tokens_range()[1]
    for t in point["by_task"].values():
        assert len(t["request_matches"]) == len(t["request_agreements"])
        for bits, a in zip(t["request_matches"], t["request_agreements"]):
            assert set(bits) <= {"0", "1"} and len(bits) >= longest
            assert bits.count("1") / len(bits) == pytest.approx(a, abs=1e-4)


def test_a_reference_perplexity_floor_binds_goodput_on_both_backends(probe_scenario, tmp_path):
    from helios_rl.env.calibrate import calibrate
    from helios_rl.scenario import Scenario

    strict = tmp_path / "strict.yaml"  # no served text is that unsurprising to the reference model
    strict.write_text(probe_scenario.read_text().replace("agreement_floor: 0.9,", "agreement_floor: 0.0, "
                                                                                  "max_reference_ppl: 1.001,"))
    prof = tmp_path / "strict.json"
    calibrate(Scenario.from_yaml(strict), thresholds=(0.95,), batches=(1,), prompts=2, new_tokens=4,
              min_tokens=60).save(prof)
    point = next(iter(next(iter(__import__("helios_rl.env.profile", fromlist=["SimProfile"]).SimProfile.load(prof)
                                .models.values())).exits.values()))
    assert point["request_ppl"] and min(point["request_ppl"]) > 1.001
    for backend in ("live", "sim"):
        env = HeliosServingEnv(str(strict), backend=backend, profile=str(prof))
        _, good, infos = run_policy(env, full)
        env.close()
        assert good == 0 and sum(i["slo_met"] for i in infos) > 0, backend  # on time, but not good enough


def test_fidelity_compares_the_goodput_both_backends_score_on_one_config_sequence(probe_scenario, probe_profile):
    """`helios-rl fidelity` replays the live configs on the simulator and compares what a leaderboard
    scores (goodput: the quality floor binds in this scenario), not only throughput and latency."""
    from helios_rl.env.fidelity import fidelity, rel_err
    from helios_rl.scenario import Scenario

    rep = fidelity(Scenario.from_yaml(probe_scenario), str(probe_profile), ("static",), seed=500000)
    c = rep["controllers"]["static"]
    assert set(rep["mean_rel_err"]) == {"throughput", "ttft_p95", "tpot_p95", "goodput"}
    for side in ("live", "sim"):
        s = c[side]
        assert 0 <= s["goodput_tokens"] <= s["output_tokens"]
        assert s["goodput_tps"] == pytest.approx(s["goodput_tokens"] / s["slo_window_s"])
    assert c["live"]["slo_window_s"] == c["sim"]["slo_window_s"] > 0  # fixed by the workload, not by the backend
    assert c["rel_err"]["goodput"] == pytest.approx(rel_err(c["sim"]["goodput_tps"], c["live"]["goodput_tps"]))
    assert c["live"]["goodput_tokens"] < c["live"]["output_tokens"], "the floor fails some served requests"


def test_live_backend_refuses_an_slo_still_relative_to_the_machine(probe_scenario, tmp_path):
    from helios_rl.env.live import LiveBackend
    from helios_rl.env.workload import EpisodeWorkload
    from helios_rl.scenario import Scenario

    text = probe_scenario.read_text().replace("ttft_s: 100.0, tpot_s: 100.0",
                                              "ttft_s: {x_step: 40, batch: 4}, tpot_s: {x_step: 3, batch: 4}")
    path = tmp_path / "relative.yaml"
    path.write_text(text)
    sc = Scenario.from_yaml(path)
    assert sc.slo.relative
    with pytest.raises(ValueError, match="not resolved"):
        LiveBackend(sc, EpisodeWorkload(sc))
