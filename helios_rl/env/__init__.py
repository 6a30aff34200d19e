"""Gymnasium environment over the serving loop (live engine or calibrated simulator).

Importing this package registers ``helios_rl/Serving-Live-v0`` and ``helios_rl/Serving-Sim-v0`` (and
their ``...Flat-v0`` variants with a Discrete action space) without importing torch; the environment
classes load on first use. With no arguments they serve the embedded default scenario, the sim backend
on its cached profile (calibrated on first use)::

    import gymnasium, helios_rl.env
    env = gymnasium.make("helios_rl/Serving-Sim-v0", scenario="envs/helios-paper.yaml", profile="p.json")
"""

from __future__ import annotations

import gymnasium

_ENTRY = "helios_rl.env.env:HeliosServingEnv"

# The Flat variants give a Discrete space over feasible (model, depth, batch, threshold) tuples, for
# algorithms without action masking or MultiDiscrete support (DQN).
ENV_IDS = {("live", "multi"): "helios_rl/Serving-Live-v0", ("sim", "multi"): "helios_rl/Serving-Sim-v0",
           ("live", "flat"): "helios_rl/Serving-LiveFlat-v0", ("sim", "flat"): "helios_rl/Serving-SimFlat-v0"}

for (_kind, _mode), _id in ENV_IDS.items():
    if _id not in gymnasium.registry:
        gymnasium.register(id=_id, entry_point=_ENTRY, kwargs={"backend": _kind, "action_mode": _mode},
                           disable_env_checker=True)


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


__all__ = ["ENV_IDS", "HeliosServingEnv", "SimBackend", "LiveBackend", "SimProfile", "ProfileError"]
