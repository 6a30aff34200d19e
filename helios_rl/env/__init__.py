"""Gymnasium environment over the serving loop (live engine or calibrated simulator).

Importing this package registers ``helios_rl/Serving-Live-v0`` and ``helios_rl/Serving-Sim-v0``
without importing torch; the environment classes load on first use::

    import gymnasium, helios_rl.env
    env = gymnasium.make("helios_rl/Serving-Sim-v0", scenario="envs/helios-paper.yaml", profile="p.json")
"""

from __future__ import annotations

import gymnasium

_ENTRY = "helios_rl.env.env:HeliosServingEnv"

for _id, _kind in (("helios_rl/Serving-Live-v0", "live"), ("helios_rl/Serving-Sim-v0", "sim")):
    if _id not in gymnasium.registry:
        gymnasium.register(id=_id, entry_point=_ENTRY, kwargs={"backend": _kind}, disable_env_checker=True)


def __getattr__(name: str):
    if name == "HeliosServingEnv":
        from helios_rl.env.env import HeliosServingEnv

        return HeliosServingEnv
    if name in ("SimBackend",):
        from helios_rl.env.sim import SimBackend

        return SimBackend
    if name in ("LiveBackend",):
        from helios_rl.env.live import LiveBackend

        return LiveBackend
    if name in ("SimProfile", "ProfileError"):
        from helios_rl.env import profile

        return getattr(profile, name)
    raise AttributeError(name)


__all__ = ["HeliosServingEnv", "SimBackend", "LiveBackend", "SimProfile", "ProfileError"]
