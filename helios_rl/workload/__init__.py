"""Workloads for early-exit serving experiments: real prompts, arrival processes, traces.

Typical use::

    from helios_rl.workload import WorkloadSpec, build_workload
    spec = WorkloadSpec.from_dict({"arrival": {"kind": "poisson", "rate": 2.0},
                                   "num_requests": 100, "split": "heldout"})
    requests = build_workload(spec, count_tokens=lambda s: len(tok(s).input_ids))
"""

from helios_rl.workload.arrivals import ArrivalProcess, Gamma, PiecewiseRate, Poisson
from helios_rl.workload.lengths import LengthMatcher, crop_to_tokens, crop_with_count, whitespace_tokens
from helios_rl.workload.prompts import (
    SOURCES,
    SPLITS,
    TASKS,
    Prompt,
    PromptError,
    PromptPool,
    load_prompts_jsonl,
    split_of,
)
from helios_rl.workload.spec import ArrivalSpec, PromptSpec, SpecError, TaskMix, WorkloadSpec
from helios_rl.workload.texts import (
    ChatPair,
    TextDoc,
    iter_sharegpt,
    load_news,
    load_sharegpt,
    load_wiki,
)
from helios_rl.workload.trace import Trace, TraceError, read_azure_trace
from helios_rl.workload.workload import RequestSpec, build_pool, build_workload, load_requests, save_requests

__all__ = [
    "ArrivalProcess", "Gamma", "PiecewiseRate", "Poisson",
    "LengthMatcher", "crop_to_tokens", "crop_with_count", "whitespace_tokens",
    "SOURCES", "SPLITS", "TASKS", "Prompt", "PromptError", "PromptPool", "load_prompts_jsonl", "split_of",
    "ArrivalSpec", "PromptSpec", "SpecError", "TaskMix", "WorkloadSpec",
    "ChatPair", "TextDoc", "iter_sharegpt", "load_news", "load_sharegpt", "load_wiki",
    "Trace", "TraceError", "read_azure_trace",
    "RequestSpec", "build_pool", "build_workload", "load_requests", "save_requests",
]
