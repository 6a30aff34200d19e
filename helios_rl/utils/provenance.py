"""What made a result: git revision, package versions, the command line (recorded with every output)."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

PACKAGES = ("helios-rl", "torch", "transformers", "gymnasium", "stable-baselines3", "sb3-contrib", "wandb", "numpy")


def git_revision(path: str | Path | None = None) -> str | None:
    """The commit of the checkout holding ``path`` (default: this package), with ``+dirty`` when tracked
    files differ from it (the code that ran is then not that commit); None outside a git checkout."""
    here = Path(path) if path is not None else Path(__file__).parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        if not rev:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + "+dirty" if dirty else rev
    except (OSError, subprocess.SubprocessError):
        return None


def short_revision(rev: str | None) -> str:
    """A revision as printed in reports: 12 hex digits, ``+dirty`` kept."""
    if not rev:
        return str(rev)
    sha, _, rest = str(rev).partition("+")
    return sha[:12] + ("+" + rest if rest else "")


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
