"""``helios-rl exits report``: tuned vs shared exit heads on held-out text, as a table and a plot.

Everything shown was measured by ``tune-exits`` on its held-out split and stored in the manifest,
so a report needs neither the model's weights nor any recomputation.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table


def _fmt(x, pct: bool = True) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}"


def report_table(manifest: dict) -> Table:
    """Per candidate layer, shared vs tuned head: share of tokens exited by the layer in a cascade over
    all candidates calibrated to the target, and agreement among them; top-1 agreement; precision at
    equal (stand-alone) coverage; the calibrated threshold where the layer was selected."""
    m = manifest["metrics"]
    target = manifest["thresholds"]["target"]
    casc = m.get("cascade_all", {})
    selected = set(manifest["layers"])
    t = Table(title=f"{manifest['model']['name']}: exit heads on held-out tokens, cascade calibrated to "
                    f"{target:.0%} agreement (max_prob)")
    for col in ("layer", "shared: exited by (prec.)", "tuned: exited by (prec.)", "top-1 shared->tuned",
                "prec. at equal cov.", "thr."):
        t.add_column(col, justify="right")
    thr = manifest["thresholds"]["by_measure"].get("max_prob", {})
    for layer, row in m["per_layer"].items():
        cells = []
        for name in ("shared", "tuned"):
            r = casc.get(name, {}).get("layers", {}).get(layer, {})
            cells.append(f"{_fmt(r.get('coverage'))} ({_fmt(r.get('precision'))})" if r else "-")
        top1 = f"{_fmt(row.get('shared_top1_agreement'))} -> {_fmt(row.get('tuned_top1_agreement'))}"
        eq = (f"{_fmt(row.get('shared_precision_at_coverage'))} -> {_fmt(row.get('tuned_precision_at_coverage'))} "
              f"@{_fmt(row.get('equal_coverage'))}") if "equal_coverage" in row else "-"
        t.add_row(layer, *cells, top1, eq, _fmt(thr.get(layer), pct=False) if int(layer) in selected else "")
    return t


def frontier_table(manifest: dict) -> Table | None:
    """Per precision target: its exit layers, held-out exit rate and precision (teacher-forced, measured
    by ``tune-exits`` against the final layer) and, where measured, the served tokens' free-running
    and teacher-forced agreement with the full model."""
    targets = manifest.get("targets")
    if not targets:
        return None
    t = Table(title=f"{manifest['model']['name']}: exit-rate / agreement frontier per precision target")
    for col in ("target", "exit layers", "held-out exit rate", "held-out precision", "est. speedup (b=1, modelled)",
                "served exit rate", "free-running agr.", "teacher-forced agr."):
        t.add_column(col, justify="right")
    for key in sorted(targets, key=float, reverse=True):
        r = targets[key]
        h, sv = r.get("heldout", {}), r.get("served", {})
        t.add_row(key, str(r["layers"]) if r["layers"] else "none", _fmt(h.get("exit_rate")), _fmt(h.get("precision")),
                  f"{r.get('estimated_speedup_batch1', 1.0):.3f}x", _fmt(sv.get("exit_rate")),
                  _fmt(sv.get("free_running_agreement")), _fmt(sv.get("teacher_forced_agreement")))
    return t


def summary_lines(manifest: dict) -> list[str]:
    m = manifest["metrics"]
    c = m.get("cascade", {})
    lines = [f"trained exit layers {manifest['layers']} of candidates {manifest.get('candidates')}; at the default "
             f"target {manifest['thresholds']['target']:g}: "
             f"held-out coverage {_fmt(c.get('coverage'))}, overall agreement {_fmt(c.get('agreement'))}; "
             f"estimated batch-1 speedup {m.get('estimated_speedup_batch1')}x",
             f"precision gain vs shared head at equal coverage: {m.get('precision_gain_vs_shared')}x"]
    if "vocab_coverage_heldout" in m:
        lines.append(f"exit vocabulary {manifest['head'].get('vocab_subset')} tokens covers "
                     f"{_fmt(m['vocab_coverage_heldout'])} of the final layer's held-out predictions")
    if "costs_ms" in manifest:
        k = manifest["costs_ms"]
        lines.append(f"batch-1 costs (ms): layer {k['layer']}, exit evaluation {k['exit_eval']}, "
                     f"final LM head {k['final_head']}")
    return lines


def plot_report(manifest: dict, path: str | Path) -> Path:
    """PNG: precision-vs-coverage per layer (tuned solid, shared dashed), and cascade coverage by layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = manifest["metrics"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (layer, row) in enumerate(m["per_layer"].items()):
        c = colors[i % len(colors)]
        a.plot(row["tuned_curve"]["coverage"], row["tuned_curve"]["precision"], color=c, label=f"layer {layer} tuned")
        if "shared_curve" in row:
            a.plot(row["shared_curve"]["coverage"], row["shared_curve"]["precision"], color=c, ls="--", alpha=0.7,
                   label=f"layer {layer} shared")
    a.axhline(manifest["thresholds"]["target"], color="k", lw=0.8, ls=":")
    a.set(xlabel="coverage (share of tokens, most confident first)", ylabel="precision (agreement with final layer)",
          title="stand-alone exit at one layer", ylim=(0, 1.02))
    a.legend(fontsize=7, ncol=2)
    for name, style in (("shared", "--"), ("tuned", "-")):
        rows = m.get("cascade_all", {}).get(name, {}).get("layers", {})
        if rows:
            xs = [int(k) for k in rows]
            b.plot(xs, [r["coverage"] for r in rows.values()], style, marker="o", label=f"{name}: coverage")
            b.plot(xs, [r["precision"] if r["precision"] is not None else float("nan") for r in rows.values()], style,
                   marker="x", label=f"{name}: precision")
    b.set(xlabel="exit layer (0-based)", ylabel="share", ylim=(0, 1.02),
          title=f"cascade over all candidates at {manifest['thresholds']['target']:.0%} target")
    b.legend(fontsize=8)
    fig.suptitle(f"{manifest['model']['name']} exit heads (held-out {m['heldout_tokens']} tokens)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_report(manifest: dict, console: Console | None = None) -> None:
    console = console or Console()
    console.print(report_table(manifest))
    frontier = frontier_table(manifest)
    if frontier is not None:
        console.print(frontier)
    for line in summary_lines(manifest):
        console.print(line)
