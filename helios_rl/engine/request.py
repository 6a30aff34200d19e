"""Requests, sampling parameters and per-request state."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

import torch


class RequestError(ValueError):
    """A request the engine cannot accept; the message names the offending field."""


@dataclass
class SamplingParams:
    """How one request is decoded. ``temperature == 0`` means greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def validate(self) -> None:
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise RequestError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not (0.0 < self.top_p <= 1.0):
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise RequestError(f"top_k must be an integer >= 0 (0: off), got {self.top_k!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise RequestError(f"seed must be an integer, got {self.seed!r}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if not all(isinstance(s, str) and s for s in self.stop):
            raise RequestError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        self.stop = tuple(self.stop)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    """One generation request and everything the engine tracks about it.

    ``token_ids`` is the whole sequence (prompt + output) in the *current* model's vocabulary;
    ``output_text`` is the user-visible truth that survives a model switch.
    """

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    prompt_text: str | None = None
    arrival_time: float = 0.0
    # --- state ---
    token_ids: list[int] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)  # generated ids, current model's vocabulary
    num_generated: int = 0
    text_before_switch: str = ""  # output text produced under earlier models
    exit_layers: list[int] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)
    greedy_flags: list[bool] = field(default_factory=list)  # per token: forced out below full depth (a breach)
    text: str = ""  # raw output text so far (earlier models' text included), detokenized incrementally
    prefix_offset: int = 0  # incremental detokenization window over output_ids (see Engine._detokenize)
    read_offset: int = 0
    models: list[str] = field(default_factory=list)  # model that produced each generated token
    status: Status = Status.WAITING
    slot: int | None = None
    needs_prefill: bool = True
    first_token_time: float | None = None
    finish_time: float | None = None
    finish_reason: str | None = None
    output_text: str = ""
    generator: torch.Generator | None = None
    preemptions: int = 0
    error: str | None = None

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def seq_len(self) -> int:
        return len(self.token_ids)

    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    def tpot(self) -> float | None:
        if self.finish_time is None or self.first_token_time is None or self.num_generated < 2:
            return None
        return (self.finish_time - self.first_token_time) / (self.num_generated - 1)
