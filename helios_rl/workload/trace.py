"""Reader for the Azure LLM inference trace format (``TIMESTAMP,ContextTokens,GeneratedTokens``).

Timestamps look like ``2023-11-16 18:15:46.6805900``: seven fractional digits (100 ns
ticks), which ``datetime.fromisoformat`` rejects before Python 3.11 and silently
truncates after, so they are parsed by hand into integer nanoseconds. Rows need not be
in time order; they are sorted (stably) after reading. Every malformed row raises a
:class:`TraceError` naming the file, the line and the column, because a trace that is
silently half-read would make a replay look fine while measuring something else.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
_TS = re.compile(r"(\d{4})-(\d{2})-(\d{2})[ T](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?")


class TraceError(ValueError):
    """A malformed trace file; the message names the file, line and column."""


@dataclass(frozen=True)
class Trace:
    """Requests of a trace segment, sorted by arrival.

    ``arrival_s`` is relative to the segment start (after ``time_scale``); ``t0_ns`` is
    the absolute time of the segment start (UTC nanoseconds) for reference.
    """

    path: str
    arrival_s: np.ndarray
    context_tokens: np.ndarray
    generated_tokens: np.ndarray
    t0_ns: int

    def __len__(self) -> int:
        return int(self.arrival_s.size)

    @property
    def duration_s(self) -> float:
        """Time from the segment start to its last arrival."""
        return float(self.arrival_s[-1]) if len(self) else 0.0


def parse_timestamp_ns(text: str) -> int:
    """``YYYY-MM-DD HH:MM:SS[.fffffffff]`` (naive, read as UTC) -> integer nanoseconds."""
    m = _TS.fullmatch(text.strip())
    if not m:
        raise ValueError(f"bad timestamp {text!r} (want YYYY-MM-DD HH:MM:SS[.fraction])")
    y, mo, d, h, mi, s, frac = m.groups()
    try:
        base = datetime(int(y), int(mo), int(d), int(h), int(mi), int(s), tzinfo=timezone.utc)
    except ValueError as exc:
        raise ValueError(f"bad timestamp {text!r} ({exc})") from None
    ns = int((frac or "").ljust(9, "0"))
    return int(base.timestamp()) * 1_000_000_000 + ns


def read_azure_trace(path: str | Path, *, start_s: float = 0.0, window_s: float | None = None,
                     time_scale: float = 1.0, max_requests: int | None = None) -> Trace:
    """Read an Azure LLM trace CSV and return a segment of it.

    Args:
        path: CSV with a header naming ``TIMESTAMP``, ``ContextTokens``, ``GeneratedTokens``
            (any order; other columns are ignored).
        start_s: segment start, in seconds after the trace's first request.
        window_s: segment length in seconds (``None``: to the end of the trace).
        time_scale: multiplies the relative times, applied after the segment is cut
            (``0.5`` replays the segment twice as fast, ``2`` half as fast).
        max_requests: keep only the first this many requests of the segment.
    """
    if not (math.isfinite(start_s) and start_s >= 0):
        raise ValueError(f"start_s must be >= 0, got {start_s}")
    if window_s is not None and not (math.isfinite(window_s) and window_s > 0):
        raise ValueError(f"window_s must be > 0, got {window_s}")
    if not (math.isfinite(time_scale) and time_scale > 0):
        raise ValueError(f"time_scale must be > 0, got {time_scale}")
    if max_requests is not None and (int(max_requests) != max_requests or max_requests < 1):
        raise ValueError(f"max_requests must be a positive integer, got {max_requests}")
    ts, ctx, gen = _read_rows(Path(path))
    order = np.argsort(ts, kind="stable")
    ts, ctx, gen = ts[order], ctx[order], gen[order]
    first = int(ts[0])
    rel_ns = ts - first
    lo_ns = round(start_s * 1e9)
    keep = rel_ns >= lo_ns
    if window_s is not None:
        keep &= rel_ns < lo_ns + round(window_s * 1e9)
    rel_ns, ctx, gen = rel_ns[keep] - lo_ns, ctx[keep], gen[keep]
    if max_requests is not None:
        rel_ns, ctx, gen = rel_ns[:max_requests], ctx[:max_requests], gen[:max_requests]
    return Trace(path=str(path), arrival_s=rel_ns.astype(np.float64) / 1e9 * time_scale,
                 context_tokens=ctx, generated_tokens=gen, t0_ns=first + lo_ns)


def _read_rows(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All rows as (timestamp ns, context tokens, generated tokens) int64 arrays, validated."""
    try:
        fh = open(path, newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise TraceError(f"{path}: cannot open trace: {exc}") from exc
    ts: list[int] = []
    ctx: list[int] = []
    gen: list[int] = []
    with fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            raise TraceError(f"{path}: line 1: empty file, expected header {','.join(COLUMNS)}") from None
        except (csv.Error, UnicodeDecodeError) as exc:
            raise TraceError(f"{path}: line 1: unreadable header: {exc}") from None
        names = [h.strip() for h in header]
        for col in COLUMNS:
            if col not in names:
                raise TraceError(f"{path}: line 1: header lacks column {col!r} (has {names})")
        idx = {col: names.index(col) for col in COLUMNS}
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except (csv.Error, UnicodeDecodeError) as exc:
                raise TraceError(f"{path}: line {reader.line_num}: unreadable row: {exc}") from None
            line = reader.line_num
            if not row or all(not c.strip() for c in row):
                continue
            for col in COLUMNS:
                if idx[col] >= len(row) or not row[idx[col]].strip():
                    raise TraceError(f"{path}: line {line}: column {col!r} is missing")
            try:
                ts.append(parse_timestamp_ns(row[idx["TIMESTAMP"]]))
            except ValueError as exc:
                raise TraceError(f"{path}: line {line}: column 'TIMESTAMP': {exc}") from None
            ctx.append(_count(path, line, "ContextTokens", row[idx["ContextTokens"]]))
            gen.append(_count(path, line, "GeneratedTokens", row[idx["GeneratedTokens"]]))
    if not ts:
        raise TraceError(f"{path}: no requests after the header")
    return np.array(ts, dtype=np.int64), np.array(ctx, dtype=np.int64), np.array(gen, dtype=np.int64)


def _count(path: Path, line: int, col: str, text: str) -> int:
    text = text.strip()
    try:
        value = int(text)
    except ValueError:
        raise TraceError(f"{path}: line {line}: column {col!r}: not an integer: {text!r}") from None
    if value < 0:
        raise TraceError(f"{path}: line {line}: column {col!r}: negative token count {value}")
    return value
