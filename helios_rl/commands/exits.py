"""``helios-rl tune-exits`` (train + calibrate exit heads) and ``helios-rl exits report`` (tuned vs shared)."""

from __future__ import annotations

import argparse
from pathlib import Path


def _layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers must be comma-separated integers, got {text!r}") from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune-exits", help="train exit heads by distillation and calibrate their thresholds")
    p.add_argument("model", help="bundled name, local folder, .gguf file or hub id")
    p.add_argument("--layers", type=_layers, default=None,
                   help="comma-separated 0-based exit layers (default: pick the fastest calibrated cascade of "
                        "--max-layers among candidates spread over the upper stack)")
    p.add_argument("--tokens", type=int, default=16384, help="tokens of real text (train + held-out)")
    p.add_argument("--generated", type=int, default=8192,
                   help="tokens of the model's own greedy continuations of train-split prompts (0: none)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rank", type=int, default=64, help="adapter rank")
    p.add_argument("--vocab", type=int, default=-1,
                   help="exit vocabulary size (0: full vocabulary; default: V/8 clamped to 8192..32768)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--target", type=float, default=0.95,
                   help="the default precision target (what 'threshold: calibrated' serves)")
    p.add_argument("--targets", default="0.99,0.95,0.9,0.8",
                   help="precision targets to calibrate, each with its own fastest exit layers")
    p.add_argument("--mode", default="per_layer", choices=("per_layer", "overall"))
    p.add_argument("--max-layers", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="heads folder (default: <model folder>/exit_heads)")
    p.add_argument("--feature-cache", default=None, help="folder to keep/reuse the extracted features")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--plot", default=None, help="also write the report plot to this PNG")
    p.add_argument("--free-running-prompts", type=int, default=8,
                   help="held-out prompts served per target to measure free-running agreement (0: skip)")
    p.add_argument("--reproduce", nargs="?", const="shipped", default=None, metavar="HEADS",
                   help="rerun from a heads folder's manifest (default: the heads shipped for MODEL) into --out "
                        "and compare layers and thresholds per target; exit 1 on a difference")
    p.add_argument("--tolerance", type=float, default=None,
                   help="with --reproduce: allowed threshold / exit-rate difference (default 0.02)")
    p.set_defaults(func=run_tune)

    e = sub.add_parser("exits", help="inspect trained exit heads")
    esub = e.add_subparsers(dest="exits_command", required=True, metavar="SUBCOMMAND")
    r = esub.add_parser("report", help="per-layer coverage and precision, shared vs tuned head (table + PNG)")
    r.add_argument("model", help="bundled name or model folder")
    r.add_argument("--heads", default=None, help="heads folder (default: <model folder>/exit_heads)")
    r.add_argument("--out", default=None, help="PNG path (default: <heads folder>/report.png)")
    r.set_defaults(func=run_report)


def run_tune(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console

    from helios_rl.exits.report import plot_report, print_report
    from helios_rl.exits.tune import TuneSettings, tune_exits
    from helios_rl.models.registry import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, device=args.device, heads="shared")
    console = Console()
    if args.reproduce is not None:
        return _reproduce(args, model, console)
    targets = tuple(float(t) for t in args.targets.split(",") if t.strip())
    settings = TuneSettings(layers=args.layers, tokens=args.tokens, generated=args.generated, seq_len=args.seq_len,
                            rank=args.rank,
                            vocab=args.vocab, epochs=args.epochs, target=args.target, targets=targets, mode=args.mode,
                            max_layers=args.max_layers, seed=args.seed,
                            free_running_prompts=args.free_running_prompts)
    manifest = tune_exits(model, settings, out=args.out, feature_cache=args.feature_cache)
    print_report(manifest, console)
    png = plot_report(manifest, args.plot or Path(manifest["path"]) / "report.png")
    console.print(f"heads saved to {manifest['path']}; plot {png}")
    return 0


def _reproduce(args, model, console) -> int:
    import json
    import tempfile

    from rich.table import Table

    from helios_rl.exits.heads_io import shipped_heads_dir
    from helios_rl.exits.reproduce import TOLERANCE, reproduce

    source = shipped_heads_dir(model.name) if args.reproduce == "shipped" else Path(args.reproduce)
    if source is None:
        raise ValueError(f"no exit heads ship for {model.name!r}: pass the heads folder to reproduce")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix=f"reproduce-{model.name}-"))
    result = reproduce(model, source, out, args.tolerance if args.tolerance is not None else TOLERANCE,
                       feature_cache=args.feature_cache)
    t = Table(title=f"{model.name}: reproduction of {source} (tolerance {result['tolerance']})")
    for col in ("target", "layers", "reproduced", "max |dthr|", "|d exit rate|", "ok"):
        t.add_column(col, justify="right")
    for key, row in result["targets"].items():
        t.add_row(key, str(row.get("layers")), str(row.get("reproduced_layers")), str(row.get("max_threshold_diff")),
                  str(row.get("exit_rate_diff")), "yes" if row["ok"] else "NO")
    console.print(t)
    (out / "reproduction.json").write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"reproduced heads in {out}; {'identical within tolerance' if result['ok'] else 'DIFFERENT'}")
    return 0 if result["ok"] else 1


def run_report(args: argparse.Namespace) -> int:
    from rich.console import Console

    from helios_rl.exits.heads_io import HEADS_DIRNAME, read_manifest
    from helios_rl.exits.report import plot_report, print_report
    from helios_rl.models.registry import resolve_model

    folder = Path(args.heads) if args.heads else resolve_model(args.model, progress=False) / HEADS_DIRNAME
    manifest = read_manifest(folder)
    if "metrics" not in manifest:
        raise ValueError(f"{folder}: manifest has no metrics to report")
    console = Console()
    print_report(manifest, console)
    png = plot_report(manifest, args.out or folder / "report.png")
    console.print(f"plot: {png}")
    return 0
