"""PNG plots of an evaluation: throughput, latency CDFs, exit-layer histograms, config over time.

Each plot shows every controller of the first seed's replays (``results.json`` has all seeds).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from helios_rl.evaluation.replay import ReplayResult


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_all(runs: dict[str, ReplayResult], metrics: dict[str, dict], out: Path) -> list[Path]:
    """Write the four plots into ``out``; returns their paths."""
    return [throughput(runs, metrics, out / "throughput.png"), latency_cdf(runs, out / "latency_cdf.png"),
            exit_histograms(runs, out / "exit_layers.png"), config_timeline(runs, out / "config_timeline.png")]


def throughput(runs: dict[str, ReplayResult], metrics: dict[str, dict], path: Path) -> Path:
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(runs)
    ax1.bar(names, [metrics[n]["tokens_per_s"] for n in names], color="tab:blue", label="tokens/s")
    ax1.set_ylabel("output tokens / s (virtual time)")
    ax1.set_title("throughput")
    for name, res in runs.items():
        ends = sorted(e for r in res.requests if r.finish is not None for e in [r.finish])
        if not res.steps:
            continue
        t = np.asarray([s["t"] for s in res.steps])
        tok = np.asarray([s["tokens"] for s in res.steps], dtype=float)
        bins = np.linspace(0, max(t.max(), ends[-1] if ends else 0) + 1e-9, 30)
        hist, _ = np.histogram(t, bins=bins, weights=tok)
        ax2.plot(bins[:-1], hist / np.diff(bins), label=name)
    ax2.set_xlabel("time (s)")
    ax2.set_ylabel("tokens / s")
    ax2.set_title("throughput over time")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def latency_cdf(runs: dict[str, ReplayResult], path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for name, res in runs.items():
        for ax, attr in zip(axes, ("ttft", "tpot", "latency")):
            vals = np.sort([getattr(r, attr) for r in res.requests if getattr(r, attr) is not None])
            if vals.size:
                ax.step(vals, np.arange(1, vals.size + 1) / vals.size, where="post", label=name)
    for ax, label in zip(axes, ("TTFT (s)", "TPOT (s)", "request latency (s)")):
        ax.set_xlabel(label)
        ax.set_ylabel("CDF")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def exit_histograms(runs: dict[str, ReplayResult], path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, len(runs), figsize=(4.5 * len(runs), 3.6), squeeze=False)
    for ax, (name, res) in zip(axes[0], runs.items()):
        for model, counts in res.exit_counts.items():
            c = np.asarray(counts, dtype=float)
            if c.sum():
                ax.bar(np.arange(c.size), c / c.sum(), alpha=0.6, label=model)
        ax.set_title(name)
        ax.set_xlabel("exit layer (0-based)")
        ax.set_ylabel("share of tokens")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def config_timeline(runs: dict[str, ReplayResult], path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(len(runs), 1, figsize=(11, 2.4 * len(runs)), squeeze=False, sharex=True)
    models = sorted({e["model"] for res in runs.values() for e in res.timeline})
    colors = {m: c for m, c in zip(models, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"))}
    for ax, (name, res) in zip(axes[:, 0], runs.items()):
        tl = res.timeline
        t = [e["t"] for e in tl] + [res.virtual_s]
        for a, b, e in zip(t, t[1:], tl):
            ax.plot([a, b], [e["depth"] / e["num_layers"]] * 2, color=colors.get(e["model"], "k"), lw=3)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("depth / layers")
        ax2 = ax.twinx()
        ax2.step(t[:-1], [e["max_batch"] for e in tl], where="post", color="gray", ls="--", lw=1)
        ax2.set_ylabel("batch cap", color="gray")
        ax.set_title(name, fontsize=9, loc="left")
    handles = [plt.Line2D([0], [0], color=c, lw=3, label=m) for m, c in colors.items()]
    axes[0, 0].legend(handles=handles, fontsize=7, loc="lower right")
    axes[-1, 0].set_xlabel("time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
