"""The evaluation harness: the same workload against each controller, on the real engine.

``evaluate(scenario, out_dir)`` builds (or reuses) the model repository, then per seed builds the
workload once and replays it against every controller (virtual clock, see :mod:`.replay`), scores
accuracy against the full models, and writes ``results.json``, ``results.md`` and PNG plots.
``best-static`` is searched in hindsight: every grid point is replayed and the best (by the SLO's
objective, among points that meet the agreement floor) is reported.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from helios_rl.controllers import ControllerContext, make_controller
from helios_rl.controllers.params import params_dict
from helios_rl.controllers.repository import checkpoint_facts
from helios_rl.controllers.static import BestStaticController, StaticController
from helios_rl.evaluation.scorer import ScoreTotals, ServedRequest, ServedScorer
from helios_rl.evaluation.metrics import aggregate, run_metrics, summary
from helios_rl.evaluation.profiling import ensure_repository
from helios_rl.evaluation.replay import ReplayResult, replay
from helios_rl.evaluation.report import markdown_report
from helios_rl.evaluation.runtime import ModelLoader, Timer, set_threads
from helios_rl.scenario import Scenario
from helios_rl.utils.device import parse_dtype, resolve_device
from helios_rl.utils.io import atomic_write_json, atomic_write_text
from helios_rl.utils.provenance import git_revision  # noqa: F401  (re-exported for callers)
from helios_rl.workload.spec import SpecError
from helios_rl.workload.workload import RequestSpec, build_workload, save_requests

Progress = Callable[[str, int, int], None]  # (label, done, total)


def run_name(scenario: Scenario, seed: int | None = None) -> str:
    """CleanRL-style run name: ``<scenario>__evaluate__<seed>__<unix time>``."""
    return f"{scenario.name}__evaluate__{scenario.seed if seed is None else seed}__{int(time.time())}"


def token_counter(scenario: Scenario) -> Callable[[str], int] | None:
    """Counts prompt tokens with the first candidate's tokenizer (None: whitespace words)."""
    from transformers import AutoTokenizer

    from helios_rl.models.registry import resolve_model

    folder = resolve_model(scenario.models[0], progress=False)
    if not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    tok = AutoTokenizer.from_pretrained(folder)
    return lambda text: len(tok(text, add_special_tokens=True)["input_ids"])


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__}
    try:
        info["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def _objective(m: dict, objective: str) -> float:
    if objective == "goodput":
        return m["goodput_rps"]
    if objective == "latency":
        return -m["latency_p50"]
    return m["tokens_per_s"]


class Evaluation:
    """One evaluation: scenario + controllers + seeds -> results (see module docstring)."""

    def __init__(self, scenario: Scenario, controllers: list[str] | None = None, seeds: int | None = None,
                 progress: Progress | None = None, say: Callable[[str], None] = lambda s: None) -> None:
        self.scenario = scenario
        self.controllers = list(controllers or scenario.evaluation.controllers)
        self.seeds = int(seeds or scenario.evaluation.seeds)
        self.progress = progress or (lambda label, done, total: None)
        self.say = say
        self.runs: dict[int, dict[str, ReplayResult]] = {}
        self.metrics: dict[str, list[dict]] = {c: [] for c in self.controllers}
        self.grid: list[dict] = []
        self.workloads: dict[int, list[RequestSpec]] = {}
        self.warnings: list[str] = []

    def prepare(self) -> None:
        """Check the scenario against the models, build the repository and the controller context."""
        sc = self.scenario
        if sc.backend.kind != "live" or sc.backend.clock != "virtual":
            raise sc.error("backend", "evaluate replays on the live engine under the virtual clock "
                           f"(backend.kind: live, backend.clock: virtual); got {sc.backend.kind}/{sc.backend.clock}")
        dev = resolve_device(sc.engine.device)
        elem = torch.tensor([], dtype=parse_dtype(sc.engine.dtype, dev)).element_size()
        self.warnings = sc.check_models({m: checkpoint_facts(m, elem) for m in sc.models})
        for w in self.warnings:
            self.say(f"warning: {w}")
        self.loader = ModelLoader(sc.engine.device, sc.engine.dtype, sc.exits.heads)
        self.timer = Timer(sc.backend.timing)
        self.profiles = ensure_repository(sc, self.loader, self.timer, self.say)
        self.ctx = ControllerContext.for_scenario(sc, self.profiles)
        self.scorer = ServedScorer(ModelLoader(sc.engine.device, sc.engine.dtype, "shared"),
                                   sc.engine.max_model_len + 64, sc.reference_model()) \
            if sc.evaluation.accuracy else None

    def _score(self, res: ReplayResult):
        if self.scorer is None:
            return None
        totals = ScoreTotals()
        for s in self.scorer.score([ServedRequest(r.request_id, r.prompt, r.segments, r.task, r.text)
                                    for r in res.requests]):
            totals.add(s)
        return totals

    def _replay(self, sc: Scenario, ctrl, requests: list[RequestSpec], label: str) -> tuple[ReplayResult, dict]:
        self.progress(label, 0, len(requests))
        res = replay(sc, ctrl, requests, self.loader, self.timer, seed=sc.seed,
                     on_progress=lambda d, t: self.progress(label, d, t))
        self.progress(label + " (accuracy)", len(requests), len(requests))
        return res, run_metrics(res, sc.slo, self._score(res))

    def _best_static(self, sc: Scenario, ctrl: BestStaticController, requests: list[RequestSpec],
                     seed_idx: int) -> tuple[ReplayResult, dict]:
        n = ctrl.grid_params.search_requests
        search = requests[:n] if n else requests
        best = None
        for k, point in enumerate(ctrl.grid()):
            res, m = self._replay(sc, StaticController(self.ctx, point), search,
                                  f"best-static grid {k + 1}: {point.model}@{point.depth} b={point.max_batch or 'max'}")
            ok = m.get("agreement", 1.0) >= sc.slo.agreement_floor
            self.grid.append({"seed": sc.seed, **asdict(point), "objective": _objective(m, sc.slo.objective),
                              "meets_floor": ok, "agreement": m.get("agreement"),
                              "teacher_forced_agreement": m.get("teacher_forced_agreement"),
                              **{k: m[k] for k in ("tokens_per_s", "goodput_rps", "batch_max", "batch_cap_max",
                                                   "resident_mean_bytes", "latency_p50", "tpot_p50")}})
            key = (ok, _objective(m, sc.slo.objective))
            if best is None or key > best[0]:
                best = (key, point, res, m)
        _, point, res, m = best
        ctrl.choose(point)
        if n and n < len(requests):
            res, m = self._replay(sc, ctrl, requests, f"best-static {point.model}@{point.depth} (seed {seed_idx})")
        res.controller = "best-static"
        res.controller_log = [{"t": 0.0, "event": "chosen", **asdict(point)}]
        return res, m

    def build_workloads(self) -> None:
        """The workload of every seed (first, so a bad trace or prompt file fails before any profiling)."""
        from helios_rl.env.backend import require_resolved_slo

        require_resolved_slo(self.scenario, "helios-rl evaluate (absolute SLOs and arrival rates only)")
        count = token_counter(self.scenario)
        for k in range(self.seeds):
            try:
                self.workloads[k] = build_workload(self.scenario.with_seed(k).workload, count_tokens=count)
            except SpecError as exc:
                key, _, msg = str(exc).partition(": ")
                raise self.scenario.error(f"workload.{key}", msg) from None

    def run(self) -> dict[str, Any]:
        self.build_workloads()
        self.prepare()
        sc0 = self.scenario
        for k in range(self.seeds):
            sc = sc0.with_seed(k)
            torch.manual_seed(sc.seed)
            np.random.seed(sc.seed)
            requests = self.workloads[k]
            self.runs[k] = {}
            for name in self.controllers:
                ctrl = make_controller(name, self.ctx, sc.params(name))
                if isinstance(ctrl, BestStaticController):
                    res, m = self._best_static(sc, ctrl, requests, k)
                else:
                    res, m = self._replay(sc, ctrl, requests, f"{name} (seed {sc.seed})")
                self.runs[k][name] = res
                self.metrics[name].append(m)
        if self.scorer is not None:
            self.scorer.close()
        agg = {name: aggregate(ms) for name, ms in self.metrics.items()}
        return {"scenario": sc0.name, "scenario_path": sc0.path, "seeds": [sc0.seed + k for k in range(self.seeds)],
                "controllers": agg, "per_seed": self.metrics, "summary": summary(agg),
                "params": {c: params_dict(sc0.params(c)) for c in self.controllers},
                "repository": {m: {"heads": p.heads, "exit_layers": p.exit_layers, "agreement": p.agreement,
                                   "coverage_0.9": p.coverage_depth(0.9), "step_coef": p.step_coef}
                               for m, p in self.profiles.items()},
                "best_static_grid": self.grid, "warnings": self.warnings,
                "decisions": {c: r.controller_log for c, r in self.runs[0].items()},
                "timing": sc0.backend.timing, "interval_s": sc0.backend.interval_s,
                "energy_method": next(iter(agg.values())).get("energy_method") if agg else None,
                "machine": machine_info(), "git": git_revision(),
                "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def evaluate(scenario: Scenario, out_dir: str | Path, controllers: list[str] | None = None,
             seeds: int | None = None, progress: Progress | None = None, plots: bool = True,
             say: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Run the evaluation and write ``results.json``, ``results.md``, ``workload.jsonl`` and plots."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prev = set_threads(scenario.engine.threads)
    try:
        ev = Evaluation(scenario, controllers, seeds, progress, say)
        results = ev.run()
    finally:
        torch.set_num_threads(prev)
    results["run_name"] = out.name
    save_requests(out / "workload.jsonl", ev.workloads[0])
    if plots:
        from helios_rl.evaluation.plots import plot_all

        first = {name: ev.runs[0][name] for name in ev.controllers}
        results["plots"] = [p.name for p in plot_all(first, results["controllers"], out)]
    atomic_write_json(out / "results.json", _clean(results))
    atomic_write_text(out / "results.md", markdown_report(results))
    return results


def _clean(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf become None, tuples lists, numpy scalars Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if np.isfinite(f) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
