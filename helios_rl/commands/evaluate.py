"""``helios-rl evaluate SCENARIO.yaml``: replay a scenario against controllers and write a report."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="compare controllers (helios, static, best-static, random) on a scenario")
    p.add_argument("scenario", help="scenario YAML (see envs/README.md)")
    p.add_argument("--controllers", default=None, help="comma-separated (default: the scenario's evaluation.controllers)")
    p.add_argument("--trace", default=None, help="replay arrivals from an Azure-format trace CSV instead")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default: the scenario's)")
    p.add_argument("--out", default=None, help="output folder (default: runs/<scenario>__evaluate__<seed>__<time>)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the scenario's engine.threads)")
    p.add_argument("--timing", choices=("cpu", "wall", "modeled"), default=None,
                   help="how step costs advance the virtual clock (default: the scenario's backend.timing)")
    p.add_argument("--no-plots", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from helios_rl.controllers import CONTROLLERS
    from helios_rl.evaluation.harness import evaluate, run_name
    from helios_rl.evaluation.report import metrics_table
    from helios_rl.scenario import Scenario

    scenario = Scenario.from_yaml(args.scenario)
    if args.trace:
        scenario = scenario.with_trace(args.trace)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        scenario = replace(scenario, engine=replace(scenario.engine, threads=args.threads))
    if args.timing:
        scenario = replace(scenario, backend=replace(scenario.backend, timing=args.timing))
    if args.seeds is not None and args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    controllers = None
    if args.controllers:
        controllers = [c.strip() for c in args.controllers.split(",") if c.strip()]
        for c in controllers:
            if c not in CONTROLLERS:
                raise ValueError(f"--controllers: unknown controller {c!r}; known: {sorted(CONTROLLERS)}")
    out = Path(args.out) if args.out else Path("runs") / run_name(scenario)
    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as bar:
        tasks: dict[str, int] = {}

        def progress(label: str, done: int, total: int) -> None:
            if label not in tasks:
                tasks[label] = bar.add_task(label, total=total)
            bar.update(tasks[label], completed=done, total=total)

        results = evaluate(scenario, out, controllers, args.seeds, progress=progress, plots=not args.no_plots,
                           say=lambda s: console.print(f"[dim]{s}[/]"))
    console.print(metrics_table(results["controllers"]), markup=False)
    for key, value in results["summary"].items():
        console.print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}", markup=False)
    console.print(f"wrote {out / 'results.json'}, {out / 'results.md'}")
    return 0
