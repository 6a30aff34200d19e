"""Where helios_rl keeps converted models and other caches."""

from __future__ import annotations

import os
from pathlib import Path

from platformdirs import user_cache_dir


def cache_dir() -> Path:
    """Root cache folder: ``$HELIOS_RL_CACHE`` if set, else the user's cache dir."""
    env = os.environ.get("HELIOS_RL_CACHE")
    root = Path(env).expanduser() if env else Path(user_cache_dir("helios_rl"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def models_cache_dir() -> Path:
    """Folder under the cache root that holds one sub-folder per converted model."""
    path = cache_dir() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path
