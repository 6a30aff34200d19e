"""What a benchmark run consists of: its configuration, and the trials it splits into.

A *trial* is one unit of work with a stable id (so a killed run resumes by skipping the finished ones):

* ``prepare/<scenario>``: calibrate the simulator on the live engine (cached), resolve the scenario's
  relative SLOs on this machine, build the controllers' model repository, and search the best static
  config and the tuned AIMD rule's settings on development seeds in the simulator;
* ``train/<scenario>/<agent>/<seed>``: train one agent in the simulator with one (development) training
  seed;
* ``eval/<scenario>/<backend>/r<repeat>/<test seed>``: one test workload seed, every method in turn
  (baselines and every trained run): methods are interleaved within a shard, so background load on a
  shared machine hits all of them alike.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from helios_rl.seeds import test_seeds

AGENTS = ("ppo", "maskable_ppo", "dqn")
QUICK = ("steady", "exit-lever")
BASELINES = ("static", "best-static", "helios", "aimd", "tuned-aimd", "random")


@dataclass
class BenchConfig:
    """A benchmark's knobs (``--quick`` shrinks them; see :func:`quick`)."""

    scenarios: list[str]
    agents: tuple[str, ...] = AGENTS
    baselines: tuple[str, ...] = BASELINES
    train_seeds: int = 5
    test_seeds: int = 5
    timesteps: int | None = None  # None: each agent file's n_timesteps
    backends: tuple[str, ...] = ("sim", "live")
    live_scenarios: list[str] | None = None  # None: all scenarios are also evaluated live
    repeat: int = 1
    calib_min_tokens: int = 1000
    best_static_seeds: int = 3
    best_static_points: int = 12  # best-static search: finalists (of all configs on seed 1) scored on every seed
    agents_dir: str = "agents"
    quick: bool = False
    # the score's definition: 2 = goodput over the workload's SLO window (2026-12-05); 1 (unrecorded) was goodput
    # over the episode's own length. Part of the fingerprint, so a run scored one way never resumes the other's.
    score_version: int = 2

    def __post_init__(self) -> None:
        bad = [b for b in self.baselines if b not in BASELINES]
        if bad:
            raise ValueError(f"unknown baseline(s) {bad}; known: {', '.join(BASELINES)}")
        bad = [b for b in self.backends if b not in ("sim", "live")]
        if bad:
            raise ValueError(f"unknown backend(s) {bad}; known: sim, live")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def fingerprint(self) -> str:
        """Trials of another configuration are not results of this one (resume refuses to mix them).

        ``repeat`` is left out: each repeat is its own evaluation trials (``r<repeat>`` in their ids) of the same
        trained runs on the same test seeds, so a finished run given a larger ``--repeat`` runs only the repeats
        it lacks, and a smaller one reads its first repeats."""
        return config_fingerprint(self.to_dict())


def config_fingerprint(config: dict) -> str:
    """:meth:`BenchConfig.fingerprint` of a configuration as recorded (``BenchConfig.to_dict``)."""
    d = {k: v for k, v in config.items() if k != "repeat"}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def quick(cfg: BenchConfig) -> BenchConfig:
    """The reduced configuration ``--quick`` runs: two scenarios (the suite's ``steady`` and ``exit-lever`` where
    present, else its first two), PPO and DQN, 2 training seeds of 2,048 steps, 2 test seeds, static /
    best-static / HELIOS / AIMD / tuned AIMD baselines, the sim and live backends on both, calibration on 300
    tokens per point."""
    preferred = [s for name in QUICK for s in cfg.scenarios if Path(s).stem == name]
    scen = (preferred if len(preferred) == 2 else cfg.scenarios)[:2]
    return BenchConfig(scenarios=scen, agents=("ppo", "dqn"),
                       baselines=("static", "best-static", "helios", "aimd", "tuned-aimd"),
                       train_seeds=2, test_seeds=2, timesteps=2048, backends=cfg.backends,
                       live_scenarios=None, repeat=cfg.repeat, calib_min_tokens=300, best_static_seeds=2,
                       best_static_points=6, agents_dir=cfg.agents_dir, quick=True)


@dataclass(frozen=True)
class Trial:
    kind: str  # prepare / train / eval
    scenario: str  # path
    agent: str | None = None
    seed: int | None = None
    backend: str | None = None
    repeat: int = 0
    deps: tuple[str, ...] = field(default=(), compare=False)

    @property
    def id(self) -> str:
        name = Path(self.scenario).stem
        if self.kind == "prepare":
            return f"prepare/{name}"
        if self.kind == "train":
            return f"train/{name}/{self.agent}/{self.seed}"
        return f"eval/{name}/{self.backend}/r{self.repeat}/{self.seed}"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "scenario": self.scenario, "agent": self.agent, "seed": self.seed,
                "backend": self.backend, "repeat": self.repeat, "id": self.id}


def suite_scenarios(path: str | Path) -> list[str]:
    """The scenario files of a suite folder (sorted), or the single file given."""
    p = Path(path)
    if p.is_file():
        return [str(p)]
    files = sorted(str(f) for f in p.glob("*.yaml"))
    if not files:
        raise ValueError(f"{p}: no scenario files (*.yaml)")
    return files


def plan(cfg: BenchConfig) -> list[Trial]:
    """Every trial, dependencies first: prepare, then training, then evaluation shards."""
    out: list[Trial] = []
    for sc in cfg.scenarios:
        prep = Trial("prepare", sc)
        out.append(prep)
        trains = []
        for agent in cfg.agents:
            for k in range(cfg.train_seeds):
                t = Trial("train", sc, agent=agent, seed=k, deps=(prep.id,))
                trains.append(t.id)
                out.append(t)
        for backend in cfg.backends:
            if backend == "live" and cfg.live_scenarios is not None and sc not in cfg.live_scenarios:
                continue
            for r in range(cfg.repeat):
                for s in test_seeds(cfg.test_seeds):
                    out.append(Trial("eval", sc, seed=s, backend=backend, repeat=r, deps=(prep.id, *trains)))
    return out
