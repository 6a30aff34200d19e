"""A matmul kernel chosen per row count, measured on this machine, for every linear of a CPU model.

On the CPU, MKL's ``F.linear(x, W)`` has a row-count cliff: with 4-15 rows it is up to 2.7x slower than
with 16 (Gemma3-270M's 262k-row LM head, one thread, 2026-12-03: 10 rows 347 ms, 16 rows 184 ms; a
2048x640 MLP projection: 1.14 ms vs 1.02 ms). Two other kernels compute the same product: ``(W @ x.T).T``
(about one weight read at any row count up to 16 on one host, 2.7x slower than MKL at 2-3 rows on
another) and oneDNN's fp32 linear on the plain weight (``torch.ops.mkldnn._linear_pointwise``; on the
262k-row head at 4-12 rows 95-125 ms against MKL's 120-315 and the transposed product's 127-154, no
copy of the weight). Which wins where depends on the host, so the choice is measured, once per machine,
torch version and thread count (:func:`plan`), cached on disk beside the other caches and shared by
every process (a file lock; written atomically), so that every engine on the machine, a benchmark's
workers and its repeats alike, computes the same products the same way.

:func:`planned_linear` is ``F.linear`` with that choice; :func:`plan_linears` makes a module's
``nn.Linear`` layers use it (``LayeredModel`` does so for every loaded CPU layer, the LM head and the
exit heads call it directly). CUDA always uses ``F.linear``. ``HELIOS_RL_LINEAR_PLAN=off`` turns the
plan off (plain ``F.linear`` everywhere: the A/B baseline of ``benchmarks/kernels.py``);
``HELIOS_RL_LINEAR_PLAN=no-onednn`` chooses from the same timings without oneDNN; another value is an error.

The kernels compute the same sums in another order, so logits differ in the last bits; greedy
choices can differ only at exact near-ties, as they already do between batch sizes. oneDNN's prepacked
weight format was faster still (the head at 4-16 rows: 69-101 ms) but is a second copy of the weight;
it is not used, so resident bytes stay what the memory budget counts.
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

PLAN_FORMAT = "helios_rl.linear_plan/2"
WIDE = 4096  # output features from which a product is timed as a "wide" one (LM head, exit vocabulary)
MAX_ROWS = 64  # row counts above this always use F.linear: the cliff is at 4-15 rows; oneDNN was still
# 1.25x faster than MKL at 64 rows on a 262k-row head (2026-12-03), equal from ~128 rows (prefill chunks)
MARGIN = 0.9  # another kernel is taken only where it is at least 10 % faster than F.linear (stable under noise)
#: the shapes the plan is timed on: a decoder-layer projection and a vocabulary-sized head
PROBE_SHAPES = {"narrow": (2048, 640), "wide": (49152, 576)}
NARROW_ROWS = tuple(range(1, 25)) + (32, 48, 64)  # timed rows of the narrow probe
WIDE_ROWS = (1, 2, 3, 4, 6, 8, 10, 12, 14, 16, 20, 24, 32, 48, 64)  # timed rows of the wide probe
#: the kernels a plan chooses between besides F.linear: ``(W @ x.T).T`` and oneDNN's fp32 linear on the
#: plain weight (``torch.ops.mkldnn._linear_pointwise``; no packed copy, so no memory beyond the weight)
METHODS = ("transposed", "onednn")
#: values of ``HELIOS_RL_LINEAR_PLAN``: the measured plan, plain ``F.linear``, the plan chosen without oneDNN
OFF_MODES = ("off", "0", "false", "no")
PLAN_MODES = ("auto", "no-onednn", *OFF_MODES)


def _onednn_available() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


def _onednn_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


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


def _time_methods(x: torch.Tensor, w: torch.Tensor, reps: int, onednn: bool) -> dict[str, float]:
    """Median seconds of ``F.linear(x, w)``, ``(w @ x.T).T`` and (where available) oneDNN's linear,
    interleaved (drift hits all alike)."""
    fns = {"linear": lambda: F.linear(x, w),
           # the next op (a reshape, a residual add) reads the transposed product in row order: timed with it
           "transposed": lambda: (w @ x.T).T.contiguous()}
    if onednn:
        fns["onednn"] = lambda: _onednn_linear(x, w)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(reps):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def _choose(timed: dict[int, dict[str, float]], allowed) -> dict[str, list[int]]:
    """For each row count 1..``MAX_ROWS``, the fastest ``allowed`` kernel where it beats ``F.linear`` by
    ``MARGIN`` (rows between two timed counts take the nearer one's timings; ties, the lower one's)."""
    chosen: dict[str, list[int]] = {k: [] for k in METHODS}
    for m in range(1, MAX_ROWS + 1):
        t = timed[min(timed, key=lambda r: (abs(r - m), r))]
        others = [k for k in t if k != "linear" and k in allowed]
        if not others:
            continue
        best = min(others, key=t.__getitem__)
        if t[best] < MARGIN * t["linear"]:
            chosen[best].append(m)
    return chosen


def measure_plan(say=lambda s: None) -> dict:
    """Time every kernel at ``NARROW_ROWS`` (narrow probe) and ``WIDE_ROWS`` (wide probe) and choose, for each
    row count 1..``MAX_ROWS``, the fastest where it beats ``F.linear`` by ``MARGIN`` (rows between two timed
    counts take the nearer one's choice). About 15 s on this project's CPU."""
    gen = torch.Generator().manual_seed(0)
    onednn = _onednn_available()
    out: dict = {"format": PLAN_FORMAT, "machine": _machine_key(), "torch": torch.__version__,
                 "threads": torch.get_num_threads(), "onednn": onednn,
                 "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "kinds": {}}
    for kind, (o, i) in PROBE_SHAPES.items():
        w = torch.randn(o, i, generator=gen)
        rows = NARROW_ROWS if kind == "narrow" else WIDE_ROWS
        timed = {m: _time_methods(torch.randn(m, i, generator=gen), w, 9 if kind == "narrow" else 5, onednn)
                 for m in rows}
        chosen = _choose(timed, METHODS)
        out["kinds"][kind] = {"shape": [o, i], "rows": chosen,
                              "timed_ms": {str(m): {k: round(v * 1e3, 4) for k, v in t.items()}
                                           for m, t in timed.items()}}
        say(f"linear plan ({kind} {o}x{i}): " + "; ".join(f"{k} at rows {_ranges(r) or 'none'}"
                                                          for k, r in chosen.items()))
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
    # the format in the name: two versions of the package on one machine keep one plan each, not overwriting
    return folder / f"linear-plan-v{PLAN_FORMAT.rsplit('/', 1)[1]}-{_machine_key()}.json"


@lru_cache(maxsize=None)
def _plan_for(threads: int) -> dict[str, dict[str, frozenset[int]]]:
    """``{"narrow": {method: rows}, "wide": {method: rows}}`` for the kernels other than ``F.linear``
    (measured once per machine, cached)."""
    mode = plan_mode()
    if mode == "off":
        return {k: {m: frozenset() for m in METHODS} for k in PROBE_SHAPES}
    from filelock import FileLock

    from helios_rl.utils.io import atomic_write_json

    path = plan_path()
    with FileLock(str(path) + ".lock"):
        parsed = None
        if path.exists():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                if data.get("format") == PLAN_FORMAT and data.get("machine") == _machine_key():
                    parsed = _parse_plan(data, mode)
            except (OSError, ValueError, AttributeError, KeyError, TypeError):
                parsed = None  # a corrupt cache is measured again, not trusted
        if parsed is None:
            data = measure_plan()
            atomic_write_json(path, data)
            parsed = _parse_plan(data, mode)
    return parsed


def _parse_plan(data: dict, mode: str) -> dict[str, dict[str, frozenset[int]]]:
    out = {}
    for k in PROBE_SHAPES:
        v = data["kinds"][k]
        rows = v["rows"]
        if mode == "no-onednn" or not _onednn_available():  # chosen again from the timings without oneDNN
            rows = _choose({int(m): {a: float(b) for a, b in t.items()} for m, t in v["timed_ms"].items()},
                           ("transposed",))
        out[k] = {m: frozenset(int(r) for r in rows.get(m, ())) for m in METHODS}
    return out


def plan_mode() -> str:
    """``HELIOS_RL_LINEAR_PLAN``'s mode: ``auto``, ``no-onednn`` or ``off`` (any of :data:`OFF_MODES`)."""
    mode = os.environ.get("HELIOS_RL_LINEAR_PLAN", "auto").lower()
    if mode not in PLAN_MODES:
        raise ValueError(f"HELIOS_RL_LINEAR_PLAN={mode!r}: expected one of {', '.join(PLAN_MODES)}")
    return "off" if mode in OFF_MODES else mode


def plan() -> dict[str, dict[str, frozenset[int]]]:
    """This machine's plan at the current torch thread count (see module docstring)."""
    return _plan_for(torch.get_num_threads())


def plan_rows() -> dict[str, dict[str, list[int]]]:
    """:func:`plan` as JSON (sorted row lists), as profiles and benchmarks record it."""
    return {k: {m: sorted(r) for m, r in v.items()} for k, v in plan().items()}


def plan_identity() -> dict:
    """Which plan this process multiplies with: ``{"mode", "machine"}`` (what a profile is checked against;
    reading it measures nothing)."""
    return {"mode": plan_mode(), "machine": _machine_key()}


def plan_record() -> dict:
    """What a profile records of the plan it was measured under: :func:`plan_identity` and the rows."""
    return {**plan_identity(), "rows": plan_rows()}


def planned_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for ``x`` ``[..., K]``, by the kernel this machine's plan measured
    fastest for its row count (CPU only; oneDNN for a dense float32 weight and no gradients only)."""
    if x.device.type != "cpu" or x.dim() == 0 or x.dtype != weight.dtype:
        return F.linear(x, weight, bias)
    rows = x.numel() // x.shape[-1]
    if rows > MAX_ROWS:
        return F.linear(x, weight, bias)
    kind = plan()["wide" if weight.shape[0] >= WIDE else "narrow"]
    if rows in kind["onednn"] and x.dtype == torch.float32 and weight.is_contiguous() and not (
            torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                         or (bias is not None and bias.requires_grad))):
        # oneDNN's op has no backward (a product that needs gradients, e.g. exit-head training, takes the
        # others) and reads the weight's own strides (a dense weight only)
        return _onednn_linear(x, weight, bias)
    if rows not in kind["transposed"]:
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
