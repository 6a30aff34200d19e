"""Markdown report of an evaluation (``results.md``)."""

from __future__ import annotations

import math
from typing import Any

from helios_rl.utils.provenance import short_revision

MIB = 1 << 20

COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("tokens_per_s", "tok/s", "{:.1f}"),
    ("requests_per_s", "req/s", "{:.3f}"),
    ("goodput_rps", "goodput req/s", "{:.3f}"),
    ("slo_attainment", "SLO met", "{:.0%}"),
    ("ttft_p50", "TTFT p50", "{:.2f}"),
    ("ttft_p95", "TTFT p95", "{:.2f}"),
    ("ttft_p99", "TTFT p99", "{:.2f}"),
    ("tpot_p50", "TPOT p50", "{:.3f}"),
    ("tpot_p95", "TPOT p95", "{:.3f}"),
    ("tpot_p99", "TPOT p99", "{:.3f}"),
    ("batch_mean", "batch mean", "{:.1f}"),
    ("batch_max", "batch max", "{:.0f}"),
    ("batch_cap_max", "batch cap", "{:.0f}"),
    ("resident_mean_bytes", "resident MiB", "mib"),
    ("energy_j", "energy J", "{:.1f}"),
    ("tokens_per_joule", "tok/J", "{:.2f}"),
    ("agreement", "agreement", "{:.3f}"),
    ("teacher_forced_agreement", "agr. (teacher-forced)", "{:.3f}"),
    ("reference_ppl", "ref. ppl", "{:.2f}"),
    ("switches", "switches", "{:.0f}"),
    ("loads", "loads", "{:.0f}"),
)


def _fmt(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if fmt == "mib":
        return f"{value / MIB:.0f}"
    return fmt.format(value)


def metrics_table(per_controller: dict[str, dict]) -> str:
    head = "| controller | " + " | ".join(label for _, label, _ in COLUMNS) + " |"
    sep = "|---" * (len(COLUMNS) + 1) + "|"
    rows = [head, sep]
    for name, m in per_controller.items():
        cells = []
        for key, _, fmt in COLUMNS:
            cell = _fmt(m.get(key), fmt)
            if f"{key}_std" in m and cell != "-" and fmt != "mib":
                cell += f" ± {_fmt(m[f'{key}_std'], fmt)}"
            cells.append(cell)
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def markdown_report(results: dict[str, Any]) -> str:
    m = results.get("machine", {})
    lines = [f"# Evaluation: {results['scenario']}", "",
             f"- scenario: `{results['scenario_path']}`; seeds {results['seeds']}; run `{results.get('run_name')}`",
             f"- date {results['date']}; git {short_revision(results.get('git'))}",
             f"- machine: {m.get('cpu')} ({m.get('cores')} cores, {m.get('torch_threads')} torch threads, "
             f"GPU: {m.get('gpu') or 'none'}, load avg {m.get('load_avg')})",
             f"- time: virtual clock advanced by each step's measured cost (`{results['timing']}` timing); "
             f"controller interval {results['interval_s']} s",
             f"- energy: {results.get('energy_method')}",
             "- latencies in seconds; agreement = share of served tokens equal to the serving model's own "
             "full-depth greedy continuation (free-running); agr. (teacher-forced) = equal to its greedy "
             "choice on the same prefix; ref. ppl = perplexity of the served text under the scenario's "
             "reference model", "",
             metrics_table(results["controllers"]), ""]
    if results.get("summary"):
        lines += ["## Summary", ""]
        lines += [f"- `{k}`: {_fmt(v, '{:.3f}') if isinstance(v, float) else v}" for k, v in results["summary"].items()]
        lines.append("")
    if results.get("best_static_grid"):
        lines += ["## best-static grid (hindsight)", "",
                  "| seed | model | depth | batch cap | tok/s | batch max | resident MiB | TPOT p50 | agreement | agr. (t.-f.) | floor |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for g in results["best_static_grid"]:
            lines.append(f"| {g['seed']} | {g['model']} | {g['depth']} | {g.get('batch_cap_max', '-')} | "
                         f"{_fmt(g['tokens_per_s'], '{:.1f}')} | {g.get('batch_max', '-')} | "
                         f"{_fmt(g.get('resident_mean_bytes'), 'mib')} | {_fmt(g.get('tpot_p50'), '{:.3f}')} | "
                         f"{_fmt(g['agreement'], '{:.3f}')} | {_fmt(g.get('teacher_forced_agreement'), '{:.3f}')} | "
                         f"{'ok' if g['meets_floor'] else 'below'} |")
        lines.append("")
    for name, log in results.get("decisions", {}).items():
        if name == "helios" and log:
            lines += ["## HELIOS decisions (seed 0)", ""]
            lines += [f"- t={e['t']:.2f}s {e['event']}: " + ", ".join(f"{k}={v}" for k, v in e.items()
                                                                   if k not in ("t", "event")) for e in log[:40]]
            lines.append("")
    if results.get("plots"):
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in results["plots"]] + [""]
    return "\n".join(lines)
