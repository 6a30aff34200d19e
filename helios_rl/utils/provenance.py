"""What made a result: git revision, package versions, the command line (recorded with every output)."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

PACKAGES = ("helios-rl", "torch", "transformers", "gymnasium", "stable-baselines3", "sb3-contrib", "wandb", "numpy")


def git_revision() -> str | None:
    """The checkout's commit (None outside a git checkout)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in packages:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def command_line() -> str:
    """This process's command, as a user would type it (``helios-rl ...`` for the console script)."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name == "helios-rl":
        argv[0] = "helios-rl"
    return " ".join(shlex.quote(a) for a in argv)
