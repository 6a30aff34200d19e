"""Trained early-exit heads: data, distillation, calibration, persistence, profiling and reports (issue #3)."""

from helios_rl.exits.heads_io import ExitHeadsError, attach_heads, enabled_layers, load_exit_heads

__all__ = ["ExitHeadsError", "attach_heads", "enabled_layers", "load_exit_heads"]
