"""Controller parameters: one dataclass per controller, validated strictly from a scenario mapping.

Every knob of every controller lives here (nothing is hard-coded in the controllers), so a
scenario YAML can set it and the evaluation report can print it. Validation names the key path
(``controllers.helios.coverage``); :mod:`helios_rl.scenario` adds the file and line.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Callable


class ParamError(ValueError):
    """An invalid controller parameter; ``key`` is the dotted path, ``args[0]`` the message."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def number(lo: float | None = None, hi: float | None = None, integer: bool = False,
           lo_open: bool = False) -> Callable[[Any, str], Any]:
    """Converter for a (bounded) number or integer; raises ParamError naming the key."""
    def conv(v: Any, key: str) -> Any:
        ok = isinstance(v, int) if integer else isinstance(v, (int, float))
        if isinstance(v, bool) or not ok or (not integer and not math.isfinite(v)):
            raise ParamError(key, f"expected {'an integer' if integer else 'a finite number'}, got {v!r}")
        if lo is not None and (v < lo or (lo_open and v == lo)):
            raise ParamError(key, f"must be {'>' if lo_open else '>='} {lo:g}, got {v!r}")
        if hi is not None and v > hi:
            raise ParamError(key, f"must be <= {hi:g}, got {v!r}")
        return int(v) if integer else float(v)
    return conv


def optional(conv: Callable[[Any, str], Any]) -> Callable[[Any, str], Any]:
    return lambda v, key: None if v is None else conv(v, key)


def string(v: Any, key: str) -> str:
    if not isinstance(v, str) or not v:
        raise ParamError(key, f"expected a non-empty string, got {v!r}")
    return v


def _int_list_or_auto(v: Any, key: str) -> str | tuple[int, ...]:
    if v == "auto":
        return "auto"
    if not isinstance(v, (list, tuple)) or not v:
        raise ParamError(key, f"expected 'auto' or a non-empty list of integers >= 1, got {v!r}")
    return tuple(number(1, integer=True)(x, f"{key}[{i}]") for i, x in enumerate(v))


def _str_list_or_none(v: Any, key: str) -> tuple[str, ...] | None:
    if v is None:
        return None
    if not isinstance(v, (list, tuple)) or not v:
        raise ParamError(key, f"expected a non-empty list of model names, got {v!r}")
    return tuple(string(x, f"{key}[{i}]") for i, x in enumerate(v))


def choice(options: tuple[str, ...]) -> Callable[[Any, str], str]:
    def conv(v: Any, key: str) -> str:
        if v not in options:
            raise ParamError(key, f"must be one of {list(options)}, got {v!r}")
        return v
    return conv


class Keys:
    """Reads the keys of one mapping at ``where``; :meth:`finish` rejects every key not read."""

    def __init__(self, data: Any, where: str) -> None:
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise ParamError(where, f"expected a mapping, got {type(data).__name__}")
        self.data, self.where, self.used = data, where, set()

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def get(self, name: str, conv: Callable[[Any, str], Any], default: Any = None, required: bool = False) -> Any:
        """``conv(value, key)`` of ``name``; ``default`` when absent or null."""
        self.used.add(name)
        if name not in self.data or self.data[name] is None:
            if required:
                raise ParamError(self.key(name), "required")
            return default
        return conv(self.data[name], self.key(name))

    def finish(self, allowed: set[str] | None = None) -> None:
        known = sorted(allowed if allowed is not None else self.used)
        for name in self.data:
            if name not in known:
                hint = difflib.get_close_matches(str(name), known, n=1)
                more = f" (did you mean {hint[0]!r}?)" if hint else f"; allowed: {known}"
                raise ParamError(self.key(str(name)), f"unknown {'parameter' if allowed else 'key'}{more}")


def _batch_mode(v: Any, key: str) -> str | int:
    if v in ("max", "requests"):
        return v
    if isinstance(v, int) and not isinstance(v, bool) and v >= 1:
        return v
    raise ParamError(key, f"expected 'max', 'requests' or an integer >= 1, got {v!r}")


def boolean(v: Any, key: str) -> bool:
    if not isinstance(v, bool):
        raise ParamError(key, f"expected true or false, got {v!r}")
    return v


def p(default: Any, conv: Callable[[Any, str], Any], doc: str) -> Any:
    """A parameter field: its default, its converter/validator and a one-line description."""
    return field(default=default, metadata={"conv": conv, "doc": doc})


@dataclass(frozen=True)
class StaticParams:
    """EE-LLM-style baseline: one model at a fixed depth (full by default), calibrated exits."""

    model: str | None = p(None, optional(string), "model to serve (default: the scenario's first candidate)")
    depth: int | None = p(None, optional(number(1, integer=True)), "loaded layers (default: all)")
    max_batch: int | None = p(None, optional(number(1, integer=True)), "batch cap (default: what the budget admits)")
    setting: float | None = p(None, optional(number(0.0, 1.0, lo_open=True)),
                              "exit setting: a precision target, or a raw threshold in threshold mode "
                              "(default: the scenario's)")


@dataclass(frozen=True)
class HeliosParams:
    """The HELIOS greedy heuristic (arXiv 2504.10724); defaults follow the paper where it gives one."""

    shortlist_k: int = p(3, number(1, integer=True), "candidates shortlisted from the model repository")
    profile_requests: int = p(5, number(1, integer=True), "live requests each candidate is profiled on")
    profile_batch: Any = p("max", _batch_mode,
                           "batch cap while profiling: 'max' (what the budget admits), 'requests' "
                           "(= profile_requests) or an integer")
    coverage: float = p(0.9, number(0.0, 1.0, lo_open=True),
                        "load up to the depth that this share of the profiled tokens exit by")
    breach_window: int = p(100, number(1, integer=True), "tokens in the confidence-breach window")
    breach_limit: int = p(50, number(1, integer=True), "breaches in the window that count as overflow")
    reprofile_interval: int = p(150, number(1, integer=True), "re-profile every this many served requests")
    grow_fraction: float = p(0.2, number(0.0, 1.0, lo_open=True),
                             "on overflow, 'load more layers' adds this share of the model's layers")
    horizon_requests: int | None = p(None, optional(number(1, integer=True)),
                                     "requests the overflow cost compares over (default: until re-profile)")
    min_depth: int = p(1, number(1, integer=True), "never load fewer layers than this")
    max_agreement_drop: float | None = p(0.02, optional(number(0.0, 1.0)),
                                         "never load a depth whose predicted agreement (repository) is more "
                                         "than this below full depth's (null: coverage alone decides)")
    use_offline_exits: bool = p(False, boolean,
                                "size the depth from the repository's exit distribution, not the live profile")


@dataclass(frozen=True)
class BestStaticParams:
    """Grid search in hindsight over model x depth x batch; the best point is then served statically."""

    models: tuple[str, ...] | None = p(None, _str_list_or_none, "models in the grid (default: all candidates)")
    depths: Any = p("auto", _int_list_or_auto, "depths ('auto': every exit layer + 1 and full depth)")
    batches: Any = p("auto", _int_list_or_auto, "batch caps ('auto': what the budget admits at each depth)")
    max_points: int = p(12, number(1, integer=True), "at most this many grid points (evenly thinned)")
    search_requests: int | None = p(None, optional(number(1, integer=True)),
                                    "search on the first N requests only (default: the whole workload)")


@dataclass(frozen=True)
class RandomParams:
    """Uniformly random configurations: a floor any controller should beat."""

    change_prob: float = p(0.2, number(0.0, 1.0), "probability of drawing a new config at each decision")
    models: tuple[str, ...] | None = p(None, _str_list_or_none, "models to draw from (default: all candidates)")


@dataclass(frozen=True)
class AimdParams:
    """SLO-aware AIMD on the batch cap (helios_rl.controllers.aimd)."""

    model: str | None = p(None, optional(string), "model to serve (default: the scenario's first candidate)")
    depth: int | None = p(None, optional(number(1, integer=True)),
                          "loaded layers (default: the shallowest whose predicted agreement meets the floor)")
    setting: float | None = p(None, optional(number(0.0, 1.0, lo_open=True)),
                              "exit setting: a precision target, or a raw threshold in threshold mode "
                              "(default: the scenario's)")
    initial_batch: int = p(8, number(1, integer=True), "starting batch cap")
    increase: int = p(2, number(1, integer=True), "additive increase while requests wait and TPOT has headroom")
    decrease: float = p(0.7, number(0.0, 1.0, lo_open=True), "multiplicative decrease on an SLO miss")
    headroom: float = p(0.8, number(0.0, 1.0, lo_open=True), "grow only while TPOT p95 < headroom x the SLO")
    signal: str = p("tpot_p95", choice(("tpot_p95", "step_time")),
                    "what is compared with the TPOT SLO: the window's finished requests' TPOT p95 (lags the cap "
                    "by a request's length) or its mean decode step time (the TPOT the current cap gives now)")
    hold: int = p(0, number(0, integer=True), "decisions to keep a new cap before judging it (its requests' TPOT "
                                              "reaches the signal only as they finish)")
    ttft_decrease: bool = p(True, boolean, "also decrease on a TTFT p95 miss while requests wait (a miss from "
                                           "queueing, which a smaller cap does not cure: a tuned rule may drop it)")


PARAMS: dict[str, type] = {"static": StaticParams, "helios": HeliosParams, "best-static": BestStaticParams,
                           "random": RandomParams, "aimd": AimdParams}


def parse_params(name: str, data: Any, where: str = "") -> Any:
    """``PARAMS[name]`` built from ``data`` (a mapping or None); unknown keys and bad values raise ParamError."""
    where = where or f"controllers.{name}"
    if name not in PARAMS:
        hint = difflib.get_close_matches(name, list(PARAMS), n=1)
        raise ParamError(where, f"unknown controller{f' (did you mean {hint[0]!r}?)' if hint else ''}; "
                                f"known: {sorted(PARAMS)}")
    cls = PARAMS[name]
    keys = Keys(data, where)
    known = {f.name: f for f in fields(cls)}
    keys.finish(set(known))
    kw = {k: known[k].metadata["conv"](v, keys.key(k)) for k, v in keys.data.items()}
    out = cls(**kw)
    if isinstance(out, HeliosParams) and out.breach_limit > out.breach_window:
        raise ParamError(f"{where}.breach_limit", f"must be <= breach_window ({out.breach_window}), "
                                                  f"got {out.breach_limit}")
    return out


def params_doc(name: str) -> list[tuple[str, Any, str]]:
    """``(key, default, description)`` for each parameter of controller ``name`` (for docs and reports)."""
    out = []
    for f in fields(PARAMS[name]):
        default = None if f.default is MISSING else f.default
        out.append((f.name, default, f.metadata.get("doc", "")))
    return out


def params_dict(params: Any) -> dict:
    """Plain-data form of a params dataclass (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(params).items()}
