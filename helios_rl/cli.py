"""``helios-rl`` command line. Each sub-command lives beside the code it drives; this file wires them.

A module that offers commands exposes ``register(subparsers)``; add it to ``COMMAND_MODULES``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = (
    "helios_rl.commands.models",
    "helios_rl.commands.generate",
    "helios_rl.commands.demo",
    "helios_rl.commands.evaluate",
    "helios_rl.commands.serve",
    "helios_rl.commands.train",
    "helios_rl.commands.compare",
    "helios_rl.commands.calibrate",
    "helios_rl.commands.fidelity",
    "helios_rl.commands.exits",
    "helios_rl.commands.benchmark",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="helios-rl", description="Learned control of early-exit LLM serving.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"helios-rl {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
