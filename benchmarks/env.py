"""Benchmark of the Gymnasium environment (issue #5): simulator speed, live speed, sim-vs-live fidelity.

    python benchmarks/env.py --scenario envs/helios-paper.yaml --out env.json [--profile P.json] [--requests N]

1. calibrates the simulator on the live engine (or reuses ``--profile`` when it is valid);
2. ``sim_steps_per_s``: env steps per second of the sim backend under random masked actions
   (single process, actions drawn from the masks, resets included);
3. ``live_steps_per_s``: env steps per second of one live episode (keep actions);
4. fidelity: static, helios and random on the live backend, their configs replayed on the sim,
   mean absolute relative errors of throughput, TTFT p95 and TPOT p95, and the mean absolute error
   of agreement (``fidelity_agreement_err``: simulator-predicted vs live-measured free-running
   agreement, per controller);
5. ``check_env``: gymnasium's and SB3's ``check_env`` per backend and timing mode (the live backend
   is deterministic only with ``timing: modeled``; under ``cpu`` its measured step costs vary);
6. ``scorer_overhead``: what scoring the served output cost (CPU seconds per served token, and as a
   share of serving's CPU time) in the live-speed episode;
7. ``calibration_tokens_min``: the smallest sample behind any simulator profile point;
8. ``shallowest_vs_full_reward``: mean live episode reward of always loading the shallowest depth
   minus that of full depth at the strictest exit setting (a reward-hacking probe: must be < 0).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _say(s: str) -> None:
    print(s, file=sys.stderr, flush=True)


def sim_speed(scenario_path: str, sc, profile: str, seconds: float, seed: int = 0) -> dict:
    from helios_rl.env.env import HeliosServingEnv

    env = HeliosServingEnv(sc, backend="sim", profile=profile)
    rng = np.random.default_rng(seed)
    env.reset(seed=seed)
    bounds = np.cumsum([0] + env.dims)
    steps = episodes = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(200):
            score = rng.random(bounds[-1]) * env.action_masks()  # uniform over allowed values per dimension
            action = np.array([int(np.argmax(score[bounds[i]:bounds[i + 1]])) for i in range(4)])
            _, r, term, trunc, _ = env.step(action)
            steps += 1
            if term or trunc:
                env.reset()
                episodes += 1
    dt = time.perf_counter() - t0
    # the same with actions drawn up front: the environment's own cost
    acts = [env.action_space.sample() for _ in range(20_000)]
    env.reset(seed=seed)
    t1 = time.perf_counter()
    for a in acts:
        _, _, term, trunc, _ = env.step(a)
        if term or trunc:
            env.reset()
    env_only = len(acts) / (time.perf_counter() - t1)
    env.close()
    return {"steps": steps, "seconds": dt, "episodes": episodes, "steps_per_s_masked_policy": steps / dt,
            "steps_per_s_env_only": env_only}


def live_speed(sc, profile: str) -> dict:
    from helios_rl.env.env import HeliosServingEnv

    env = HeliosServingEnv(sc, backend="live", profile=profile)
    env.reset(seed=0)
    t0, cpu0 = time.perf_counter(), time.process_time()
    steps, info = 0, {}
    keep = np.zeros(4, dtype=np.int64)
    while True:
        _, _, term, trunc, info = env.step(keep)
        steps += 1
        if term or trunc:
            break
    dt, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    scorer = env.backend.scorer.cost(served_cpu_s=max(cpu - env.backend.scorer.cpu_s, 1e-9))
    served = info.get("episode_summary", {}).get("output_tokens") or 0
    env.close()
    return {"steps": steps, "wall_s": dt, "steps_per_s": steps / dt, "episode": info.get("episode_summary"),
            "process_cpu_s": cpu, "scorer": scorer,
            "scorer_cpu_s_per_served_token": scorer["cpu_s"] / served if served else None}


def probe_rewards(sc, profile: str, seeds: int = 2) -> dict:
    """Mean live episode reward of always-shallowest vs full depth (strictest exit setting)."""
    from helios_rl.engine.config import ServingConfig
    from helios_rl.env.env import HeliosServingEnv

    env = HeliosServingEnv(sc, backend="live", profile=profile)
    out: dict = {}
    for name in ("shallowest", "full"):
        rewards, goods = [], []
        for seed in range(seeds):
            env.reset(seed=seed)
            total, good = 0.0, 0
            while True:
                m = env._cfg["model"]
                depths = env.depth_values[m] if isinstance(env.depth_values, dict) else env.depth_values
                cfg = ServingConfig(model=m, depth=min(depths)) if name == "shallowest" else \
                    ServingConfig(model=m, depth=env.L[m], **env.scenario.exits.knob(max(env.thresholds)))
                _, r, term, trunc, info = env.step_config(cfg)
                total += r
                good += info["goodput_tokens"]
                if term or trunc:
                    break
            rewards.append(total)
            goods.append(good)
        out[name] = {"rewards": rewards, "mean_reward": float(np.mean(rewards)), "goodput_tokens": goods}
    env.close()
    out["shallowest_vs_full_reward"] = out["shallowest"]["mean_reward"] - out["full"]["mean_reward"]
    return out


def check_envs(sc, profile: str) -> dict:
    """gymnasium's and SB3's check_env per backend and timing mode, recorded (not raised)."""
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check

    from helios_rl.env.env import HeliosServingEnv

    out = {}
    for kind, timing in (("sim", None), ("live", "modeled"), ("live", "cpu")):
        extra = {"timing": timing} if timing else {}
        env = HeliosServingEnv(sc, backend=kind, profile=profile, horizon=8, **extra)
        key = kind if timing is None else f"{kind}/{timing}"
        try:
            check_env(env, skip_render_check=True)
            sb3_check(env, warn=False)
            out[key] = "ok"
        except Exception as exc:  # reported, not raised: the benchmark records it
            out[key] = f"{type(exc).__name__}: {str(exc)[:300]}"
        finally:
            env.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--profile", default=None, help="reuse this simulator profile (calibrated when missing/stale)")
    ap.add_argument("--requests", type=int, default=None, help="shorten the workload to N requests (live parts)")
    ap.add_argument("--controllers", default="static,helios,random")
    ap.add_argument("--sim-seconds", type=float, default=10.0)
    ap.add_argument("--calib-prompts", type=int, default=4)
    ap.add_argument("--calib-tokens", type=int, default=24)
    ap.add_argument("--calib-min-tokens", type=int, default=1000, help="served tokens behind every profile point")
    ap.add_argument("--calib-batches", default="1,4,16")
    ap.add_argument("--thresholds", default="", help="exit settings to calibrate (default: the scenario's choices)")
    ap.add_argument("--probe-seeds", type=int, default=2)
    ap.add_argument("--skip-live", action="store_true", help="sim speed only")
    args = ap.parse_args(argv)

    from helios_rl.env.calibrate import calibrate
    from helios_rl.env.fidelity import fidelity
    from helios_rl.env.profile import ProfileError, SimProfile
    from helios_rl.evaluation.harness import git_revision, machine_info
    from helios_rl.evaluation.runtime import set_threads
    from helios_rl.scenario import Scenario
    from helios_rl.utils.io import atomic_write_json

    sc = Scenario.from_yaml(args.scenario)
    if args.requests:
        sc = replace(sc, workload=replace(sc.workload, num_requests=args.requests))
    set_threads(sc.engine.threads)
    profile = args.profile or str(Path(args.out).with_suffix(".profile.json"))
    result: dict = {"scenario": args.scenario, "args": vars(args), "machine": machine_info(), "git": git_revision(),
                    "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        prof = SimProfile.load(profile)
        prof.check(sc, profile)
        result["calibration"] = {"reused": profile}
        _say(f"reusing profile {profile}")
        if len(sc.models) > 1 and not all(m.switch_from and m.tokenizer_s for m in prof.models.values()):
            from helios_rl.env.calibrate import calibrate_switches
            from helios_rl.env.workload import EpisodeWorkload
            from helios_rl.evaluation.replay import format_prompt
            from helios_rl.evaluation.runtime import ModelLoader, Timer

            texts = [format_prompt(r) for r in EpisodeWorkload(sc).requests(0)]
            calibrate_switches(sc, prof.models, ModelLoader(sc.engine.device, sc.engine.dtype, sc.exits.heads),
                               Timer(sc.backend.timing), texts, _say)
            prof.save(profile)
            result["calibration"]["switches_added"] = True
    except ProfileError as exc:
        _say(f"calibrating ({exc})")
        t0 = time.perf_counter()
        prof = calibrate(sc, thresholds=tuple(float(x) for x in args.thresholds.split(",")) if args.thresholds else None,
                         batches=tuple(int(x) for x in args.calib_batches.split(",")), prompts=args.calib_prompts,
                         new_tokens=args.calib_tokens, min_tokens=args.calib_min_tokens, say=_say)
        prof.save(profile)
        result["calibration"] = {"profile": profile, "seconds": time.perf_counter() - t0,
                                 "residual_sigma": {m: v.residual_sigma for m, v in prof.models.items()},
                                 "step_coef": {m: v.step_coef for m, v in prof.models.items()}}
    _say("sim speed ...")
    result["sim"] = sim_speed(args.scenario, sc, profile, args.sim_seconds)
    _say(f"  {result['sim']}")
    summary = {"sim_steps_per_s": result["sim"]["steps_per_s_masked_policy"],
               "sim_steps_per_s_env_only": result["sim"]["steps_per_s_env_only"],
               "calibration_tokens_min": min((v.get("tokens", 0) for m in prof.models.values()
                                              for v in m.exits.values()), default=0)}
    if not args.skip_live:
        _say("check_env ...")
        result["check_env"] = check_envs(sc, profile)
        summary["check_env"] = result["check_env"]
        _say("live speed ...")
        result["live"] = live_speed(sc, profile)
        summary["live_steps_per_s"] = result["live"]["steps_per_s"]
        summary["scorer_overhead"] = {"cpu_s_per_served_token": result["live"]["scorer_cpu_s_per_served_token"],
                                      "share_of_serving": result["live"]["scorer"].get("share_of_serving")}
        _say("reward-hacking probe (live) ...")
        result["probe"] = probe_rewards(sc, profile, args.probe_seeds)
        summary["shallowest_vs_full_reward"] = result["probe"]["shallowest_vs_full_reward"]
        _say(f"  {result['live']['steps']} steps in {result['live']['wall_s']:.1f} s")
        _say("fidelity ...")
        try:
            fid = fidelity(sc, profile, tuple(args.controllers.split(",")), say=_say)
            result["fidelity"] = fid
            for k in ("throughput", "ttft_p95", "tpot_p95"):
                summary[f"fidelity_{k}_err"] = fid["mean_rel_err"][k]
            summary["fidelity_agreement_err"] = {"mean": fid["mean_agreement_abs_err"], **fid["agreement_abs_err"]}
        except Exception:
            result["fidelity_error"] = traceback.format_exc()
            _say(result["fidelity_error"])
    result["summary"] = summary
    atomic_write_json(args.out, json.loads(json.dumps(result, default=float)))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
