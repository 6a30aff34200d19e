"""What a replay needs besides the engine: a model loader, a virtual clock and a step timer.

* :class:`ModelLoader` loads a scenario's models by reference, attaches trained exit heads when the
  ``helios_rl.exits`` package finds them, and names each model by its reference so controllers,
  telemetry and the engine agree on names.
* :class:`VirtualClock` is the engine's time source in trace replay: it advances by each step's
  measured cost, and jumps to the next arrival when the engine is idle, so arrivals follow measured
  compute time and not the wall clock (which another process on a shared machine would distort).
* :class:`Timer` measures a cost: ``cpu`` (process CPU time; immune to being descheduled by other
  processes on a shared machine, equal to wall time for a single-threaded engine), ``wall``, or
  ``modeled`` (a deterministic cost from the step record, for tests and dry runs).
"""

from __future__ import annotations

import inspect
import time
import warnings
from typing import Callable

import torch

from helios_rl.engine.telemetry import StepRecord
from helios_rl.models.layered import LayeredModel

#: Cost model of ``timing: modeled``: seconds = c0 + c_tok * tokens + c_layer * rows x layers + c_pre * prefill
MODELED = {"c0": 1e-3, "c_tok": 2e-4, "c_depth": 1e-4, "c_row_layer": 5e-5, "c_prefill": 2e-5, "c_load": 2e-9}


class ModelLoader:
    """``loader(name, depth)`` for :class:`~helios_rl.engine.engine.Engine`: load, attach heads, name."""

    def __init__(self, device: str | None = None, dtype: str | None = None,
                 heads: str | dict[str, str] = "auto") -> None:
        self.device, self.dtype, self.heads = device, dtype, heads

    def heads_for(self, name: str) -> str:
        return self.heads.get(name, "auto") if isinstance(self.heads, dict) else self.heads

    def validate(self, name: str, depth: int | None = None) -> None:
        """ValueError when ``name`` cannot be loaded or ``depth`` is beyond it (reads only its config)."""
        import json

        from helios_rl.models.registry import resolve_model

        folder = resolve_model(name, progress=False)  # UnknownModel (a ValueError) naming what is known
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        layers = int(cfg.get("text_config", cfg)["num_hidden_layers"])
        if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= layers):
            raise ValueError(f"depth must be between 1 and {layers} for {name}, got {depth!r}")

    def __call__(self, name: str, depth: int | None = None) -> LayeredModel:
        from helios_rl.models.registry import load_model

        kw = {"heads": self.heads_for(name)} if "heads" in inspect.signature(load_model).parameters else {}
        model = load_model(name, depth=depth, device=self.device, dtype=self.dtype, progress=False, **kw)
        model.name = name
        if not kw:
            self.attach(model)
        return model

    def attach(self, model: LayeredModel) -> bool:
        """Attach trained exit heads (``heads``: auto / shared / a folder); False when none are used."""
        if model.heads.adapters:
            return True
        try:
            from helios_rl.exits import attach_heads
        except ImportError:  # exit heads not available in this build
            return False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return bool(attach_heads(model, self.heads_for(model.name)))


def exit_layers_for(model: LayeredModel, layers: str | tuple[int, ...], measure: str) -> list[int]:
    """Exit layers of ``model``: ``auto`` = the trained heads' enabled layers (none without heads)."""
    if layers != "auto":
        return [int(l) for l in layers if int(l) < model.num_layers - 1]
    try:
        from helios_rl.exits import enabled_layers
    except ImportError:
        return sorted(l for l in model.heads.adapters if l < model.num_layers - 1)
    return [int(l) for l in enabled_layers(model, measure) if l < model.num_layers - 1]


class VirtualClock:
    """A settable clock: ``clock()`` reads it, ``advance`` and ``jump_to`` move it forward."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = float(start)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += max(0.0, float(seconds))

    def jump_to(self, t: float) -> None:
        self.now = max(self.now, float(t))


class Timer:
    """Measures the cost of a piece of work in the scenario's timing mode (see module docstring)."""

    def __init__(self, mode: str = "cpu") -> None:
        if mode not in ("cpu", "wall", "modeled"):
            raise ValueError(f"timing must be cpu, wall or modeled, got {mode!r}")
        self.mode = mode
        self._read: Callable[[], float] = time.process_time if mode == "cpu" else time.perf_counter

    def start(self) -> float:
        return self._read()

    def elapsed(self, t0: float) -> float:
        return max(0.0, self._read() - t0)

    def step_cost(self, t0: float, rec: StepRecord) -> float:
        """Cost of the engine step recorded in ``rec`` that started at ``t0``."""
        if self.mode != "modeled":
            return self.elapsed(t0)
        rows_layers = float(sum((i + 1) * int(c) for i, c in enumerate(rec.exit_counts)))
        return (MODELED["c0"] + MODELED["c_tok"] * rec.decode_tokens + MODELED["c_depth"] * rec.depth
                + MODELED["c_row_layer"] * rows_layers + MODELED["c_prefill"] * rec.prefill_tokens * rec.depth)

    def prefill_part(self, rec: StepRecord) -> float:
        """The part of :meth:`step_cost` that was the step's prefill pass (the engine times it apart)."""
        if self.mode == "modeled":
            return MODELED["c_prefill"] * rec.prefill_tokens * rec.depth
        return rec.prefill_cpu_s if self.mode == "cpu" else rec.prefill_wall_s

    def load_cost(self, t0: float, nbytes: int) -> float:
        """Cost of an ``Engine.apply`` that read ``nbytes`` of weights."""
        if self.mode != "modeled":
            return self.elapsed(t0)
        return 1e-3 + MODELED["c_load"] * nbytes


def set_threads(n: int) -> int:
    """Use ``n`` intra-op threads (returns the previous count). One thread by default: on a CPU shared
    with other processes, an oversubscribed OpenMP pool is several times slower and far noisier."""
    prev = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    return prev

