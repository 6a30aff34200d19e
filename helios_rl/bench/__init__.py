"""Benchmark suites: plan, trials on Ray Tune, leaderboard (``helios-rl benchmark``)."""
