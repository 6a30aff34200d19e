"""A matmul orientation chosen per row count, measured on this machine, for every linear of a CPU model.

On the CPU, MKL's ``F.linear(x, W)`` has a row-count cliff: with 4-15 rows it is up to 2.7x slower than
with 16 (Gemma3-270M's 262k-row LM head, one thread, 2026-12-03: 10 rows 347 ms, 16 rows 184 ms; a
2048x640 MLP projection: 1.14 ms vs 1.02 ms), and the same product computed as ``(W @ x.T).T`` costs
about what one weight read does at any row count up to 16 (LM head 141-206 ms, MLP 0.71 ms). Which
orientation wins where depends on the host: the previous host (2026-12-02) had ``(W @ x.T).T`` 4x
faster at 2-3 rows, this one has it 2.7x *slower* there. So the choice is measured, once per machine,
torch version and thread count (:func:`plan`), cached on disk beside the other caches and shared by
every process (a file lock; written atomically), so that every engine on the machine, a benchmark's
workers and its repeats alike, computes the same products the same way.

:func:`planned_linear` is ``F.linear`` with that choice; :func:`plan_linears` makes a module's
``nn.Linear`` layers use it (``LayeredModel`` does so for every loaded CPU layer, the LM head and the
exit heads call it directly). CUDA always uses ``F.linear``. ``HELIOS_RL_LINEAR_PLAN=off`` turns the
plan off (plain ``F.linear`` everywhere: the A/B baseline of ``benchmarks/kernels.py``).

The orientations compute the same sums in another order, so logits differ in the last bits; greedy
choices can differ only at exact near-ties, as they already do between batch sizes.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

PLAN_FORMAT = "helios_rl.linear_plan/1"
WIDE = 4096  # output features from which a product is timed as a "wide" one (LM head, exit vocabulary)
MAX_ROWS = 24  # row counts above this always use F.linear: the cliff is at 4-15 rows; from 32 rows the two
# orientations measured within noise of each other in whole decode steps (Gemma3 at 32 and 48 rows: 0.95x, 0.94x)
MARGIN = 0.9  # the other orientation is taken only where it is at least 10 % faster (stable under noise)
#: the shapes the plan is timed on: a decoder-layer projection and a vocabulary-sized head
PROBE_SHAPES = {"narrow": (2048, 640), "wide": (49152, 576)}
WIDE_ROWS = (1, 2, 3, 4, 6, 8, 10, 12, 14, 16, 20, 24)  # timed rows of the wide probe


def _machine_key() -> str:
    """The CPU (model name and flags where /proc/cpuinfo has them), core count, torch version and threads."""
    info = {"model name": platform.processor() or platform.machine(), "flags": ""}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in info:
                    info[key.strip()] = value.strip()
                if key.strip() == "flags":  # the first core's entry is enough
                    break
    except OSError:
        pass
    text = (f"{info['model name']}|{info['flags']}|{os.cpu_count()}|torch {torch.__version__}"
            f"|threads {torch.get_num_threads()}")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _time_pair(x: torch.Tensor, w: torch.Tensor, reps: int) -> tuple[float, float]:
    """Median seconds of ``F.linear(x, w)`` and ``(w @ x.T).T``, interleaved (drift hits both alike)."""
    a, b = [], []
    F.linear(x, w)
    (w @ x.T).T
    for _ in range(reps):
        t = time.perf_counter()
        F.linear(x, w)
        a.append(time.perf_counter() - t)
        t = time.perf_counter()
        (w @ x.T).T.contiguous()  # the next op (a reshape, a residual add) reads it in row order: timed with it
        b.append(time.perf_counter() - t)
    return statistics.median(a), statistics.median(b)


def measure_plan(say=lambda s: None) -> dict:
    """Time both orientations at every row count 1..``MAX_ROWS`` (narrow probe) and at ``WIDE_ROWS`` (wide
    probe; rows between two timed counts take the nearer one's choice). About 8 s on this project's CPU."""
    gen = torch.Generator().manual_seed(0)
    out: dict = {"format": PLAN_FORMAT, "machine": _machine_key(), "torch": torch.__version__,
                 "threads": torch.get_num_threads(), "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "kinds": {}}
    for kind, (o, i) in PROBE_SHAPES.items():
        w = torch.randn(o, i, generator=gen)
        rows = range(1, MAX_ROWS + 1) if kind == "narrow" else WIDE_ROWS
        timed = {}
        for m in rows:
            a, b = _time_pair(torch.randn(m, i, generator=gen), w, 9 if kind == "narrow" else 5)
            timed[m] = (a, b)
        flip = []
        for m in range(1, MAX_ROWS + 1):
            near = min(timed, key=lambda r: (abs(r - m), r))
            a, b = timed[near]
            if b < MARGIN * a:
                flip.append(m)
        out["kinds"][kind] = {"shape": [o, i], "transposed_rows": flip,
                              "timed_ms": {str(m): [round(a * 1e3, 4), round(b * 1e3, 4)] for m, (a, b) in timed.items()}}
        say(f"linear plan ({kind} {o}x{i}): (W @ x.T).T at rows {_ranges(flip) or 'none'}")
    return out


def _ranges(rows: list[int]) -> str:
    parts, start = [], None
    for i, m in enumerate(rows):
        if start is None:
            start = m
        if i + 1 == len(rows) or rows[i + 1] != m + 1:
            parts.append(f"{start}-{m}" if m != start else f"{m}")
            start = None
    return ", ".join(parts)


def plan_path() -> Path:
    from helios_rl.utils.paths import cache_dir

    folder = cache_dir() / "kernels"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"linear-plan-{_machine_key()}.json"


@lru_cache(maxsize=None)
def _plan_for(threads: int) -> dict[str, frozenset[int]]:
    """``{"narrow": rows, "wide": rows}`` taking ``(W @ x.T).T`` (measured once per machine, cached)."""
    if os.environ.get("HELIOS_RL_LINEAR_PLAN", "auto").lower() in ("off", "0", "false", "no"):
        return {"narrow": frozenset(), "wide": frozenset()}
    from filelock import FileLock

    from helios_rl.utils.io import atomic_write_json

    path = plan_path()
    with FileLock(str(path) + ".lock"):
        data = None
        if path.exists():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                if data.get("format") != PLAN_FORMAT or data.get("machine") != _machine_key():
                    data = None
            except (OSError, ValueError, AttributeError):
                data = None  # a corrupt cache is measured again, not trusted
        if data is None:
            data = measure_plan()
            atomic_write_json(path, data)
    return {k: frozenset(int(m) for m in v["transposed_rows"]) for k, v in data["kinds"].items()}


def plan() -> dict[str, frozenset[int]]:
    """This machine's plan at the current torch thread count (see module docstring)."""
    return _plan_for(torch.get_num_threads())


def planned_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for ``x`` ``[..., K]``, in the orientation this machine's plan
    measured faster for its row count (CPU only)."""
    if x.device.type != "cpu" or x.dim() == 0 or x.dtype != weight.dtype:
        return F.linear(x, weight, bias)
    rows = x.numel() // x.shape[-1]
    if rows > MAX_ROWS or rows not in plan()["wide" if weight.shape[0] >= WIDE else "narrow"]:
        return F.linear(x, weight, bias)
    out = (weight @ x.reshape(rows, x.shape[-1]).T).T
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


#: the LM head and exit-vocabulary products (kept under their earlier name)
head_linear = planned_linear


class PlannedLinear(nn.Linear):
    """An ``nn.Linear`` whose product follows the plan (same parameters and state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return planned_linear(x, self.weight, self.bias)


def plan_linears(module: nn.Module) -> int:
    """Make every plain ``nn.Linear`` under ``module`` a :class:`PlannedLinear` in place (CPU weights
    only); returns how many. The plan is read (measured, on a machine without one) here, at load, so
    that no timed serving step pays for measuring it."""
    n = 0
    for m in module.modules():
        if type(m) is nn.Linear and m.weight.device.type == "cpu":
            m.__class__ = PlannedLinear
            n += 1
    if n:
        plan()
    return n
