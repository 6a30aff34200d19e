"""Evaluation: replay a scenario's workload against controllers on the real engine and report.

    from helios_rl.scenario import Scenario
    from helios_rl.evaluation import evaluate
    results = evaluate(Scenario.from_yaml("envs/helios-paper.yaml"), "runs/x")
"""

from helios_rl.evaluation.harness import Evaluation, evaluate, run_name
from helios_rl.evaluation.replay import ReplayResult, replay
from helios_rl.evaluation.runtime import ModelLoader, Timer, VirtualClock

__all__ = ["Evaluation", "ModelLoader", "ReplayResult", "Timer", "VirtualClock", "evaluate", "replay", "run_name"]
