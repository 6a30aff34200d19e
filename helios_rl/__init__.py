"""helios_rl: learned control of early-exit LLM serving.

Layers (top to bottom): workload -> server / env -> controllers -> engine -> models.
See README.md and the design notes for the picture.
"""

__version__ = "0.1.0"
