"""The Gymnasium environment on tiny models: both backends, masks, seeding, recording, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import gymnasium
import numpy as np
import pytest

import helios_rl.env  # noqa: F401  (registers the environments)
from helios_rl.env.env import HeliosServingEnv
from helios_rl.env.profile import ProfileError
from helios_rl.scenario import ScenarioError



def test_check_env_passes_on_sim_and_live(tiny_scenario, tiny_profile):
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check

    for kind in ("sim", "live"):
        env = HeliosServingEnv(str(tiny_scenario), backend=kind, profile=str(tiny_profile), horizon=4)
        check_env(env, skip_render_check=True)
        sb3_check(env, warn=False)
        env.close()
    flat = HeliosServingEnv(str(tiny_scenario), backend="sim", profile=str(tiny_profile), action_mode="flat")
    check_env(flat, skip_render_check=True)
    assert isinstance(flat.action_space, gymnasium.spaces.Discrete) and flat.action_space.n == len(flat.tuples) + 1


def test_gymnasium_make_registered_ids(tiny_scenario, tiny_profile):
    env = gymnasium.make("helios_rl/Serving-Sim-v0", scenario=str(tiny_scenario), profile=str(tiny_profile))
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    env.close()


def test_ten_thousand_random_masked_actions_on_the_sim(tiny_scenario, tiny_profile):
    env = HeliosServingEnv(str(tiny_scenario), backend="sim", profile=str(tiny_profile), horizon=200)
    rng = np.random.default_rng(0)
    obs, _ = env.reset(seed=0)
    for _ in range(10_000):
        mask = env.action_masks()
        action, start = [], 0
        for n in env.dims:
            allowed = np.flatnonzero(mask[start:start + n])
            action.append(int(rng.choice(allowed)))
            start += n
        obs, r, term, trunc, info = env.step(np.array(action))
        assert env.observation_space.contains(obs) and math.isfinite(r)
        assert all(math.isfinite(v) for v in info["reward_terms"].values())
        assert not term
        if trunc:
            obs, _ = env.reset()


def test_seeded_resets_give_identical_sim_episodes(tiny_scenario, tiny_profile, tmp_path):
    def episode(seed):
        env = HeliosServingEnv(str(tiny_scenario), backend="sim", profile=str(tiny_profile), record=str(tmp_path / str(seed)))
        env.action_space.seed(seed)
        obs, _ = env.reset(seed=seed)
        out = [obs]
        for _ in range(60):
            obs, r, term, trunc, _ = env.step(env.action_space.sample())
            out += [obs, r]
            if term or trunc:
                break
        env.close()
        return out

    a, b = episode(3), episode(3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)
    from helios_rl.env.recording import replay_episode

    rec = sorted((tmp_path / "3").glob("episode-*.jsonl"))
    assert rec and replay_episode(rec[0])["match"]


def test_live_episode_on_tiny_models_runs_to_the_end_of_the_trace(tiny_scenario):
    env = HeliosServingEnv(str(tiny_scenario), backend="live")
    obs, _ = env.reset(seed=0)
    total, steps = 0, 0
    while True:
        mask = env.action_masks()
        obs, r, term, trunc, info = env.step(np.zeros(4, dtype=np.int64) if steps % 3 else
                                             np.array([2, 0, 0, 1]) if mask[2] else np.zeros(4, dtype=np.int64))
        total += info["telemetry"]["output_tokens"]
        steps += 1
        assert env.observation_space.contains(obs) and not term
        if trunc:
            break
    summ = info["episode_summary"]
    assert summ["served"] == 24 and summ["output_tokens"] == total > 0
    assert set(info["reward_terms"]) >= {"objective", "breach", "agreement", "slo", "switch"}
    model = env.backend.engine.model
    env.close()
    assert env.backend.engine is None and model.resident_bytes() == 0


def test_live_batch_caps_do_not_depend_on_which_model_is_loaded(tiny_scenario, monkeypatch):
    """The batch cap a controller gets for (model, depth) is the engine's rule, counting the exit heads'
    bytes, before and after that model is loaded: checkpoint headers alone do not know the heads, and a cap
    read from them made the same controller serve the same seed with another batch after a switch."""
    from helios_rl.models.heads import ExitHeads

    monkeypatch.setattr(ExitHeads, "nbytes", lambda self: 1_500_000)  # heads that matter in a 3 MiB budget
    env = HeliosServingEnv(str(tiny_scenario), backend="live")
    b = env.backend
    before = {m: [b.admissible(m, d) for d in range(1, env.L[m] + 1)] for m in env.models}
    headers_only = {m: [b.facts[m].admissible_batch(d, b.mem) for d in range(1, env.L[m] + 1)] for m in env.models}
    assert before != headers_only  # the heads' bytes change the cap here
    for m in env.models:
        env.reset(seed=0, options={"config": {"model": m, "depth": env.L[m], "batch": 1}})
        assert b.engine.model.name == m
        assert [int(b.engine.admissible_batch(d)) for d in range(1, env.L[m] + 1)] == before[m]
        assert {k: [b.admissible(k, d) for d in range(1, env.L[k] + 1)] for k in env.models} == before
    env.close()


def test_bad_inputs_give_clear_errors(tiny_scenario, tiny_profile, tmp_path):
    env = HeliosServingEnv(str(tiny_scenario), backend="sim", profile=str(tiny_profile))
    env.reset(seed=0)
    with pytest.raises(ValueError, match="outside the action space"):
        env.step(np.array([99, 0, 0, 0]))
    bad = tmp_path / "bad.yaml"
    bad.write_text(tiny_scenario.read_text().replace("seed: 0\n", "seed: 0\nbogus_key: 1\n"))
    with pytest.raises(ScenarioError, match="bogus_key"):
        HeliosServingEnv(str(bad), backend="sim", profile=str(tiny_profile))
    data = json.loads(tiny_profile.read_text())
    data["engine_version"] = "0.0.0+deadbeef"
    other = tmp_path / "old.json"
    other.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match="engine version"):
        HeliosServingEnv(str(tiny_scenario), backend="sim", profile=str(other))
    data = json.loads(tiny_profile.read_text())
    first = next(iter(data["models"]))
    data["models"][first]["config_hash"] = "0" * 16
    other.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match="config hash"):
        HeliosServingEnv(str(tiny_scenario), backend="sim", profile=str(other))
    data = json.loads(tiny_profile.read_text())  # KV slots of another length admit other batches
    data["settings"]["max_model_len"] = data["settings"]["max_model_len"] * 2
    other.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match="engine.max_model_len 96; the scenario has 48"):
        HeliosServingEnv(str(tiny_scenario), backend="live", profile=str(other))
    data = json.loads(tiny_profile.read_text())  # step times measured under other CPU kernels
    assert data["meta"]["linear_plan"], "a CPU calibration records its linear plan"
    data["meta"]["linear_plan"]["rows"]["narrow"]["transposed"] = [97, 98, 99]  # re-measured: a record, not checked
    other.write_text(json.dumps(data))
    HeliosServingEnv(str(tiny_scenario), backend="sim", profile=str(other)).close()
    data["meta"]["linear_plan"]["mode"] = "no-onednn"
    other.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match="HELIOS_RL_LINEAR_PLAN=no-onednn on machine"):
        HeliosServingEnv(str(tiny_scenario), backend="sim", profile=str(other))
    data["meta"]["linear_plan"]["mode"] = "auto"
    data["meta"]["linear_plan"]["machine"] = "another-cpu"
    other.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match="machine another-cpu"):
        HeliosServingEnv(str(tiny_scenario), backend="sim", profile=str(other))


def test_sim_without_a_profile_calibrates_once_and_reuses_the_cached_one(tiny_scenario, tmp_path, monkeypatch):
    from helios_rl.env.profile import default_profile_path

    monkeypatch.setenv("HELIOS_RL_CACHE", str(tmp_path))
    env = HeliosServingEnv(str(tiny_scenario), backend="sim")
    path = default_profile_path(env.scenario)
    assert path.exists() and str(tmp_path) in str(path) and env.kwargs["profile"] == str(path)
    stamp = path.stat().st_mtime_ns
    env2 = HeliosServingEnv(str(tiny_scenario), backend="sim")
    assert path.stat().st_mtime_ns == stamp  # reused, not recalibrated
    obs, _ = env2.reset(seed=1)
    assert env2.observation_space.contains(obs)


def test_profile_cache_key_ignores_the_slo_but_not_the_engine(tiny_scenario, tmp_path):
    """Re-choosing a scenario's SLO (say on development seeds) keeps its calibration; anything that the
    calibration measures (engine settings, models, workload) is another profile."""
    import yaml

    from helios_rl.env.profile import default_profile_path
    from helios_rl.scenario import Scenario

    data = yaml.safe_load(tiny_scenario.read_text())
    base = default_profile_path(Scenario.from_yaml(tiny_scenario))

    def variant(name: str, **change) -> Path:
        path = tmp_path / name / tiny_scenario.name
        path.parent.mkdir()
        d = {**data, **change}
        path.write_text("# another comment\n" + yaml.safe_dump(d))
        return default_profile_path(Scenario.from_yaml(path))

    assert variant("slo", slo={**data.get("slo", {}), "tpot_s": 9.0, "ttft_s": 30.0}) == base
    # a perplexity floor makes the calibration score served text against the reference model: another profile
    ppl = variant("ppl", slo={**data.get("slo", {}), "max_reference_ppl": 50.0})
    assert ppl != base
    # ... but not the floor's value: every request's perplexity is recorded, whatever the floor
    assert variant("ppl2", slo={**data.get("slo", {}), "max_reference_ppl": 12.5}) == ppl
    assert variant("ref", slo={**data.get("slo", {}), "max_reference_ppl": 50.0, "reference_model": "other"}) != ppl
    assert variant("engine", engine={**data["engine"], "max_batch": data["engine"]["max_batch"] + 1}) != base
    assert variant("calls", seed=data.get("seed", 0) + 1) != base


@pytest.mark.parametrize("source", ["engine/engine.py", "env/calibrate.py", "env/profile.py", "models/kernels.py"])
def test_a_profile_belongs_to_the_engine_calibration_and_step_features_that_made_it(source, monkeypatch):
    """A profile's coefficients mean what the step-time features meant when it was fitted: changing how steps
    run, how they are measured or which features price them makes every cached profile another version."""
    import helios_rl
    from helios_rl.env.backend import engine_version

    before = engine_version()
    target = Path(helios_rl.__file__).resolve().parent / source
    read = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: read(self) + (b"# changed" if self == target else b""))
    assert engine_version() != before


def test_masks_forbid_batches_the_budget_cannot_hold(tiny_scenario, tiny_profile):
    env = HeliosServingEnv(str(tiny_scenario), backend="sim", profile=str(tiny_profile))
    env.reset(seed=0)
    mask = env.action_masks()
    assert mask.shape == (sum(env.dims),) and mask.dtype == bool
    m, d = env._cfg["model"], env._cfg["depth"]
    start = env.dims[0] + env.dims[1]
    for j, b in enumerate(env.batch_values):
        assert mask[start + 1 + j] == (b <= env.backend.admissible(m, d))


def test_calibrate_cli_writes_the_profile_train_and_compare_use(tiny_scenario, tmp_path, monkeypatch, capsys):
    """`helios-rl calibrate SCENARIO` with no options calibrates exactly as the environment would (same
    settings, same cache path), so a later sim environment reuses it; bad options name themselves."""
    from helios_rl.cli import main
    from helios_rl.env.profile import SimProfile, default_profile_path

    monkeypatch.setenv("HELIOS_RL_CACHE", str(tmp_path))
    assert main(["calibrate", str(tiny_scenario), "--new-tokens", "1"]) == 2
    assert "--new-tokens must be >= 2" in capsys.readouterr().err
    assert main(["calibrate", str(tiny_scenario)]) == 0
    env = HeliosServingEnv(str(tiny_scenario), backend="sim")
    path = default_profile_path(env.scenario)
    out = capsys.readouterr()
    assert f"wrote {path}" in out.out
    stamp = path.stat().st_mtime_ns
    HeliosServingEnv(str(tiny_scenario), backend="sim")
    assert path.stat().st_mtime_ns == stamp  # the CLI's profile is the environment's: not recalibrated
    prof = SimProfile.load(path)
    smallest = min(v["tokens"] for m in prof.models.values() for v in m.exits.values())
    # the tiny scenario's workload cannot fill 1,000 tokens per point: the CLI says so instead of passing it off
    assert prof.meta["min_tokens_per_point"] == 1000
    assert (smallest < 1000) == (f"rests on {smallest} served tokens, below --min-tokens 1000" in out.err)


def test_calibration_measures_the_deepest_load_a_binding_budget_allows(tiny_scenario, tiny_profile):
    """A budget that admits a depth between the calibration's depth buckets (here 4 of tiny-a's 6 layers,
    buckets 2/3/5/6) calibrates that depth too, so the simulator has a measured point where a memory-bound
    scenario lives; a budget that holds a model at no depth is an error naming the model, not an IndexError."""
    from dataclasses import replace

    from helios_rl.env.calibrate import calibrate, depth_grid
    from helios_rl.env.profile import SimProfile
    from helios_rl.scenario import Scenario

    sc = Scenario.from_yaml(tiny_scenario)
    sizes = SimProfile.load(tiny_profile).models[sc.models[0]]
    assert sizes.num_layers == 6 and 4 not in depth_grid(6, 4)
    from helios_rl.engine.engine import prefill_bytes
    from helios_rl.evaluation.runtime import ModelLoader

    model = ModelLoader(sc.engine.device, sc.engine.dtype, sc.exits.heads)(sc.models[0], 1)
    activations = prefill_bytes(sc.engine.settings(sc.exits.measure, sc.exits.default_threshold), model)
    budget = sizes.weight_bytes[3] + activations + sizes.slot_bytes[3]  # 4 layers and one slot; 5 layers do not fit
    assert budget < sizes.weight_bytes[4] + activations
    prof = calibrate(replace(sc, engine=replace(sc.engine, memory_budget_bytes=budget)), thresholds=(0.06,),
                     batches=(1,), prompts=2, new_tokens=4, min_tokens=8)
    a = prof.models[sc.models[0]]
    assert a.admissible[3] >= 1 and a.admissible[4] == 0
    depths = sorted({int(k.split(":")[0]) for k in a.exits})
    assert depths == [2, 3, 4]
    with pytest.raises(ValueError, match=f"cannot hold {sc.models[0]} at any depth.*drop it from models"):
        calibrate(replace(sc, engine=replace(sc.engine, memory_budget_bytes=sizes.weight_bytes[0] // 2)),
                  thresholds=(0.06,), batches=(1,), prompts=2, new_tokens=4, min_tokens=8)


# ----------------------------------------------------------------------------- machine drift (backend.drift: probe)
@pytest.fixture(scope="module")
def drift_setup(tiny_scenario, tmp_path_factory):
    """The tiny scenario timed in CPU seconds with the speed probe on, and its calibrated profile."""
    from helios_rl.env.calibrate import calibrate
    from helios_rl.scenario import Scenario

    text = tiny_scenario.read_text()
    old = "backend: {timing: modeled, interval_s: 0.01}"
    assert old in text
    root = tmp_path_factory.mktemp("drift")
    path = root / "drift.yaml"
    path.write_text(text.replace(old, "backend: {timing: cpu, interval_s: 0.01, drift: probe, drift_interval_s: 0.001}"))
    prof = calibrate(Scenario.from_yaml(path), thresholds=(0.06,), batches=(1, 4), prompts=2, new_tokens=4,
                     min_tokens=20)
    prof.save(root / "profile.json")
    return path, root / "profile.json"


def test_calibration_records_the_speed_probe(drift_setup):
    from helios_rl.env.profile import SimProfile
    from helios_rl.scenario import Scenario, step_reference_model

    path, prof = drift_setup
    sp = SimProfile.load(prof).meta["speed_probe"]
    assert sp["model"] == step_reference_model(Scenario.from_yaml(path)) and sp["batch"] == 8
    assert len(sp["samples"]) == 2 + len(Scenario.from_yaml(path).models)  # start, after each model, end
    assert sp["s"] == pytest.approx(float(np.median(sp["samples"])), abs=1e-5) and sp["s"] > 0  # samples: 5 decimals
    # the prefill probe, sampled beside it: one request of (at most) PREFILL_TOKENS prompt tokens
    assert len(sp["prefill_samples"]) == len(sp["samples"]) and 0 < sp["prefill_tokens"] <= 96
    assert sp["prefill_s"] == pytest.approx(float(np.median(sp["prefill_samples"])), abs=1e-5) and sp["prefill_s"] > 0


@pytest.fixture(scope="module")
def relative_setup(drift_setup):
    """The drift scenario with SLOs relative to the machine at batches 2 and 4, and its calibrated profile."""
    from helios_rl.env.calibrate import calibrate
    from helios_rl.scenario import Scenario

    path, _ = drift_setup
    text = path.read_text()
    old = "slo: {ttft_s: 0.05, tpot_s: 0.01, objective: throughput}"
    assert old in text
    rel = path.parent / "relative.yaml"
    rel.write_text(text.replace(old, "slo: {ttft_s: {x_step: 50, batch: 4}, tpot_s: {x_step: 3, batch: 2}, "
                                     "objective: throughput}"))
    prof = calibrate(Scenario.from_yaml(rel), thresholds=(0.06,), batches=(1, 4), prompts=2, new_tokens=4,
                     min_tokens=20)
    prof.save(path.parent / "relative-profile.json")
    return rel, path.parent / "relative-profile.json"


def test_calibration_measures_the_reference_step_at_every_batch_the_slo_names(relative_setup):
    from helios_rl.env.profile import SimProfile
    from helios_rl.scenario import Scenario, step_reference_model

    path, prof = relative_setup
    meta = SimProfile.load(prof).meta
    ref, sc = meta["reference_steps"], Scenario.from_yaml(path)
    assert ref["model"] == step_reference_model(sc) and sorted(ref["s"]) == ["2", "4", "8"]  # 8: the speed probe
    for b, v in ref["samples"].items():
        assert len(v) == 2 + len(sc.models) and ref["s"][b] > 0 and ref["s"][b] == pytest.approx(float(np.median(v)), abs=1e-5)
    assert ref["s"]["8"] == pytest.approx(meta["speed_probe"]["s"])


def test_relative_slos_resolve_from_the_measured_reference_step_not_the_fit(relative_setup, tmp_path):
    from helios_rl.env.profile import SimProfile
    from helios_rl.scenario import step_reference_model

    path, prof = relative_setup
    p = SimProfile.load(prof)
    p.meta["reference_steps"]["s"].update({"2": 0.125, "4": 0.5})  # what calibration measured (say)
    p.save(tmp_path / "p.json")
    model = p.meta["reference_steps"]["model"]
    assert p.models[model].step_time(2) != pytest.approx(0.125)  # the fit would answer otherwise
    env = HeliosServingEnv(str(path), backend="sim", profile=str(tmp_path / "p.json"))
    assert env.scenario.slo.tpot_s == pytest.approx(3 * 0.125) and env.scenario.slo.ttft_s == pytest.approx(50 * 0.5)
    assert env.slo_reference == {"model": model, "source": "measured", "step_s": {"2": 0.125, "4": 0.5}}
    assert model == step_reference_model(env.scenario)
    env.close()
    # a batch calibration did not measure is an error naming it, not a fitted stand-in
    del p.meta["reference_steps"]["s"]["4"]
    p.save(tmp_path / "q.json")
    with pytest.raises(ProfileError, match=f"no measured full-depth step of {model} at batch 4.*measured: \\[2, 8\\]"):
        HeliosServingEnv(str(path), backend="sim", profile=str(tmp_path / "q.json"))
    from helios_rl.scenario import Scenario

    with pytest.raises(ProfileError, match="batch 4.*re-calibrate"):
        SimProfile.load(tmp_path / "q.json").check(Scenario.from_yaml(path), "q.json")


def test_a_modeled_profile_resolves_relative_slos_from_its_fit_and_says_so(tiny_scenario, tiny_profile, tmp_path):
    from helios_rl.env.profile import SimProfile, resolve_scenario
    from helios_rl.scenario import Scenario, step_reference_model

    text = tiny_scenario.read_text()
    old = "slo: {ttft_s: 0.05, tpot_s: 0.01, objective: throughput}"
    path = tmp_path / "rel.yaml"
    path.write_text(text.replace(old, "slo: {ttft_s: 0.05, tpot_s: {x_step: 3, batch: 4}, objective: throughput}"))
    sc, prof = Scenario.from_yaml(path), SimProfile.load(tiny_profile)
    assert prof.timing == "modeled" and "reference_steps" not in prof.meta
    res, ref = resolve_scenario(sc, prof)
    model = step_reference_model(sc)
    assert res.slo.tpot_s == pytest.approx(3 * prof.models[model].step_time(4))
    assert ref["source"] == "step-time fit (timing: modeled)" and list(ref["step_s"]) == ["4"]


def test_the_profile_key_holds_the_reference_batches_not_the_multiples(tiny_scenario, tmp_path):
    from helios_rl.env.profile import default_profile_path
    from helios_rl.scenario import Scenario

    text = tiny_scenario.read_text()
    old = "slo: {ttft_s: 0.05, tpot_s: 0.01, objective: throughput}"

    def key(slo: str) -> str:
        path = tmp_path / "k.yaml"
        path.write_text(text.replace(old, slo))
        return default_profile_path(Scenario.from_yaml(path)).name

    a = key("slo: {ttft_s: 0.05, tpot_s: {x_step: 3, batch: 4}, objective: throughput}")
    assert a == key("slo: {ttft_s: 0.05, tpot_s: {x_step: 5, batch: 4}, objective: throughput}")
    assert a != key("slo: {ttft_s: 0.05, tpot_s: {x_step: 3, batch: 8}, objective: throughput}")


def test_a_relative_scenario_and_its_resolution_share_one_cached_profile(relative_setup, monkeypatch):
    """The environment resolves the scenario from its cached profile and simulates on that same profile (the
    scenario as resolved keys the cache as the scenario as written does): one calibration, not two."""
    import helios_rl.env.profile as profile_mod
    from helios_rl.env.profile import SimProfile, default_profile_path, resolve_scenario
    from helios_rl.scenario import Scenario

    path, prof = relative_setup
    declared = Scenario.from_yaml(path)
    resolved, _ = resolve_scenario(declared, SimProfile.load(prof))
    assert not resolved.slo.relative and default_profile_path(resolved) == default_profile_path(declared)
    calls = []
    monkeypatch.setattr(profile_mod, "ensure_profile", lambda sc, say=None, **kw: calls.append(sc.name) or prof)
    env = HeliosServingEnv(str(path), backend="sim", profile="auto")
    assert calls == [declared.name] and env.kwargs["profile"] == str(prof)
    env.close()


def test_drift_probe_scales_every_cost_by_calibrated_over_measured(drift_setup, monkeypatch):
    path, prof = drift_setup
    env = HeliosServingEnv(str(path), backend="live", profile=str(prof))
    be = env.backend
    cal, cal_pre = be.drift.calibrated_s, be.drift.prefill.calibrated_s
    slow = {"s": 2 * cal}  # the machine now takes twice as long for the probe: costs count half
    monkeypatch.setattr(be.probe, "step", lambda: slow["s"])
    monkeypatch.setattr(be.probe, "measure", lambda steps=8: slow["s"])
    # the prefill probe slowed 4x: a step's prefill pass counts a quarter, the rest half
    monkeypatch.setattr(be.prefill_probe, "step", lambda: 4 * cal_pre)
    monkeypatch.setattr(be.prefill_probe, "measure", lambda steps=3: 4 * cal_pre)
    monkeypatch.setattr(be.timer, "step_cost", lambda t0, rec: 0.01)
    monkeypatch.setattr(be.timer, "prefill_part", lambda rec: 0.004 if rec.prefill_tokens else 0.0)

    def run(dt: float) -> tuple[float, int, int]:
        n0 = len(be.engine.telemetry.steps)
        iv = be.advance(dt)
        recs = list(be.engine.telemetry.steps)[n0:]
        return iv.busy_s, len(recs), sum(1 for r in recs if r.prefill_tokens)

    env.reset(seed=3)
    busy, steps, pre = run(0.04)
    assert steps > 0 and pre > 0 and busy == pytest.approx(0.005 * (steps - pre) + (0.5 * 0.006 + 0.25 * 0.004) * pre)
    charged = busy
    one_factor = 0.005 * steps
    n_slow = steps
    slow["s"] = cal / 2  # faster than calibrated: after the window turns over, costs count double
    for _ in range(5):
        be.drift.add(be.probe.step())
    busy, steps, pre = run(0.08)
    assert steps > 0 and busy == pytest.approx(0.02 * (steps - pre) + (2.0 * 0.006 + 0.25 * 0.004) * pre)
    d = be.summary()["drift"]
    assert d["factor_min"] == pytest.approx(0.5) and d["factor_max"] == pytest.approx(2.0) and d["probes"] >= 6
    assert d["prefill_factor_min"] == d["prefill_factor_max"] == pytest.approx(0.25) and d["prefill_probes"] >= 1
    assert d["charged_s"] == pytest.approx(charged + busy, abs=1e-3)
    assert d["charged_one_factor_s"] == pytest.approx(one_factor + 0.02 * steps, abs=1e-3)  # the decode factor alone
    assert d["measured_s"] == pytest.approx(0.01 * (n_slow + steps), abs=1e-3)
    assert d["measured_prefill_s"] > 0
    env.close()


def test_drift_probe_runs_a_real_episode_and_records_its_factors(drift_setup):
    from helios_rl.agents.compare import run_episode
    from helios_rl.controllers import ControllerContext, make_controller
    from helios_rl.evaluation.profiling import ensure_repository

    path, prof = drift_setup
    env = HeliosServingEnv(str(path), backend="live", profile=str(prof))
    ctx = ControllerContext.for_scenario(env.scenario, ensure_repository(env.scenario, env.backend.loader,
                                                                         env.backend.timer))
    ep = run_episode(env, make_controller("static", ctx, env.scenario.params("static")), seed=1)
    d = ep["drift"]
    assert d["probes"] >= 2 and d["calibrated_probe_s"] > 0 and 0 < d["factor_min"] <= d["factor_mean"] <= d["factor_max"]
    # how it probed is recorded with the factors: the scenario's cadence, the default window of 3 samples
    assert (d["interval_s"], d["window"], d["prefill_every"]) == (0.001, 3, 4)
    assert env.backend.drift.decode.samples.maxlen == 3
    assert 1 <= d["prefill_probes"] <= d["probes"] // 4 + 2  # periodic prefill probes every fourth event, + forced
    env.close()


def test_drift_probe_refuses_what_it_cannot_correct(drift_setup, tiny_scenario, tiny_profile, tmp_path):
    from helios_rl.env.live import LiveBackend
    from helios_rl.env.workload import EpisodeWorkload
    from helios_rl.scenario import Scenario

    path, prof = drift_setup
    sc = Scenario.from_yaml(path)
    with pytest.raises(ValueError, match="needs a calibrated profile with a speed probe"):
        LiveBackend(sc, EpisodeWorkload(sc))  # no profile: nothing to correct against
    with pytest.raises(ValueError, match="this one has none"):
        LiveBackend(sc, EpisodeWorkload(sc), profile=str(tiny_profile))  # calibrated (modeled) without a probe
    with pytest.raises(ValueError, match="virtual clock"):
        HeliosServingEnv(str(path), backend="live", profile=str(prof), clock="wall")
    from helios_rl.env.profile import SimProfile

    old = SimProfile.load(prof)  # calibrated before the prefill probe existed: refused, not corrected by half
    for k in ("prefill_s", "prefill_tokens", "prefill_samples"):
        old.meta["speed_probe"].pop(k)
    old.save(tmp_path / "old.json")
    with pytest.raises(ValueError, match="no prefill time.*re-calibrate"):
        LiveBackend(sc, EpisodeWorkload(sc), profile=str(tmp_path / "old.json"))
    bad = tmp_path / "bad.yaml"
    bad.write_text(tiny_scenario.read_text().replace("backend: {timing: modeled,", "backend: {timing: modeled, drift: probe,"))
    with pytest.raises(ScenarioError, match="backend.drift"):
        HeliosServingEnv(str(bad), backend="sim", profile=str(tiny_profile))
    text = path.read_text()
    for window in ("0", "2.5"):  # a median of no samples, or of half a sample
        bad.write_text(text.replace("drift_interval_s: 0.001", f"drift_interval_s: 0.001, drift_window: {window}"))
        with pytest.raises(ScenarioError, match="backend.drift_window"):
            Scenario.from_yaml(bad)
    bad.write_text(text.replace("drift_interval_s: 0.001", "drift_interval_s: 0.001, drift_window: 7"))
    assert Scenario.from_yaml(bad).backend.drift_window == 7


def test_drift_correction_uses_the_median_of_its_window_and_resets_per_episode():
    from helios_rl.evaluation.drift import DriftCorrection

    d = DriftCorrection(0.2, window=3)
    assert d.factor == 1.0  # nothing probed yet: costs as measured
    for s in (0.4, 0.1, 0.4):  # one fast outlier does not move the median
        d.add(s)
    assert d.factor == pytest.approx(0.5) and d.scale(2.0) == pytest.approx(1.0)
    d.add(0.2)
    d.add(0.2)  # the window turns over: (0.4, 0.2, 0.2)
    assert d.factor == pytest.approx(1.0)
    s = d.summary()
    assert (s["probes"], s["factor_min"], s["factor_max"], s["measured_s"], s["charged_s"]) == (5, 0.5, 0.5, 2.0, 1.0)
    d.new_episode()
    assert d.summary()["probes"] == 0 and d.summary()["factor_mean"] == pytest.approx(1.0)  # the window is kept
    with pytest.raises(ValueError, match="positive"):
        DriftCorrection(0.0)
    with pytest.raises(ValueError, match="no calibrated prefill probe"):
        DriftCorrection(0.2).add_prefill(0.1)


def test_drift_correction_prices_a_costs_prefill_part_by_the_prefill_probe():
    from helios_rl.evaluation.drift import DriftCorrection

    d = DriftCorrection(0.2, window=3, calibrated_prefill_s=1.0)
    d.add(0.4)  # decode probe 2x slower: factor 0.5
    d.add_prefill(1.25)  # prefill probe 1.25x slower: factor 0.8
    assert d.scale(1.0, prefill=0.5) == pytest.approx(0.5 * 0.5 + 0.5 * 0.8)
    assert d.scale(1.0) == pytest.approx(0.5)  # no prefill pass: the decode factor alone
    assert d.scale(0.2, prefill=0.3) == pytest.approx(0.2 * 0.8)  # a prefill part is at most the cost
    s = d.summary()
    assert s["measured_s"] == pytest.approx(2.2) and s["charged_s"] == pytest.approx(0.65 + 0.5 + 0.16)
    assert s["measured_prefill_s"] == pytest.approx(0.7) and s["prefill_factor_mean"] == pytest.approx(0.8)
    assert s["charged_one_factor_s"] == pytest.approx(1.1)  # what the decode factor alone would have charged


def test_the_environment_resolves_arrival_rates_relative_to_capacity(tiny_scenario, tiny_profile, tmp_path):
    """``workload.rate_unit``: the env offers the load as a multiple of what this machine's calibrated profile
    decodes; both backends refuse a scenario whose rates were never resolved."""
    from helios_rl.env.profile import SimProfile
    from helios_rl.env.sim import SimBackend
    from helios_rl.env.workload import EpisodeWorkload
    from helios_rl.scenario import Scenario, capacity_rps, step_reference_model

    text = tiny_scenario.read_text()
    old = "  arrival: {kind: poisson, rate: 300.0}\n"
    assert old in text
    path = tmp_path / "rated.yaml"
    path.write_text(text.replace(old, "  arrival: {kind: poisson, rate: 0.5}\n  rate_unit: {capacity_batch: 4}\n"))
    declared = Scenario.from_yaml(path)
    prof = SimProfile.load(tiny_profile)
    env = HeliosServingEnv(str(path), backend="sim", profile=str(tiny_profile))
    cap = capacity_rps(declared, lambda m, b: prof.models[m].step_time(b), 4)
    lo, hi = declared.workload.new_tokens_range()
    assert cap == pytest.approx(4 / prof.models[step_reference_model(declared)].step_time(4) / ((lo + hi) / 2))
    assert env.scenario.workload.arrival.rate == pytest.approx(0.5 * cap) and env.scenario.rate_batch is None
    env.reset(seed=2)
    arrivals = [r.arrival_s for r in env.workload.requests(2)]
    assert len(arrivals) > 1 and arrivals == sorted(arrivals)
    env.close()
    with pytest.raises(ValueError, match="workload.rate_unit"):
        SimBackend(prof, declared, EpisodeWorkload(declared))


def test_goodput_divides_by_a_window_the_workload_fixes_not_by_the_episode(tiny_scenario, tiny_profile):
    """The score's denominator is the seed's SLO window (latest arrival + TTFT target + (max new tokens - 1) x
    TPOT target over its requests), whatever a method serves: two configs that finish the trace at different
    times share it, so their scores stand in the ratio of their good tokens, not of their episode lengths."""
    from helios_rl.agents.compare import run_episode
    from helios_rl.controllers import ControllerContext
    from helios_rl.controllers.params import StaticParams
    from helios_rl.controllers.static import StaticController
    from helios_rl.evaluation.profiling import ensure_repository
    from helios_rl.evaluation.runtime import ModelLoader, Timer

    env = HeliosServingEnv(str(tiny_scenario), backend="sim", profile=str(tiny_profile))
    slo = env.scenario.slo
    want = max(r.arrival_s + slo.ttft_s + max(r.max_new_tokens - 1, 0) * slo.tpot_s for r in env.workload.requests(3))
    assert env.slo_window_s(3) == pytest.approx(want) and env.slo_window_s(3) != pytest.approx(env.slo_window_s(4))
    sc = env.scenario
    ctx = ControllerContext.for_scenario(sc, ensure_repository(sc, ModelLoader("cpu", None, sc.exits.heads),
                                                               Timer(sc.backend.timing)))
    model = sc.models[0]
    eps = [run_episode(env, StaticController(ctx, StaticParams(model=model, depth=env.backend.num_layers[model],
                                                               max_batch=b, setting=None)), 3) for b in (1, 8)]
    assert eps[0]["elapsed_s"] != pytest.approx(eps[1]["elapsed_s"])  # batch 1 finishes the trace later
    assert eps[0]["slo_window_s"] == eps[1]["slo_window_s"] == pytest.approx(want)
    for ep in eps:
        assert ep["goodput_tps"] == pytest.approx(ep["good_tokens"] / want)
        assert ep["goodput_elapsed_tps"] == pytest.approx(ep["good_tokens"] / ep["elapsed_s"])
        assert 0.0 <= ep["good_token_share"] <= 1.0
    env.close()
