"""The work of one benchmark trial (runs in a Ray worker; also callable directly).

Each trial writes ``DIR/trials/<trial id>.json`` atomically when it finishes; a trial whose file exists
is done (resume skips it). A worker process keeps one environment (and so one live engine) per
scenario and backend across the evaluation shards it runs.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import time
from pathlib import Path
from typing import Any

from helios_rl.seeds import dev_eval_seeds, dev_seed, is_test_seed
from helios_rl.utils.io import atomic_write_json

_ENVS: dict[tuple, Any] = {}  # (scenario, backend, profile) -> HeliosServingEnv, kept for the worker's life
_CTX: dict[tuple, Any] = {}


def result_path(out: Path, trial_id: str) -> Path:
    return Path(out) / "trials" / (trial_id.replace("/", "__") + ".json")


def load_result(out: Path, trial_id: str) -> dict | None:
    p = result_path(out, trial_id)
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None  # a torn file cannot exist (atomic writes), but a corrupt one is redone, not trusted


def worker_info() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count()}


def run_trial(spec: dict, cfg: dict, out: str) -> dict:
    """Run the trial ``spec`` (``Trial.to_dict()``) of benchmark ``cfg`` into ``out``; returns its result."""
    out_p = Path(out)
    done = load_result(out_p, spec["id"])
    if done is not None:
        return done
    t0 = time.perf_counter()
    if spec["kind"] == "prepare":
        res = _prepare(spec, cfg, out_p)
    elif spec["kind"] == "train":
        res = _train(spec, cfg, out_p)
    elif spec["kind"] == "eval":
        res = _eval(spec, cfg, out_p)
    else:
        raise ValueError(f"unknown trial kind {spec['kind']!r}")
    from helios_rl.utils.provenance import git_revision

    res.update(trial=spec, seconds=round(time.perf_counter() - t0, 2), worker=worker_info(),
               finished=time.strftime("%Y-%m-%d %H:%M:%S"), git=git_revision())
    atomic_write_json(result_path(out_p, spec["id"]), res)
    return res


# ----------------------------------------------------------------------------- prepare
def _profile(sc, cfg: dict) -> str:
    from helios_rl.env.profile import ensure_profile

    kwargs = {"min_tokens": cfg["calib_min_tokens"]} if cfg["calib_min_tokens"] != 1000 else {}
    return str(ensure_profile(sc, **kwargs))


def _context(env, sc) -> Any:
    key = (sc.path, id(env))
    if key not in _CTX:
        from helios_rl.controllers import ControllerContext
        from helios_rl.evaluation.profiling import ensure_repository
        from helios_rl.evaluation.runtime import ModelLoader, Timer

        loader = ModelLoader(sc.engine.device, sc.engine.dtype, sc.exits.heads)
        profiles = ensure_repository(sc, loader, Timer(sc.backend.timing), lambda s: None)
        _CTX[key] = ControllerContext.for_scenario(env.scenario, profiles)
    return _CTX[key]


def _env(path: str, backend: str, profile: str):
    key = (path, backend, profile)
    if key not in _ENVS:
        from helios_rl.env.env import HeliosServingEnv

        # live: what goodput reads (free-running agreement; the perplexity where an SLO floors it), as compare;
        # the simulator ignores it
        _ENVS[key] = HeliosServingEnv(path, backend=backend, profile=profile, score="agreement")
    return _ENVS[key]


def static_grid(env, admissible) -> list[tuple[str, int, int, float]]:
    """The best-static search's grid on ``env``: every (model, depth bucket, batch cap, exit setting) an agent can
    choose (the caps of its action space: powers of two up to the scenario's cap) and, for each (model, depth),
    the admissible batch itself. Every config an agent could hold for a whole episode is a candidate, so a policy
    that learns one fixed action cannot beat best-static by finding a cap the search skipped (where the SLO binds
    the best cap can be a tenth of the admissible batch)."""
    grid = []
    for model in env.models:
        depths = env.depth_values[model] if isinstance(env.depth_values, dict) else env.depth_values
        for depth in depths:
            adm = admissible(model, depth)
            if adm < 1 or depth > env.L[model]:
                continue
            for batch in sorted({b for b in env.batch_values if b <= adm} | {adm}):
                grid += [(model, int(depth), int(batch), float(setting)) for setting in env.thresholds]
    return grid


def search_static(env, ctx, points: list, seeds: list[int], finalists: int) -> tuple[dict, list[dict]]:
    """The best static config by racing: every point of ``points`` (StaticParams) on the first development seed,
    the ``finalists`` best of them on every seed; the best mean wins. Returns (best, table): each table row has
    the point's first-seed goodput (``screen_goodput_tps``) and, for finalists, ``goodput_tps`` over all seeds."""
    from helios_rl.agents.compare import run_episode
    from helios_rl.controllers.static import StaticController

    table = [{"point": {k: getattr(p, k) for k in ("model", "depth", "max_batch", "setting")},
              "screen_goodput_tps": run_episode(env, StaticController(ctx, p), seeds[0])["goodput_tps"]}
             for p in points]
    order = sorted(range(len(points)), key=lambda i: -table[i]["screen_goodput_tps"])[:max(1, finalists)]
    for i in order:
        rest = [run_episode(env, StaticController(ctx, points[i]), s)["goodput_tps"] for s in seeds[1:]]
        table[i]["goodput_tps"] = (table[i]["screen_goodput_tps"] + sum(rest)) / len(seeds)
    best = max((table[i] for i in order), key=lambda r: r["goodput_tps"])
    return {"point": best["point"], "goodput_tps": best["goodput_tps"]}, table


def _prepare(spec: dict, cfg: dict, out: Path) -> dict:
    """Calibrate, resolve the SLOs, and search the best static config and the tuned AIMD rule on development
    seeds (simulator)."""
    from helios_rl.controllers.aimd import AimdController
    from helios_rl.controllers.params import StaticParams, params_dict
    from helios_rl.scenario import load_scenario, slo_record

    sc = load_scenario(spec["scenario"])
    profile = _profile(sc, cfg)
    env = _env(spec["scenario"], "sim", profile)
    ctx = _context(env, sc)
    seeds = [dev_seed(s, "best-static search") for s in dev_eval_seeds(cfg["best_static_seeds"])]
    grid = [StaticParams(model=m, depth=d, max_batch=b, setting=t) for m, d, b, t in static_grid(env, ctx.admissible)]
    best, table = search_static(env, ctx, grid, seeds, cfg["best_static_points"])
    out = {"profile": profile, "slo": slo_record(env.scenario, load_scenario(spec["scenario"]), env.slo_reference),
           "best_static": best, "best_static_seeds": seeds, "best_static_grid": table}
    if "tuned-aimd" in cfg["baselines"]:
        aimd = [{"point": params_dict(pt), "goodput_tps": _mean_goodput(env, AimdController(ctx, pt), seeds)}
                for pt in aimd_grid(env, ctx, sc.params("aimd"))]
        out.update(tuned_aimd=max(aimd, key=lambda r: r["goodput_tps"]), tuned_aimd_grid=aimd)
    return out


def _mean_goodput(env, controller, seeds: list[int]) -> float:
    """``controller``'s goodput on ``env`` averaged over workload ``seeds``."""
    from helios_rl.agents.compare import run_episode

    return sum(run_episode(env, controller, s)["goodput_tps"] for s in seeds) / len(seeds)


AIMD_KNOBS = {"increase": (1, 2, 4), "hold": (0, 2, 8), "headroom": (0.8, 0.95), "signal": ("tpot_p95", "step_time")}


def aimd_grid(env, ctx, base) -> list[Any]:
    """``tuned-aimd``'s search space: the rule (``base``: the scenario's AIMD params) on every model that fits,
    at its own depth rule and at full depth, at every exit setting of the scenario, crossed with
    :data:`AIMD_KNOBS` (additive step, decisions a new cap is held, TPOT headroom, TPOT signal)."""
    import itertools
    from dataclasses import replace

    from helios_rl.controllers.aimd import AimdController

    grid = []
    for model in env.models:
        if ctx.admissible(model, 1) < 1:
            continue
        ruled = AimdController(ctx, replace(base, model=model, depth=None))._plan()[1]
        depths = [d for d in sorted({ruled, ctx.profile(model).num_layers}) if ctx.admissible(model, d) >= 1]
        for depth, setting, *knobs in itertools.product(depths, env.thresholds, *AIMD_KNOBS.values()):
            grid.append(replace(base, model=model, depth=int(depth), setting=float(setting),
                                **dict(zip(AIMD_KNOBS, knobs))))
    return grid


# ----------------------------------------------------------------------------- train
def _train(spec: dict, cfg: dict, out: Path) -> dict:
    from helios_rl.agents.train import train

    prep = load_result(out, f"prepare/{Path(spec['scenario']).stem}")
    if prep is None:
        raise RuntimeError(f"{spec['id']}: its scenario was not prepared")
    m = train(spec["scenario"], str(Path(cfg["agents_dir"]) / f"{spec['agent']}.yaml"), seed=spec["seed"],
              backend="sim", timesteps=cfg["timesteps"], out=str(out / "runs"), profile=prep["profile"],
              progress=False, say=lambda s: None, wandb_group=out.name)
    return {"run_dir": m["run_dir"], "metrics": {k: v for k, v in m.items() if isinstance(v, (int, float, str))}}


# ----------------------------------------------------------------------------- eval
def _eval(spec: dict, cfg: dict, out: Path) -> dict:
    """Every method on one test seed, in an order rotated by the seed (interleaved across shards)."""
    from helios_rl.agents.compare import run_episode
    from helios_rl.controllers import make_controller
    from helios_rl.controllers.aimd import AimdController
    from helios_rl.controllers.params import StaticParams, parse_params
    from helios_rl.controllers.policy import load_policy
    from helios_rl.controllers.static import StaticController
    from helios_rl.scenario import load_scenario

    if not is_test_seed(spec["seed"]):
        raise ValueError(f"{spec['id']}: reported figures use test seeds only, got {spec['seed']}")
    sc = load_scenario(spec["scenario"])
    name = Path(spec["scenario"]).stem
    prep = load_result(out, f"prepare/{name}")
    env = _env(spec["scenario"], spec["backend"], prep["profile"])
    ctx = _context(env, sc)
    methods: list[tuple[str, str, Any]] = []  # (method, run label, controller)
    for b in cfg["baselines"]:
        if b == "best-static":
            methods.append((b, "0", StaticController(ctx, StaticParams(**prep["best_static"]["point"]))))
        elif b == "tuned-aimd":
            if "tuned_aimd" not in prep:
                raise RuntimeError(f"{spec['id']}: prepare/{name} did not tune AIMD (its run had no tuned-aimd)")
            methods.append((b, "0", AimdController(ctx, parse_params("aimd", prep["tuned_aimd"]["point"]))))
        else:
            methods.append((b, "0", make_controller(b, ctx, sc.params(b))))
    for agent in cfg["agents"]:
        for k in range(cfg["train_seeds"]):
            tr = load_result(out, f"train/{name}/{agent}/{k}")
            if tr is None:
                raise RuntimeError(f"{spec['id']}: training trial train/{name}/{agent}/{k} has no result")
            methods.append((agent, str(k), load_policy(tr["run_dir"], ctx)))
    shift = spec["seed"] % len(methods)
    order = methods[shift:] + methods[:shift]
    episodes = {}
    for method, run, ctrl in order:
        ep = run_episode(env, ctrl, spec["seed"])
        episodes[f"{method}#{run}"] = {k: ep[k] for k in ("goodput_tps", "reward", "tokens_per_s", "ttft_p95",
                                                          "tpot_p95", "served", "requests", "switches", "agreement",
                                                          "agreement_source", "failure", "behaviour", "drift",
                                                          "good_tokens", "elapsed_s", "slo_window_s",
                                                          "goodput_elapsed_tps", "good_token_share")}
    return {"scenario": name, "backend": spec["backend"], "seed": spec["seed"], "repeat": spec["repeat"],
            "timing": env.scenario.backend.timing if spec["backend"] == "live" else "sim",
            "order": [f"{m}#{r}" for m, r, _ in order], "episodes": episodes}
