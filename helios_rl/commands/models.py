"""``helios-rl models list|prepare``: the bundled offline models and their cache."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list or prepare the bundled offline models")
    msub = p.add_subparsers(dest="models_cmd", required=True, metavar="ACTION")
    ls = msub.add_parser("list", help="known models, their layer counts and whether they are cached")
    ls.set_defaults(func=_list)
    prep = msub.add_parser("prepare", help="convert a bundled model to safetensors in the cache")
    prep.add_argument("name", help="bundled model name (see `helios-rl models list`)")
    prep.add_argument("--force", action="store_true", help="rebuild even if cached")
    prep.set_defaults(func=_prepare)


def _list(args: argparse.Namespace) -> int:
    from helios_rl.models.bundled import bundled_table

    table = Table(title="helios-rl models")
    for col in ("name", "family", "layers", "hidden", "vocab", "installed", "cached", "cache path"):
        table.add_column(col)
    for row in bundled_table():
        table.add_row(row["name"], row["family"], str(row["layers"]), str(row["hidden_size"]), str(row["vocab"]),
                      "yes" if row["installed"] else "no", "yes" if row["cached"] else "no", str(row["cache_path"]))
    Console().print(table)
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from helios_rl.models.bundled import prepare_bundled

    path = prepare_bundled(args.name, force=args.force)
    print(path)
    return 0
