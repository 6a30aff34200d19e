"""Agents on tiny models: SB3 training in the simulator, resume after a kill, policies as controllers,
compare with rliable statistics, agent files and bad input, and the RL Zoo entry point."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from helios_rl.agents.config import AgentConfigError, load_agent
from helios_rl.controllers.policy import PolicyError, load_policy

ROOT = Path(__file__).resolve().parent.parent
AGENTS = ROOT / "agents"

TINY_AGENT = """\
helios_rl/Serving-Sim-v0:
  policy: MlpPolicy
  n_timesteps: 512
  n_envs: 2
  n_steps: 64
  batch_size: 64
  n_epochs: 2
  gamma: 0.9
  learning_rate: lin_1e-3
  policy_kwargs: "dict(net_arch=[32, 32])"
helios:
  eval_freq: 256
  eval_episodes: 2
  checkpoint_freq: 256
"""


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("HELIOS_RL_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def trained(tiny_scenario, tiny_profile, tmp_path_factory):
    """A short PPO run on the tiny scenario's simulator (W&B offline, TensorBoard on)."""
    from helios_rl.agents.train import train

    root = tmp_path_factory.mktemp("runs")
    agent = root / "ppo.yaml"
    agent.write_text(TINY_AGENT)
    old = {k: os.environ.get(k) for k in ("WANDB_MODE", "HELIOS_RL_CACHE")}
    os.environ["WANDB_MODE"] = "offline"
    os.environ["HELIOS_RL_CACHE"] = str(root / "cache")
    try:
        m = train(str(tiny_scenario), agent, seed=3, profile=str(tiny_profile), out=root, progress=False)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return m


def _ctx(scenario_path):
    from helios_rl.controllers import ControllerContext
    from helios_rl.evaluation.profiling import ensure_repository
    from helios_rl.evaluation.runtime import ModelLoader, Timer
    from helios_rl.scenario import Scenario

    sc = Scenario.from_yaml(scenario_path)
    profiles = ensure_repository(sc, ModelLoader("cpu", None, sc.exits.heads), Timer(sc.backend.timing))
    return sc, ControllerContext.for_scenario(sc, profiles)


def test_train_writes_a_complete_reproducible_run_folder(trained):
    run = Path(trained["run_dir"])
    assert run.name.startswith("tiny-env__ppo__3__")
    for f in ("config.json", "spaces.json", "policy.zip", "best_model.zip", "metrics.json", "evaluations.npz",
              "scenario.yaml"):
        assert (run / f).exists(), f
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["algo"] == "ppo" and cfg["seed"] == 3 and cfg["backend"] == "sim"
    assert cfg["env_id"] == "helios_rl/Serving-Sim-v0" and "stable-baselines3" in cfg["versions"]
    assert cfg["env_kwargs"]["profile"] and cfg["timesteps"] == 512
    schema = json.loads((run / "spaces.json").read_text())
    assert schema["spec"]["obs_names"][0] == "arrival_rate" and schema["initial"]["model"]
    assert sorted(p.name for p in (run / "checkpoints").glob("rl_model_*_steps.zip"))  # checkpoints kept
    assert list((run / "tb").rglob("events.out.tfevents.*"))  # TensorBoard logs under the run folder
    assert list((run / "wandb").glob("offline-run-*"))  # a W&B run, offline
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["timesteps"] >= 512 and len(metrics["eval_curve"]) >= 1
    assert np.isfinite(metrics["eval_mean_reward_best"])


def test_resume_continues_from_the_last_checkpoint_after_a_kill(tiny_scenario, tiny_profile, tmp_path):
    agent = tmp_path / "ppo.yaml"
    agent.write_text(TINY_AGENT.replace("n_timesteps: 512", "n_timesteps: 1000000"))
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "helios_rl.cli", "train", "--env", str(tiny_scenario), "--agent",
                             str(agent), "--seed", "1", "--profile", str(tiny_profile), "--out", str(tmp_path / "r"),
                             "--no-progress"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        ckpts = []
        while time.time() < deadline and not ckpts:
            time.sleep(0.5)
            ckpts = list((tmp_path / "r").glob("*/checkpoints/rl_model_*_steps.zip"))
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert ckpts, "no checkpoint within 120 s"
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    run = ckpts[0].parent.parent
    assert not (run / "policy.zip").exists()  # killed: no final policy
    from helios_rl.agents.train import last_checkpoint, train

    step = last_checkpoint(run)[1]
    cfg = json.loads((run / "config.json").read_text())
    cfg["timesteps"] = step + 128  # finish soon after the checkpoint
    (run / "config.json").write_text(json.dumps(cfg))
    said = []
    m = train(None, agent, resume=run, progress=False, wandb_mode="disabled", say=said.append)
    assert any(f"rl_model_{step}_steps.zip" in s for s in said), said
    assert m["timesteps"] >= step + 128 and (run / "policy.zip").exists()


def test_policy_controller_reproduces_the_policy_it_was_trained_as(trained, tiny_scenario, tiny_profile):
    """Deployed as a controller, the policy takes the same decisions as ``predict`` on the env's own
    observations: the observation and action encodings are shared, not re-implemented."""
    from helios_rl.agents.compare import run_episode
    from helios_rl.env.env import HeliosServingEnv

    sc, ctx = _ctx(tiny_scenario)
    ctrl = load_policy(trained["run_dir"], ctx)
    env = HeliosServingEnv(sc, backend="sim", profile=str(tiny_profile))
    ep = run_episode(env, ctrl, seed=5)
    by_controller = [e for e in ctrl.log if e["event"] == "act"]
    # the same episode driven by predict() on the env's observations
    obs, _ = env.reset(seed=5, options={"config": ctrl.initial()})
    direct = []
    done = False
    while not done:
        action, _ = ctrl.run.model.predict(obs, deterministic=True)
        before = dict(env._cfg)
        obs, _, term, trunc, info = env.step(action)
        if info["config"] != before:
            direct.append({k: info["config"][k] for k in ("model", "depth", "batch", "threshold")})
        done = term or trunc
    assert [{k: e[k] for k in ("model", "depth", "batch", "threshold")} for e in by_controller] == direct
    assert ep["served"] == ep["requests"] and ep["steps"] > 0
    # the behaviour digest: the same controller again serves identically; a static config is another behaviour
    from helios_rl.controllers.params import StaticParams
    from helios_rl.controllers.static import StaticController

    assert run_episode(env, load_policy(trained["run_dir"], ctx), seed=5)["behaviour"] == ep["behaviour"]
    first = ctrl.initial()
    static = [run_episode(env, StaticController(ctx, StaticParams(model=first["model"], depth=first["depth"],
                                                                  max_batch=b, setting=first["threshold"])), seed=5)
              for b in (1, 2, 2)]
    assert static[1]["behaviour"] == static[2]["behaviour"] != static[0]["behaviour"]


def test_compare_reports_iqm_cis_and_probability_of_improvement(trained, tiny_scenario, tiny_profile, tmp_path):
    from helios_rl.agents.compare import compare

    out = tmp_path / "cmp"
    res = compare(str(tiny_scenario), [trained["run_dir"]], ["static", "helios"], seeds=3, backend="sim",
                  out=out, profile=str(tiny_profile), reps=200, progress=False, say=lambda s: None)
    s = res["summary"]
    for key in ("rl_vs_helios_iqm", "rl_vs_helios_ci_low", "rl_vs_helios_ci_high", "rl_vs_static_iqm", "seeds"):
        assert key in s, key
    assert s["seeds"] == 3 and s["rl_vs_helios_ci_low"] <= s["rl_vs_helios_iqm"] <= s["rl_vs_helios_ci_high"]
    assert 0.0 <= s["rl_prob_improvement_vs_helios"] <= 1.0
    assert res["seeds"][0] >= 1_000_000  # held-out workload seeds
    for m, eps in res["episodes"].items():
        assert len(eps) == 3 and all(e["served"] == e["requests"] for e in eps), m
    # the IQM ratio is recomputable from the stored episodes
    from helios_rl.agents.stats import iqm

    rl = next(m for m in res["episodes"] if m.startswith("policy:"))
    ratio = iqm(np.array([e["goodput_tps"] for e in res["episodes"][rl]])) / iqm(
        np.array([e["goodput_tps"] for e in res["episodes"]["helios"]]))
    assert ratio == pytest.approx(s["rl_vs_helios_iqm"])
    assert (out / "results.json").exists() and (out / "results.md").read_text().startswith("# compare")
    assert (out / "goodput_iqm.png").stat().st_size > 1000


def test_compare_live_with_measured_cpu_timing(trained, tiny_scenario, tiny_profile, tmp_path):
    """``compare`` on the live backend under ``timing: cpu``: served output is scored, every request done."""
    from helios_rl.agents.compare import compare

    path = tmp_path / "cpu.yaml"
    path.write_text(tiny_scenario.read_text().replace("timing: modeled", "timing: cpu"))
    res = compare(str(path), [trained["run_dir"]], ["static"], seeds=2, backend="live", out=tmp_path / "cmp",
                  profile=str(tiny_profile), reps=100, progress=False, say=lambda s: None)
    assert res["timing"] == "cpu"
    for m, eps in res["episodes"].items():
        assert len(eps) == 2 and all(e["served"] == e["requests"] for e in eps), m


@pytest.mark.parametrize("algo, text", [
    ("a2c", "helios_rl/Serving-Sim-v0: {policy: MlpPolicy, n_timesteps: 64, n_envs: 2, n_steps: 8}\n"),
    ("dqn", "helios_rl/Serving-SimFlat-v0: {policy: MlpPolicy, n_timesteps: 64, learning_starts: 16, "
            "buffer_size: 200, batch_size: 8}\n"),
    ("maskable_ppo", "helios_rl/Serving-Sim-v0: {policy: MlpPolicy, n_timesteps: 64, n_steps: 32, batch_size: 32}\n"),
])
def test_every_algorithm_trains_and_deploys(algo, text, tiny_scenario, tiny_profile, tmp_path):
    from helios_rl.agents.train import train
    from helios_rl.engine.telemetry import TelemetrySnapshot

    agent = tmp_path / f"{algo}.yaml"
    agent.write_text(text + "helios: {eval_freq: 32, eval_episodes: 1, checkpoint_freq: 32}\n")
    m = train(str(tiny_scenario), agent, seed=0, profile=str(tiny_profile), out=tmp_path, progress=False,
              wandb_mode="disabled")
    assert m["timesteps"] >= 64
    _, ctx = _ctx(tiny_scenario)
    ctrl = load_policy(m["run_dir"], ctx)
    ctrl.reset(0)
    first = ctrl.decide(TelemetrySnapshot())
    assert first.model in ctx.candidates and first.depth >= 1
    snap = TelemetrySnapshot(time=0.1, window_s=0.1, model=first.model, depth=first.depth, max_batch=first.max_batch,
                             steps=3, arrivals=2)
    cfg = ctrl.decide(snap)  # a valid config or None (keep)
    assert cfg is None or (ctx.admissible(cfg.model, cfg.depth) >= cfg.max_batch >= 1)


def test_training_on_the_live_engine_scores_what_the_reward_reads(tiny_scenario, tiny_profile, tmp_path):
    """Live training: real served steps, the reward's agreement measured; the secondary figures (a full-depth
    pass per served output) are not computed (recorded in the run's env_kwargs, so a resume does the same)."""
    from helios_rl.agents.train import train

    agent = tmp_path / "a2c.yaml"
    agent.write_text("helios_rl/Serving-Live-v0: {policy: MlpPolicy, n_timesteps: 16, n_envs: 1, n_steps: 8}\n"
                     "helios: {eval_freq: 1000, eval_episodes: 1, checkpoint_freq: 1000}\n")
    m = train(str(tiny_scenario), agent, seed=0, backend="live", profile=str(tiny_profile), out=tmp_path,
              progress=False, wandb_mode="disabled")
    saved = json.loads((Path(m["run_dir"]) / "config.json").read_text())
    assert m["timesteps"] >= 16 and saved["env_kwargs"]["backend"] == "live"
    assert saved["env_kwargs"]["score"] == "agreement"


def test_bad_policies_and_agent_files_give_clear_errors(trained, tiny_scenario, tmp_path):
    import shutil

    from helios_rl.controllers import ControllerContext

    _, ctx = _ctx(tiny_scenario)
    run = Path(trained["run_dir"])
    # a policy deployed on other candidates (schema mismatch)
    other = ControllerContext(tuple(reversed(ctx.candidates)), ctx.profiles, ctx.memory, ctx.slo)
    with pytest.raises(PolicyError, match="other spaces: models"):
        load_policy(run, other)
    # a corrupt archive
    bad = tmp_path / "bad"
    assert load_policy(run, ctx).run.policy_path.name == "best_model.zip"  # auto: the best evaluated model
    shutil.copytree(run, bad, ignore=shutil.ignore_patterns("wandb", "tb", "checkpoints", "best_model.zip"))
    (bad / "policy.zip").write_bytes(b"not a zip at all")
    with pytest.raises(PolicyError, match="not a zip archive"):
        load_policy(bad, ctx)
    with zipfile.ZipFile(bad / "policy.zip", "w") as z:
        z.writestr("data", "{broken")
    with pytest.raises(PolicyError, match="cannot load ppo policy"):
        load_policy(bad, ctx)
    # an unknown algorithm in the run's config
    cfg = json.loads((run / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "algo": "sac"}))
    with pytest.raises(PolicyError, match="unknown algorithm 'sac'"):
        load_policy(bad, ctx)
    with pytest.raises(FileNotFoundError, match="no such run folder"):
        load_policy(tmp_path / "missing", ctx)
    # agent files
    (tmp_path / "sac.yaml").write_text("helios_rl/Serving-Sim-v0: {policy: MlpPolicy}\n")
    with pytest.raises(AgentConfigError, match="unknown algorithm 'sac'"):
        load_agent(tmp_path / "sac.yaml")
    (tmp_path / "ppo.yaml").write_text("helios_rl/Serving-Live-v0: {policy: MlpPolicy}\n")
    with pytest.raises(AgentConfigError, match="no hyperparameters for helios_rl/Serving-Sim-v0"):
        load_agent(tmp_path / "ppo.yaml", "sim")
    (tmp_path / "ppo.yaml").write_text("helios_rl/Serving-Sim-v0: {policy: MlpPolicy, n_stepz: 8}\n")
    with pytest.raises(AgentConfigError, match=r"unknown hyperparameter\(s\) \['n_stepz'\]"):
        load_agent(tmp_path / "ppo.yaml", "sim")


@pytest.mark.parametrize("path", sorted(AGENTS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(AGENTS)))
def test_shipped_agent_files_parse_for_both_backends(path):
    for backend in ("sim", "live"):
        cfg = load_agent(path, backend)
        assert cfg.algo == path.stem and cfg.n_timesteps >= 1
        assert ("Flat" in cfg.env_id) == (cfg.algo == "dqn")
        cfg.algorithm_kwargs()


def test_rl_zoo3_trains_on_the_registered_env(tiny_scenario, tiny_profile, tmp_path):
    pytest.importorskip("rl_zoo3")
    conf = tmp_path / "ppo.yaml"
    conf.write_text("helios_rl/Serving-Sim-v0:\n  policy: MlpPolicy\n  n_timesteps: 128\n  n_envs: 1\n"
                    "  n_steps: 64\n  batch_size: 64\n")
    env_kwargs = [f"scenario:'{tiny_scenario}'", f"profile:'{tiny_profile}'"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "rl_zoo3.train", "--algo", "ppo", "--gym-packages", "helios_rl",
                           "--env", "helios_rl/Serving-Sim-v0", "--conf-file", str(conf), "-f", str(tmp_path / "zoo"),
                           "--eval-freq", "-1", "--seed", "0", "--env-kwargs", *env_kwargs],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list((tmp_path / "zoo").rglob("*.zip"))


def test_trained_policy_serves_live_traffic_in_the_server(trained, tiny_scenario):
    """``helios-rl serve SCENARIO --controller policy:runs/<id>``: the policy decides, requests complete."""
    import httpx
    import openai

    from helios_rl.server import BackgroundServer, create_app
    from helios_rl.server.runtime import ServerSettings, runtime_from_scenario

    settings = ServerSettings(served_name="tiny", interval_s=0.02, torch_threads=1, max_queue=16)
    rt = runtime_from_scenario(str(tiny_scenario), controller=f"policy:{trained['run_dir']}", settings=settings,
                               say=lambda s: None)
    with BackgroundServer(create_app(rt)) as url:
        cli = openai.OpenAI(base_url=f"{url}/v1", api_key="x")
        outs = [cli.completions.create(model="tiny", prompt="w5 w7 w9", max_tokens=12, extra_body={"ignore_eos": True})
                for _ in range(6)]
        assert all(o.usage.completion_tokens == 12 for o in outs)
        time.sleep(0.1)
        stats = httpx.get(f"{url}/admin/controller").json()
    assert stats["controller"].startswith("policy") and stats["decisions"] >= 2
    assert stats["fallbacks"].get("error", 0) == 0 and stats["fallbacks"].get("timeout", 0) == 0


def test_behaviour_digest_leaves_out_a_batch_cap_that_never_bound():
    from helios_rl.agents.compare import _behaviour_digest

    def d(*tenures):
        return _behaviour_digest([list(t) for t in tenures])

    a16, a32 = ("m", 18, 16, 0.99), ("m", 18, 32, 0.99)
    assert d((0, a16, False)) == d((0, a32, False))  # neither cap held anyone back
    assert d((0, a16, True)) != d((0, a32, True)) != d((0, a32, False))
    assert d((0, a16, False), (5, a32, False)) == d((0, a32, False))  # a change between unbound caps is none
    assert d((0, a16, False), (5, a32, True)) != d((0, a32, True))  # the bound cap took over at step 5
    assert d((0, a16, False)) != d((0, ("m", 18, 16, 0.95), False)) != d((0, ("m", 12, 16, 0.99), False))
    # the config set at reset, replaced by the first decision before any interval was served, is no behaviour ...
    assert d((0, ("m", 18, 64, 0.95), False), (1, a32, False)) == d((0, a16, False))
    assert d((0, ("m", 18, 64, 0.95), False), (1, a32, True)) == d((0, a32, True))
    # ... unless the first decision switched model or depth (a switch costs time), or came later
    assert d((0, ("m", 12, 64, 0.95), False), (1, a32, False)) != d((0, a32, False))
    assert d((0, ("m", 18, 64, 0.95), False), (2, a32, False)) != d((0, a32, False))


@pytest.mark.parametrize("backend", ["sim", "live"])
def test_episodes_whose_batch_caps_never_bound_share_a_behaviour(backend, tiny_scenario, tiny_profile, tmp_path):
    """Both backends report the steps at which requests waited at the batch cap: at 2 req/s nothing waits and caps
    4 and 8 are one behaviour; at the scenario's 300 req/s cap 2 binds and is a behaviour of its own."""
    from helios_rl.agents.compare import run_episode
    from helios_rl.controllers.params import StaticParams
    from helios_rl.controllers.static import StaticController
    from helios_rl.env import HeliosServingEnv

    slow = tmp_path / "slow.yaml"
    slow.write_text(tiny_scenario.read_text().replace("rate: 300.0", "rate: 2.0").replace("num_requests: 24",
                                                                                          "num_requests: 6"))
    out = {}
    for name, path in (("slow", slow), ("fast", tiny_scenario)):
        sc, ctx = _ctx(path)
        env = HeliosServingEnv(str(path), backend=backend, profile=str(tiny_profile))
        waits = {}
        for cap in (2, 4, 8):
            ctrl = StaticController(ctx, StaticParams(max_batch=cap))
            seen = []
            orig = env.step_config

            def spy(cfg, _orig=orig, _seen=seen):
                res = _orig(cfg)
                _seen.append(res[4]["telemetry"]["cap_waits"])
                return res

            env.step_config = spy
            ep = run_episode(env, ctrl, seed=11)
            env.step_config = orig
            assert ep["served"] == ep["requests"]
            out[(name, cap)], waits[cap] = ep["behaviour"], sum(seen)
        if name == "slow":
            assert waits[4] == waits[8] == 0
        else:
            assert waits[2] > 0
        env.close()
    assert out[("slow", 4)] == out[("slow", 8)]
    assert out[("fast", 2)] != out[("fast", 8)] and out[("fast", 2)] != out[("slow", 2)]


def test_agent_file_reward_weights_reach_the_training_env_and_bad_ones_are_refused(tiny_scenario, tiny_profile,
                                                                                    tmp_path):
    """``helios.reward_weights`` sets the environment's penalty weights for the run (recorded in its env_kwargs,
    so a resume trains on the same reward); an unknown weight, a negative one or a non-mapping is an error naming
    the key."""
    from helios_rl.agents.config import AgentConfigError, load_agent
    from helios_rl.agents.train import train
    from helios_rl.env.env import DEFAULT_WEIGHTS, HeliosServingEnv

    body = "helios_rl/Serving-Sim-v0: {policy: MlpPolicy, n_timesteps: 32, n_envs: 1, n_steps: 16}\n"
    agent = tmp_path / "a2c.yaml"
    agent.write_text(body + "helios: {eval_freq: 1000, eval_episodes: 1, checkpoint_freq: 1000, "
                            "reward_weights: {agreement: 0, slo: 0}}\n")
    m = train(str(tiny_scenario), agent, seed=0, profile=str(tiny_profile), out=tmp_path, progress=False,
              wandb_mode="disabled")
    kw = json.loads((Path(m["run_dir"]) / "config.json").read_text())["env_kwargs"]
    assert kw["reward_weights"] == {"agreement": 0.0, "slo": 0.0}
    env = HeliosServingEnv(**kw)
    assert env.weights == {**DEFAULT_WEIGHTS, "agreement": 0.0, "slo": 0.0} != DEFAULT_WEIGHTS
    env.close()
    for bad, msg in (("{agrement: 0}", r"unknown weight\(s\) \['agrement'\]"),
                     ("{slo: -1}", r"reward_weights\.slo: must be a number >= 0"),
                     ("[0, 1]", "reward_weights: expected a mapping")):
        f = tmp_path / "bad" / "a2c.yaml"
        f.parent.mkdir(exist_ok=True)
        f.write_text(body + f"helios: {{reward_weights: {bad}}}\n")
        with pytest.raises(AgentConfigError, match=msg):
            load_agent(f)
