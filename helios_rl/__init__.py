"""helios_rl: learned control of early-exit LLM serving.

Layers (top to bottom): workload -> server / env -> controllers -> engine -> models.
See README.md and the design notes for the picture.
"""

__version__ = "0.1.0"

try:  # register the Gymnasium environments (helios_rl/Serving-Live-v0, -Sim-v0); gymnasium only, no torch
    import helios_rl.env  # noqa: F401,E402
except ImportError:  # the "rl" extra is not installed
    pass
