"""``helios-rl benchmark``: every trial of a suite on Ray Tune, resumable, then the leaderboard.

Trials run in dependency waves (prepare, train, evaluate) as Ray Tune trials: on a local Ray instance by
default, or an existing cluster with ``address``; the same command runs on a laptop or a cluster.
Actors are reused, so a worker keeps its environments (and live engines) between evaluation shards.
Finished trials are files under ``DIR/trials``: a killed run resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable

from helios_rl.bench.leaderboard import (drift_range, episode_medians, markdown, plots, repro, same_behaviour,
                                        scenario_stats, score_matrices)
from helios_rl.bench.plan import BenchConfig, Trial, config_fingerprint, plan
from helios_rl.bench.trials import load_result, run_trial
from helios_rl.utils.io import atomic_write_json, atomic_write_text


def _tune_wave(trials: list[Trial], cfg: BenchConfig, out: Path, workers: int, say: Callable[[str], None]) -> None:
    """Run ``trials`` (independent of each other) as Ray Tune trials, ``workers`` at a time."""
    from ray import tune
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    cfg_d, out_s = cfg.to_dict(), str(out)
    cwd = os.getcwd()  # relative paths (the suite, --agents-dir, a scenario's trace) mean the driver's folder

    def trainable(config: dict) -> dict:
        if os.path.isdir(cwd):  # Ray Tune starts a trial in its own folder; on a cluster node without it, stay
            os.chdir(cwd)
        res = run_trial(config["trial"], cfg_d, out_s)
        return {"done": 1, "seconds": res.get("seconds", 0.0)}

    specs = [t.to_dict() for t in trials]
    stop = threading.Event()

    def watch(bar, task) -> None:  # progress from the trials' result files (Tune's own output is off)
        while not stop.wait(1.0):
            done = sum(1 for t in trials if load_result(out, t.id) is not None)
            bar.update(task, completed=done)

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bar:
        task = bar.add_task(f"{trials[0].kind} trials", total=len(specs))
        watcher = threading.Thread(target=watch, args=(bar, task), daemon=True)
        watcher.start()
        try:
            tuner = tune.Tuner(
                tune.with_resources(trainable, {"cpu": 1}),
                param_space={"trial": tune.grid_search(specs)},
                tune_config=tune.TuneConfig(max_concurrent_trials=workers, reuse_actors=True),
                run_config=tune.RunConfig(name=f"{trials[0].kind}-{int(time.time())}", storage_path=str(out / "ray"),
                                          verbose=0))
            results = tuner.fit()
        finally:
            stop.set()
            watcher.join()
            bar.update(task, completed=sum(1 for t in trials if load_result(out, t.id) is not None))
    errors = [r.error for r in results if r.error is not None]
    if errors:
        raise RuntimeError(f"{len(errors)} {trials[0].kind} trial(s) failed; first: {errors[0]}")


def claim(out: Path, cfg: BenchConfig, suite: str) -> None:
    """Mark ``out`` as this configuration's run, or refuse a folder that holds another configuration's trials.
    The same configuration but for ``repeat`` is the same run (each repeat is trials of its own); a marker
    written before the fingerprint left ``repeat`` out is recognised by its recorded configuration."""
    marker = out / "benchmark.json"
    if marker.exists():
        old = json.loads(marker.read_text())
        recorded = old.get("config")
        if cfg.fingerprint() not in {old.get("fingerprint"),
                                     config_fingerprint(recorded) if isinstance(recorded, dict) else None}:
            raise ValueError(f"{out} holds a benchmark of another configuration ({old.get('config')}); use another "
                             f"--out or the same options to resume")
    atomic_write_json(marker, {"fingerprint": cfg.fingerprint(), "config": cfg.to_dict(), "suite": suite})


def run_benchmark(cfg: BenchConfig, out: str | Path, suite: str, address: str | None = None, workers: int = 2,
                  say: Callable[[str], None] = print) -> dict:
    """Plan, run (resuming), and write ``leaderboard.json``, ``leaderboard.md`` and plots into ``out``."""
    import ray

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    claim(out, cfg, suite)
    trials = plan(cfg)
    pending = [t for t in trials if load_result(out, t.id) is None]
    say(f"{len(trials)} trials, {len(trials) - len(pending)} already done (resumed)" if len(pending) < len(trials)
        else f"{len(trials)} trials")
    started = False
    if pending:
        ray.init(address=address, num_cpus=None if address else workers, include_dashboard=False,
                 log_to_driver=False, ignore_reinit_error=True)
        started = True
    try:
        for kind in ("prepare", "train", "eval"):
            wave = [t for t in pending if t.kind == kind]
            if wave:
                _tune_wave(wave, cfg, out, workers, say)
        ray_info = {"address": address or "local", "nodes": len(ray.nodes()) if started else None}
    finally:
        if started:
            ray.shutdown()
    return leaderboard(cfg, out, suite, ray_info)


def leaderboard(cfg: BenchConfig, out: Path, suite: str, ray_info: dict | None = None) -> dict:
    """Statistics of every finished evaluation shard; writes the leaderboard files; returns its dict."""
    from helios_rl.evaluation.harness import machine_info
    from helios_rl.utils.provenance import git_revision

    methods = {b: 1 for b in cfg.baselines} | {a: cfg.train_seeds for a in cfg.agents}
    board = {"suite": suite, "run": out.name, "config": cfg.to_dict(), "git": git_revision(),
             "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine_info(), "ray": ray_info or {},
             "scenarios": {}, "summary": {}}
    for sc in cfg.scenarios:
        name = Path(sc).stem
        prep = load_result(out, f"prepare/{name}") or {}
        for backend in cfg.backends:
            per_repeat, drift, medians, windows = [], [], None, []
            for r in range(cfg.repeat):
                shards = [load_result(out, t.id) for t in plan(cfg)
                          if t.kind == "eval" and t.scenario == sc and t.backend == backend and t.repeat == r]
                if not shards or any(s is None for s in shards):
                    continue
                # when each repeat ran (repeats added to a finished run later ran hours apart) and on which hosts
                windows.append({"repeat": r, "finished_first": min(s["finished"] for s in shards),
                                "finished_last": max(s["finished"] for s in shards),
                                "hosts": sorted({s["worker"]["host"] for s in shards}),
                                "git": sorted({str(s.get("git")) for s in shards})})
                drift += [ep["drift"] for s in shards for ep in s["episodes"].values() if ep.get("drift")]
                if medians is None:
                    medians = episode_medians(shards, methods)
                per_repeat.append(scenario_stats(score_matrices(shards, methods), list(cfg.agents),
                                                 list(cfg.baselines), groups=same_behaviour(shards, methods)))
            if not per_repeat:
                continue
            key = f"{name}/{backend}"
            rp = repro(per_repeat) | {"repeat_windows": windows}
            board["scenarios"][key] = {"stats": per_repeat[0], "repro": rp, "slo": prep.get("slo"),
                                       "best_static": prep.get("best_static"), "tuned_aimd": prep.get("tuned_aimd"),
                                       "workers": sorted({h for w in windows for h in w["hosts"]}),
                                       "drift": drift_range(drift),
                                       "episode_medians": medians}
            head = per_repeat[0].get("best_agent_vs_best_baseline_iqm") or {}
            board["summary"][key] = {"best_agent_vs_best_baseline_iqm": head.get("value"), "ci": head.get("ci"),
                                     "best_agent": per_repeat[0]["best_agent"],
                                     "best_baseline": per_repeat[0]["best_baseline"],
                                     "agent_wins": per_repeat[0].get("agent_wins"),
                                     "train_seeds": cfg.train_seeds, "test_seeds": cfg.test_seeds,
                                     "repro_spread": rp["repro_spread"],
                                     "repro_spread_method": rp.get("repro_spread_method"),
                                     "repro_spread_unfloored": rp.get("repro_spread_unfloored"),
                                     "ranking_stable": rp["ranking_stable"],
                                     "strict_ranking_stable": rp.get("strict_ranking_stable")}
    # the code each trial ran (a resumed run may span commits): the leaderboard's own `git` is only the driver's
    done = [load_result(out, t.id) for t in plan(cfg)]
    board["trial_revisions"] = dict(sorted(Counter(str(r.get("git")) for r in done if r is not None).items()))
    board["plots"] = plots(board, out)
    atomic_write_json(out / "leaderboard.json", json.loads(json.dumps(board, default=float)))
    atomic_write_text(out / "leaderboard.md", markdown(board))
    return board
