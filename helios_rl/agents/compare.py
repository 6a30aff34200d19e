"""``helios-rl compare``: trained policies against baselines on the same held-out workloads and seeds.

Every method is a controller (``policy:<run>`` via :mod:`helios_rl.controllers.policy`, ``static``,
``helios``, ``random``) driving the same :class:`~helios_rl.env.env.HeliosServingEnv` through
:meth:`~helios_rl.env.env.HeliosServingEnv.step_config`, so all are served by the same backend (live
engine or simulator) and scored by the same reward function. Workload seeds start at
:data:`~helios_rl.env.env.HELDOUT_SEED_BASE`, which training never draws.

Per episode: reward, goodput (output tokens of requests that met the SLO's TTFT and TPOT and the quality floors,
per second of the workload's SLO window: :meth:`~helios_rl.env.env.HeliosServingEnv.slo_window_s`, fixed by the
workload seed and the SLO, so the score is proportional to the good tokens served), goodput over the episode's own
length beside it (not the score: a shorter episode alone raises it), throughput, TTFT/TPOT p95, switches. Per method: IQM of
goodput with a 95 % stratified-bootstrap CI, the ratio of IQMs to ``helios`` with its CI, and the
probability of improvement over ``helios`` (:mod:`helios_rl.agents.stats`).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from helios_rl.utils.io import atomic_write_json, atomic_write_text

BASELINES = ("static", "helios", "aimd", "random", "best-static")


def run_episode(env, controller, seed: int, max_steps: int = 100_000) -> dict[str, Any]:
    """One episode of ``controller`` on ``env`` with workload ``seed``; episode metrics and decisions.

    ``behaviour`` is a digest of the configs the controller kept in force (model, depth, batch cap, exit
    setting) and the control step at which each took over: two controllers with the same digest served the
    episode identically, so any difference between their scores is measurement noise, not a method's. A batch
    cap enters only where it bound while in force (requests waited with the batch at the cap, or rows were
    preempted when it took over): a cap that never held anyone back served exactly as any other such cap (the
    scheduler admits everything waiting either way), so a policy at cap 64 and a static config at cap 32 that
    neither fills are one behaviour. Where it bound, its value is part of the digest."""
    from helios_rl.engine.telemetry import TelemetrySnapshot

    controller.reset(seed)
    first = controller.decide(TelemetrySnapshot(time=0.0))
    if first is None or first.model is None:
        raise ValueError(f"controller {controller.name!r} must return a complete config first")
    init, _ = env.resolve_config(first, env._initial())
    env.reset(seed=seed, options={"config": init})
    reward, good, steps, switches = 0.0, 0, 0, 0
    agree_sum, agree_tokens = 0.0, 0
    early, exited_total = 0, 0
    terms: dict[str, float] = {}
    configs = [dict(init)]
    info: dict = {}
    prev = dict(init)
    tenures = [[0, _config_key(init), False]]  # (control step, config, whether its cap bound) at each change
    for _ in range(max_steps):
        cfg = controller.decide(env.last_snapshot)
        running_before = env.last_snapshot.running
        _, r, term, trunc, info = env.step_config(cfg)
        reward += r
        good += info["goodput_tokens"]
        steps += 1
        tel = info["telemetry"]
        counts = tel.get("exit_counts") or []
        exited_total += int(sum(counts))
        early += int(sum(counts[: max(0, tel.get("num_layers", len(counts)) - 1)]))  # before the model's last layer
        scored = (info.get("scored") or {}).get("tokens", 0)
        if info.get("agreement") is not None and scored:
            agree_sum, agree_tokens = agree_sum + info["agreement"] * scored, agree_tokens + scored
        for k, v in info["reward_terms"].items():
            terms[k] = terms.get(k, 0.0) + v
        now = info["config"]
        key = _config_key(now)
        if key != tenures[-1][1]:  # rows beyond the new cap were preempted: the cap bound at once
            tenures.append([steps, key, running_before > tel["max_batch"]])
        if tel["cap_waits"]:
            tenures[-1][2] = True
        if (now["model"], now["depth"]) != (prev["model"], prev["depth"]):
            switches += 1
            configs.append({"t": env.backend.now, **now})
        prev = dict(now)
        if term or trunc:
            break
    summ = info.get("episode_summary") or env.backend.summary()
    elapsed = summ["elapsed_s"] or 1e-9
    window = env.slo_window_s(seed)
    out_tokens = summ.get("output_tokens") or 0
    return {"seed": seed, "reward": reward, "reward_terms": terms,
            "goodput_tps": good / window,  # the score: good tokens over the workload's SLO window (fixed per seed)
            "slo_window_s": window, "good_tokens": good,
            # over the episode's own length: gameable on a closed workload (a shorter episode alone raises it)
            "goodput_elapsed_tps": good / elapsed,
            "good_token_share": good / out_tokens if out_tokens else 0.0,  # of the tokens served, the share served well
            "tokens_per_s": summ["tokens_per_s"], "ttft_p95": summ["ttft_p95"], "tpot_p95": summ["tpot_p95"],
            "served": summ["served"], "requests": summ["requests"], "elapsed_s": summ["elapsed_s"], "steps": steps,
            "switches": switches, "configs": configs, "failure": info.get("failure"),
            "agreement": agree_sum / agree_tokens if agree_tokens else None,
            "early_exit_share": early / exited_total if exited_total else 0.0,
            "agreement_source": "measured" if env.kind == "live" else "predicted", "drift": summ.get("drift"),
            "behaviour": _behaviour_digest(tenures)}


def _config_key(cfg: dict) -> list:
    return [cfg[k] for k in ("model", "depth", "batch", "threshold")]


def _behaviour_digest(tenures: list) -> str:
    """The digest of an episode's configs in force (see :func:`run_episode`): a cap that never bound is left
    out, and consecutive configs that then read the same are one. The config set at reset serves no interval
    when the first decision replaces it at step 1; without a model or depth switch (which costs time) it is no
    behaviour, so a policy whose first action is best-static's config and a static controller read the same."""
    if len(tenures) > 1 and tenures[1][0] == 1 and tenures[0][1][:2] == tenures[1][1][:2]:
        tenures = [[0, *tenures[1][1:]], *tenures[2:]]
    served_as: list[list] = []
    for start, (model, depth, batch, setting), bound in tenures:
        key = [model, depth, batch if bound else None, setting]
        if not served_as or served_as[-1][1:] != key:
            served_as.append([start, *key])
    return hashlib.sha256(json.dumps(served_as, default=float).encode()).hexdigest()[:16]


def _context(sc, env, backend: str, say):
    from helios_rl.controllers import ControllerContext
    from helios_rl.evaluation.profiling import ensure_repository
    from helios_rl.evaluation.runtime import ModelLoader, Timer

    if backend == "live":
        loader, timer = env.backend.loader, env.backend.timer
    else:
        loader, timer = ModelLoader(sc.engine.device, sc.engine.dtype, sc.exits.heads), Timer(sc.backend.timing)
    profiles = ensure_repository(sc, loader, timer, say)
    return ControllerContext.for_scenario(sc, profiles)


def compare(env: str | None, policies: list[str], baselines: list[str], seeds: int = 5, backend: str = "live",
            trace: str | None = None, trace_start_s: float | None = None, out: str | Path = "runs/compare",
            profile: str | None = "auto", reps: int = 2000, progress: bool = True,
            say: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> dict[str, Any]:
    """Evaluate ``policies`` (run folders) and ``baselines`` on ``seeds`` held-out workloads; write
    ``results.json``, ``results.md`` and plots into ``out``."""
    from dataclasses import replace

    from helios_rl.agents.stats import method_stats
    from helios_rl.controllers import make_controller
    from helios_rl.controllers.policy import load_policy
    from helios_rl.env.env import HELDOUT_SEED_BASE, HeliosServingEnv
    from helios_rl.evaluation.harness import _clean, git_revision, machine_info
    from helios_rl.evaluation.runtime import set_threads
    from helios_rl.scenario import load_scenario, slo_record

    if backend not in ("sim", "live"):
        raise ValueError(f"--backend must be 'sim' or 'live', got {backend!r}")
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ValueError(f"--baselines: unknown baseline(s) {unknown}; known: {list(BASELINES)}")
    if "best-static" in baselines:
        raise ValueError("--baselines: best-static is a hindsight search of `helios-rl evaluate`, not a controller "
                         "for compare; use static, helios, aimd, random")
    if not policies and not baselines:
        raise ValueError("nothing to compare: give --policies and/or --baselines")
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    sc = load_scenario(env)
    if trace:
        sc = sc.with_trace(trace)
        if trace_start_s is not None:  # a held-out segment of the trace
            sc = replace(sc, workload=replace(sc.workload, arrival=replace(sc.workload.arrival, start_s=trace_start_s)))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prev_threads = set_threads(sc.engine.threads)
    if profile in (None, "auto"):
        from helios_rl.env.profile import ensure_profile

        profile = str(ensure_profile(sc, say=say))
    # the live backend measures what goodput reads (free-running agreement; the reference perplexity where the
    # SLO floors it): the secondary figures cost a full-depth pass per served output and nothing here reads them
    henv = HeliosServingEnv(sc, backend=backend, profile=profile, score="agreement")
    slo = slo_record(henv.scenario, sc, henv.slo_reference)
    sc = henv.scenario  # relative SLOs resolved on this machine
    seed_list = [HELDOUT_SEED_BASE + k for k in range(seeds)]
    try:
        ctx = _context(sc, henv, backend, say)
        methods: dict[str, Any] = {}
        for p in policies:  # load every policy first: a bad one fails before any serving
            name = f"policy:{Path(p).name}"
            methods[name] = load_policy(p, ctx)
        for b in baselines:
            methods[b] = make_controller(b, ctx, sc.params(b))
        episodes: dict[str, list[dict]] = {m: [] for m in methods}
        total = len(methods) * len(seed_list)
        t0 = time.perf_counter()
        from rich.progress import Progress

        with Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task("compare", total=total)
            for seed in seed_list:
                for name, ctrl in methods.items():
                    bar.update(task, description=f"{name} seed {seed}")
                    ep = run_episode(henv, ctrl, seed)
                    episodes[name].append(ep)
                    say(f"{name} seed {seed}: goodput {ep['goodput_tps']:.2f} tok/s, throughput "
                        f"{ep['tokens_per_s']:.2f} tok/s, reward {ep['reward']:.2f}, {ep['switches']} switches")
                    bar.advance(task)
        wall = time.perf_counter() - t0
    finally:
        henv.close()
        set_threads(prev_threads)

    policy_names = [m for m in methods if m.startswith("policy:")]
    # (runs, test seeds): one row per method here; several trained runs pool as "rl", one row per run
    scores = {m: np.array([[e["goodput_tps"] for e in eps]]) for m, eps in episodes.items()}
    if len(policy_names) > 1:
        scores["rl"] = np.concatenate([scores[m] for m in policy_names], axis=0)
    reference = "helios" if "helios" in scores else next(iter(scores))
    stats = method_stats(scores, reference, reps=reps)
    rewards = {m: float(np.mean([e["reward"] for e in eps])) for m, eps in episodes.items()}
    rl = "rl" if "rl" in scores else (policy_names[0] if policy_names else None)
    summary: dict[str, Any] = {"seeds": len(seed_list), "backend": backend, "reference": reference,
                               "goodput_iqm": {m: s["iqm"] for m, s in stats.items()},
                               "mean_reward": rewards}
    if rl is not None and "helios" in scores:
        summary["rl_vs_helios_iqm"] = stats[rl]["vs_helios_iqm_ratio"]
        summary["rl_vs_helios_ci_low"], summary["rl_vs_helios_ci_high"] = stats[rl]["vs_helios_ci"]
        summary["rl_prob_improvement_vs_helios"] = stats[rl]["prob_improvement_vs_helios"]
    if rl is not None and "static" in scores:
        den = stats["static"]["iqm"]
        summary["rl_vs_static_iqm"] = stats[rl]["iqm"] / den if den > 0 else None
    results = {"scenario": sc.name, "scenario_path": sc.path, "backend": backend, "profile": profile,
               "seeds": seed_list, "policies": policies, "baselines": baselines, "summary": summary, "stats": stats,
               "policy_files": {m: str(c.run.policy_path) for m, c in methods.items() if m.startswith("policy:")},
               "episodes": episodes, "decisions": {m: getattr(c, "log", [])[:200] for m, c in methods.items()},
               "wall_s": round(wall, 1), "machine": machine_info(), "git": git_revision(),
               "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "timing": sc.backend.timing,
               "slo": slo,
               "metric": "goodput_tps: output tokens of requests meeting the SLO (TTFT, TPOT) and the quality "
               "floors (free-running agreement >= slo.agreement_floor, measured on live, predicted on sim), per "
               "second of the workload's SLO window (slo_window_s: latest arrival + TTFT target + (max new tokens "
               "- 1) x TPOT target; fixed per seed). goodput_elapsed_tps: the same tokens per second of the "
               "episode's own length (not the score: on a closed workload a shorter episode alone raises it)"}
    results = _clean(results)
    results["plots"] = [p.name for p in plot_compare(results, out)]
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", markdown(results))
    return results


def markdown(results: dict) -> str:
    s = results["summary"]
    lines = [f"# compare: {results['scenario']} ({results['backend']} backend, {len(results['seeds'])} held-out seeds)",
             "", "| method | goodput IQM (tok/s) | 95 % CI | vs helios (IQM ratio) | 95 % CI | P(improve) | "
             "mean reward | throughput (tok/s) | TTFT p95 (s) | switches | agreement |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m, st in results["stats"].items():
        eps = results["episodes"].get(m, [])
        ratio = st.get("vs_helios_iqm_ratio")
        ci = st.get("vs_helios_ci")

        def f(x, p=2):
            return "-" if x is None else f"{x:.{p}f}"

        mean = (lambda k: float(np.mean([e[k] for e in eps if e.get(k) is not None]))
                if any(e.get(k) is not None for e in eps) else None)
        lines.append(f"| {m} | {f(st['iqm'])} | [{f(st['iqm_ci'][0])}, {f(st['iqm_ci'][1])}] | {f(ratio, 3)} | "
                     + (f"[{f(ci[0], 3)}, {f(ci[1], 3)}]" if ci else "-")
                     + f" | {f(st.get('prob_improvement_vs_helios'))} | {f(mean('reward') if eps else None)} | "
                       f"{f(mean('tokens_per_s') if eps else None)} | {f(mean('ttft_p95') if eps else None)} | "
                       f"{f(mean('switches') if eps else None, 1)} | {f(mean('agreement'), 3)} |")
    lines += ["", "Summary: " + ", ".join(f"`{k}` = {v:.4g}" if isinstance(v, float) else f"`{k}` = {v}"
                                        for k, v in s.items() if not isinstance(v, dict)),
              "", f"Goodput: {results['metric']}. CIs: {next(iter(results['stats'].values()))['ci_method']}.",
              f"Agreement: free-running agreement of the served tokens with the serving model's own full-depth "
              f"output ({'measured' if results['backend'] == 'live' else 'predicted by the simulator'}).", ""]
    return "\n".join(lines)


def plot_compare(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    stats = results["stats"]
    names = list(stats)
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 3.6))
    iq = [stats[m]["iqm"] for m in names]
    lo = [stats[m]["iqm"] - stats[m]["iqm_ci"][0] for m in names]
    hi = [stats[m]["iqm_ci"][1] - stats[m]["iqm"] for m in names]
    ax.bar(range(len(names)), iq, yerr=[lo, hi], capsize=4, color="#4c72b0")
    ax.set_xticks(range(len(names)), [n.replace("policy:", "policy:\n") for n in names], fontsize=7)
    ax.set_ylabel("goodput IQM (tok/s), 95 % CI")
    ax.set_title(f"{results['scenario']}: {len(results['seeds'])} held-out seeds, {results['backend']}")
    fig.tight_layout()
    paths.append(out / "goodput_iqm.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for m, eps in results["episodes"].items():
        ax.plot(range(len(eps)), [e["goodput_tps"] for e in eps], marker="o", label=m)
    ax.set_xlabel("held-out seed")
    ax.set_ylabel("goodput (tok/s)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "goodput_per_seed.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
