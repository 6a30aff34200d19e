"""CLI sub-commands (see helios_rl/cli.py)."""
