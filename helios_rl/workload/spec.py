"""``WorkloadSpec``: a validated, YAML-friendly description of a serving workload.

Example (YAML)::

    arrival: {kind: gamma, rate: 4.0, cv: 3.0}      # or poisson / piecewise / trace
    tasks: {completion: 0.4, summarize: 0.3, chat: 0.3}
    # tasks: [{t: 0, mix: {chat: 1}}, {t: 60, mix: {completion: 1}}]   # shifting mix
    max_new_tokens: [32, 256]                       # or an int
    num_requests: 500                               # and/or duration_s
    split: heldout                                  # train | heldout | all
    seed: 0

Validation is strict: an unknown key (a typo) or an impossible value raises
:class:`SpecError` naming the key path (``arrival.rate``, ``tasks[1].mix.chat``), since a
silently ignored ``rat: 5`` would run a different experiment than the one written down.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from helios_rl.workload.arrivals import ArrivalProcess, Gamma, PiecewiseRate, Poisson
from helios_rl.workload.prompts import DEFAULT_HELDOUT_FRACTION, SOURCES, SPLITS, TASKS

ARRIVAL_KINDS = ("poisson", "gamma", "piecewise", "trace")
_ARRIVAL_KEYS = {
    "poisson": ("rate",),
    "gamma": ("rate", "cv"),
    "piecewise": ("segments", "cv"),
    "trace": ("path", "start_s", "window_s", "time_scale"),
}
DEFAULT_MIX = {"completion": 0.4, "summarize": 0.3, "chat": 0.3}


class SpecError(ValueError):
    """An invalid workload spec; the message names the offending key."""


class _Keys:
    """Reads keys off a mapping at ``where``, then rejects whatever was not read."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise SpecError(f"{where or 'spec'}: expected a mapping, got {type(data).__name__}")
        self.data, self.where, self.used = data, where, set()

    def path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, conv: Callable[[Any, str], Any], default: Any = None,
            required: bool = False, nullable: bool = False) -> Any:
        """Converted value of ``key``; ``default`` if absent (an explicit null: None if ``nullable``)."""
        self.used.add(key)
        if key not in self.data or self.data[key] is None:
            if required:
                raise SpecError(f"{self.path(key)}: required")
            return None if (nullable and key in self.data) else default
        return conv(self.data[key], self.path(key))

    def finish(self) -> None:
        for key in self.data:
            if key not in self.used:
                hint = difflib.get_close_matches(str(key), sorted(self.used), n=1)
                more = f" (did you mean {hint[0]!r}?)" if hint else f"; allowed: {sorted(self.used)}"
                raise SpecError(f"{self.path(str(key))}: unknown key{more}")


def _num(v: Any, where: str, lo: float = -math.inf, lo_open: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise SpecError(f"{where}: expected a finite number, got {v!r}")
    if v < lo or (lo_open and v == lo):
        raise SpecError(f"{where}: must be {'>' if lo_open else '>='} {lo:g}, got {v!r}")
    return float(v)


def _pos(v: Any, where: str) -> float:
    return _num(v, where, 0.0, lo_open=True)


def _nonneg(v: Any, where: str) -> float:
    return _num(v, where, 0.0)


def _int(v: Any, where: str, lo: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise SpecError(f"{where}: expected an integer, got {v!r}")
    if v < lo:
        raise SpecError(f"{where}: must be >= {lo}, got {v}")
    return int(v)


def _str(v: Any, where: str) -> str:
    if not isinstance(v, str) or not v:
        raise SpecError(f"{where}: expected a non-empty string, got {v!r}")
    return v


def _choice(options: tuple[str, ...]) -> Callable[[Any, str], str]:
    def conv(v: Any, where: str) -> str:
        if v not in options:
            raise SpecError(f"{where}: must be one of {list(options)}, got {v!r}")
        return v
    return conv


def _int_or_range(v: Any, where: str) -> int | tuple[int, int]:
    """An int ``N >= 1`` as is, or ``[lo, hi]`` with ``1 <= lo <= hi`` as a tuple."""
    if isinstance(v, (list, tuple)):
        return _int_range(v, where)
    return _int(v, where)


def _int_range(v: Any, where: str) -> tuple[int, int]:
    """``N`` -> ``(N, N)``; ``[lo, hi]`` with ``1 <= lo <= hi``."""
    if isinstance(v, (list, tuple)):
        if len(v) != 2:
            raise SpecError(f"{where}: expected an integer or [lo, hi], got {v!r}")
        lo, hi = _int(v[0], f"{where}[0]"), _int(v[1], f"{where}[1]")
        if lo > hi:
            raise SpecError(f"{where}: lo must be <= hi, got {list(v)}")
        return lo, hi
    n = _int(v, where)
    return n, n


@dataclass(frozen=True)
class ArrivalSpec:
    """How requests arrive; only the fields of ``kind`` are meaningful."""

    kind: str
    rate: float | None = None
    cv: float = 1.0
    segments: tuple[tuple[float, float], ...] = ()
    path: str | None = None
    start_s: float = 0.0
    window_s: float | None = None
    time_scale: float = 1.0

    @classmethod
    def from_dict(cls, data: Any, where: str = "arrival") -> ArrivalSpec:
        keys = _Keys(data, where)
        kind = keys.get("kind", _choice(ARRIVAL_KINDS), required=True)
        allowed = _ARRIVAL_KEYS[kind]
        for key in data:
            if key != "kind" and key not in allowed:
                raise SpecError(f"{keys.path(str(key))}: unknown key for kind {kind!r}; allowed: {list(allowed)}")
        kw: dict[str, Any] = {"kind": kind}
        if kind in ("poisson", "gamma"):
            kw["rate"] = keys.get("rate", _pos, required=True)
        if kind in ("gamma", "piecewise"):
            kw["cv"] = keys.get("cv", _pos, 1.0)
        if kind == "piecewise":
            kw["segments"] = keys.get("segments", _segments, required=True)
        if kind == "trace":
            kw["path"] = keys.get("path", _str, required=True)
            kw["start_s"] = keys.get("start_s", _nonneg, 0.0)
            kw["window_s"] = keys.get("window_s", _pos)
            kw["time_scale"] = keys.get("time_scale", _pos, 1.0)
        keys.finish()
        return cls(**kw)

    def process(self) -> ArrivalProcess:
        """The arrival process (not for ``trace``, which is read by the builder)."""
        if self.kind == "poisson":
            return Poisson(self.rate)
        if self.kind == "gamma":
            return Gamma(self.rate, self.cv)
        if self.kind == "piecewise":
            return PiecewiseRate(self.segments, cv=self.cv)
        raise ValueError("a trace arrival has no generative process; use build_workload")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        for key in _ARRIVAL_KEYS[self.kind]:
            value = getattr(self, key)
            if value is not None:
                out[key] = [list(s) for s in value] if key == "segments" else value
        return out


def _segments(v: Any, where: str) -> tuple[tuple[float, float], ...]:
    """``[[t, rate], ...]`` or ``[{t: .., rate: ..}, ...]`` -> validated pairs."""
    if not isinstance(v, (list, tuple)) or not v:
        raise SpecError(f"{where}: expected a non-empty list of [t_start, rate]")
    out = []
    for i, seg in enumerate(v):
        w = f"{where}[{i}]"
        if isinstance(seg, dict):
            keys = _Keys(seg, w)
            pair = (keys.get("t", _nonneg, required=True), keys.get("rate", _nonneg, required=True))
            keys.finish()
        elif isinstance(seg, (list, tuple)) and len(seg) == 2:
            pair = (_nonneg(seg[0], f"{w}[0]"), _nonneg(seg[1], f"{w}[1]"))
        else:
            raise SpecError(f"{w}: expected [t_start, rate] or {{t: .., rate: ..}}, got {seg!r}")
        out.append(pair)
    try:
        PiecewiseRate(out)
    except ValueError as exc:
        raise SpecError(f"{where}: {exc}") from None
    return tuple(out)


@dataclass(frozen=True)
class TaskMix:
    """Task probabilities as a step schedule: ``(t_start, probs over TASKS)`` from ``t = 0``."""

    times: tuple[float, ...] = (0.0,)
    probs: tuple[tuple[float, ...], ...] = (tuple(DEFAULT_MIX[t] for t in TASKS),)

    @classmethod
    def from_value(cls, v: Any, where: str = "tasks") -> TaskMix:
        """A ``{task: weight}`` mapping or a ``[{t: .., mix: {..}}, ...]`` schedule."""
        if isinstance(v, dict):
            return cls((0.0,), (_mix(v, where),))
        if not isinstance(v, (list, tuple)) or not v:
            raise SpecError(f"{where}: expected {{task: weight}} or a non-empty list of {{t, mix}}")
        times, probs = [], []
        for i, entry in enumerate(v):
            keys = _Keys(entry, f"{where}[{i}]")
            t = keys.get("t", _nonneg, required=True)
            probs.append(keys.get("mix", _mix, required=True))
            keys.finish()
            if i == 0 and t != 0:
                raise SpecError(f"{where}[0].t: the schedule must start at t=0, got {t:g}")
            if i and t <= times[-1]:
                raise SpecError(f"{where}[{i}].t: times must strictly increase ({t:g} after {times[-1]:g})")
            times.append(t)
        return cls(tuple(times), tuple(probs))

    def at(self, t: np.ndarray) -> np.ndarray:
        """Probabilities over :data:`TASKS` in force at each time in ``t`` (shape ``[n, 3]``)."""
        idx = np.searchsorted(np.array(self.times), np.asarray(t, dtype=float), side="right") - 1
        return np.array(self.probs)[np.clip(idx, 0, None)]

    def used_tasks(self) -> tuple[str, ...]:
        """Tasks with positive probability somewhere in the schedule."""
        return tuple(t for j, t in enumerate(TASKS) if any(p[j] > 0 for p in self.probs))

    def to_value(self) -> Any:
        mixes = [{t: p[j] for j, t in enumerate(TASKS) if p[j] > 0} for p in self.probs]
        return mixes[0] if len(mixes) == 1 else [{"t": t, "mix": m} for t, m in zip(self.times, mixes)]


def _mix(v: Any, where: str) -> tuple[float, ...]:
    if not isinstance(v, dict) or not v:
        raise SpecError(f"{where}: expected a mapping of task -> weight")
    for key in v:
        if key not in TASKS:
            raise SpecError(f"{where}.{key}: unknown task; expected some of {list(TASKS)}")
    weights = [_nonneg(v.get(t, 0.0), f"{where}.{t}") for t in TASKS]
    total = sum(weights)
    if total <= 0:
        raise SpecError(f"{where}: weights must not all be zero")
    return tuple(w / total for w in weights)


@dataclass(frozen=True)
class PromptSpec:
    """Where prompts come from: built-in ``sources`` and/or a user JSONL ``file``."""

    sources: tuple[str, ...] = SOURCES
    file: str | None = None
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION

    @classmethod
    def from_dict(cls, data: Any, where: str = "prompts") -> PromptSpec:
        keys = _Keys(data, where)

        def sources(v: Any, w: str) -> tuple[str, ...]:
            if not isinstance(v, (list, tuple)):
                raise SpecError(f"{w}: expected a list of sources from {list(SOURCES)}")
            return tuple(_choice(SOURCES)(s, f"{w}[{i}]") for i, s in enumerate(v))

        def fraction(v: Any, w: str) -> float:
            x = _nonneg(v, w)
            if x > 1:
                raise SpecError(f"{w}: must be <= 1, got {v!r}")
            return x

        out = cls(sources=keys.get("sources", sources, SOURCES), file=keys.get("file", _str),
                  heldout_fraction=keys.get("heldout_fraction", fraction, DEFAULT_HELDOUT_FRACTION))
        keys.finish()
        if not out.sources and out.file is None:
            raise SpecError(f"{where}: needs at least one source or a file")
        return out


@dataclass(frozen=True)
class WorkloadSpec:
    """A complete workload description; build requests with :func:`build_workload`.

    ``max_new_tokens`` is an int or ``(lo, hi)`` drawn uniformly per request; in trace
    replay it is instead the clip range for ``GeneratedTokens`` (an int ``N`` there means
    ``(1, N)``), see :meth:`new_tokens_range`. ``prompt_tokens`` (optional, not for
    traces) draws a target prompt length per request; ``max_prompt_tokens`` crops every
    prompt (and caps trace ``ContextTokens`` targets). Relative paths are taken from the
    current directory.
    """

    arrival: ArrivalSpec
    tasks: TaskMix = field(default_factory=TaskMix)
    max_new_tokens: int | tuple[int, int] = 128
    num_requests: int | None = None
    duration_s: float | None = None
    split: str = "train"
    seed: int = 0
    prompts: PromptSpec = field(default_factory=PromptSpec)
    prompt_tokens: tuple[int, int] | None = None
    max_prompt_tokens: int | None = 4096
    name: str | None = None

    @classmethod
    def from_dict(cls, data: Any) -> WorkloadSpec:
        keys = _Keys(data, "")
        arrival = keys.get("arrival", ArrivalSpec.from_dict, required=True)
        spec = cls(
            arrival=arrival,
            tasks=keys.get("tasks", TaskMix.from_value, TaskMix()),
            max_new_tokens=keys.get("max_new_tokens", _int_or_range, 128),
            num_requests=keys.get("num_requests", _int),
            duration_s=keys.get("duration_s", _pos),
            split=keys.get("split", _choice(SPLITS), "train"),
            seed=keys.get("seed", lambda v, w: _int(v, w, lo=0), 0),
            prompts=keys.get("prompts", PromptSpec.from_dict, PromptSpec()),
            prompt_tokens=keys.get("prompt_tokens", _int_range),
            max_prompt_tokens=keys.get("max_prompt_tokens", _int, 4096, nullable=True),
            name=keys.get("name", _str),
        )
        keys.finish()
        if arrival.kind != "trace" and spec.num_requests is None and spec.duration_s is None:
            raise SpecError("num_requests: give num_requests and/or duration_s (required unless arrival.kind is trace)")
        if arrival.kind == "trace" and spec.prompt_tokens is not None:
            raise SpecError("prompt_tokens: not used with arrival.kind=trace (lengths come from ContextTokens)")
        return spec

    @classmethod
    def from_yaml(cls, path: str | Path) -> WorkloadSpec:
        """Load and validate a YAML spec file (errors name the file)."""
        import yaml

        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise SpecError(f"{path}: cannot read workload spec: {exc}") from exc
        try:
            return cls.from_dict(data)
        except SpecError as exc:
            raise SpecError(f"{path}: {exc}") from None

    def new_tokens_range(self) -> tuple[int, int]:
        """Effective ``(lo, hi)`` of ``max_new_tokens``: an int ``N`` is ``(N, N)``, or
        ``(1, N)`` for a trace, where it caps ``GeneratedTokens``."""
        if isinstance(self.max_new_tokens, tuple):
            return self.max_new_tokens
        return (1 if self.arrival.kind == "trace" else self.max_new_tokens), self.max_new_tokens

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form that :meth:`from_dict` reads back to an equal spec."""
        mnt = self.max_new_tokens
        out: dict[str, Any] = {
            "arrival": self.arrival.to_dict(),
            "tasks": self.tasks.to_value(),
            "max_new_tokens": list(mnt) if isinstance(mnt, tuple) else mnt,
            "split": self.split,
            "seed": self.seed,
            "prompts": {"sources": list(self.prompts.sources), "file": self.prompts.file,
                        "heldout_fraction": self.prompts.heldout_fraction},
            "max_prompt_tokens": self.max_prompt_tokens,
        }
        for key in ("num_requests", "duration_s", "name"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.prompt_tokens is not None:
            out["prompt_tokens"] = list(self.prompt_tokens)
        return out
