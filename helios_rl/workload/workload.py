"""Turn a :class:`WorkloadSpec` into a concrete, reproducible list of requests.

Randomness is split into independent streams (arrivals, tasks, prompts, lengths)
spawned from the spec's seed, so e.g. changing the task mix does not reshuffle the
arrival times. Same spec + same ``count_tokens`` -> identical list.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from helios_rl.utils.io import atomic_write_text
from helios_rl.workload.lengths import CountTokens, LengthMatcher, crop_with_count, whitespace_tokens
from helios_rl.workload.prompts import TASKS, Prompt, PromptPool, load_prompts_jsonl
from helios_rl.workload.spec import ArrivalSpec, PromptSpec, SpecError, TaskMix, WorkloadSpec
from helios_rl.workload.trace import read_azure_trace

__all__ = ["RequestSpec", "WorkloadSpec", "ArrivalSpec", "PromptSpec", "TaskMix", "SpecError",
           "build_workload", "build_pool", "save_requests", "load_requests"]


@dataclass(frozen=True)
class RequestSpec:
    """One request to send: when, what, and how many tokens it may generate.

    ``prompt_tokens`` is the prompt length under the ``count_tokens`` used to build the
    workload; ``reference`` is the source's real continuation/reply when there is one.
    """

    request_id: str
    arrival_s: float
    prompt_text: str
    task: str
    max_new_tokens: int
    chat: bool
    prompt_id: str = ""
    prompt_tokens: int | None = None
    reference: str | None = None


def build_pool(spec: WorkloadSpec) -> PromptPool:
    """The prompt pool of ``spec`` restricted to its split (train / heldout / all)."""
    extra = load_prompts_jsonl(spec.prompts.file) if spec.prompts.file else ()
    pool = PromptPool.from_sources(spec.prompts.sources, seed=spec.seed,
                                   heldout_fraction=spec.prompts.heldout_fraction, extra=extra)
    return pool.split(spec.split)


def build_workload(spec: WorkloadSpec, count_tokens: CountTokens | None = None,
                   pool: PromptPool | None = None) -> list[RequestSpec]:
    """Requests for ``spec``, sorted by arrival time.

    Args:
        spec: the workload description.
        count_tokens: token counter for length matching and cropping (default: whitespace
            words; pass the serving model's tokenizer for real runs).
        pool: prompts to draw from, used as given (default: :func:`build_pool`).
    """
    count = count_tokens or whitespace_tokens
    arr_rng, task_rng, prompt_rng, len_rng = (np.random.default_rng(s)
                                              for s in np.random.SeedSequence(spec.seed).spawn(4))
    context: np.ndarray | None = None
    generated: np.ndarray | None = None
    if spec.arrival.kind == "trace":
        times, context, generated = _trace_arrivals(spec)
    else:
        times = spec.arrival.process().sample(arr_rng, duration_s=spec.duration_s, count=spec.num_requests)
    n = times.size
    pool = pool if pool is not None else build_pool(spec)
    for task in spec.tasks.used_tasks():
        if not pool.by_task(task):
            raise SpecError(f"tasks.{task}: has weight but the {spec.split!r} split of prompts "
                            f"{list(spec.prompts.sources)} has no {task} prompts")

    probs = spec.tasks.at(times)
    cum = np.cumsum(probs, axis=1)
    task_idx = np.minimum((cum < task_rng.random(n)[:, None]).sum(axis=1), len(TASKS) - 1)

    lo, hi = spec.new_tokens_range()
    if generated is not None:
        new_tokens = np.clip(generated, lo, hi)
    else:
        new_tokens = len_rng.integers(lo, hi + 1, size=n)
    targets: np.ndarray | None = None
    if context is not None:
        targets = np.maximum(context, 1)
    elif spec.prompt_tokens is not None:
        targets = len_rng.integers(spec.prompt_tokens[0], spec.prompt_tokens[1] + 1, size=n)
    if targets is not None and spec.max_prompt_tokens is not None:
        targets = np.minimum(targets, spec.max_prompt_tokens)

    matchers: dict[str, LengthMatcher] = {}
    out: list[RequestSpec] = []
    for i in range(n):
        task = TASKS[int(task_idx[i])]
        if targets is not None:
            if task not in matchers:
                matchers[task] = pool.matcher(task, count)
            prompt, n_tok = matchers[task].match_with_count(int(targets[i]), prompt_rng)
        else:
            prompt = pool.sample(task, prompt_rng)
            if spec.max_prompt_tokens is not None:
                prompt, n_tok = crop_with_count(prompt, spec.max_prompt_tokens, count)
            else:
                n_tok = int(count(prompt.text))
        out.append(_request(i, float(times[i]), prompt, int(new_tokens[i]), n_tok))
    return out


def _request(i: int, t: float, prompt: Prompt, max_new_tokens: int, prompt_tokens: int) -> RequestSpec:
    return RequestSpec(request_id=f"req-{i:06d}", arrival_s=t, prompt_text=prompt.text, task=prompt.task,
                       max_new_tokens=max_new_tokens, chat=prompt.chat, prompt_id=prompt.id,
                       prompt_tokens=int(prompt_tokens), reference=prompt.reference)


def _trace_arrivals(spec: WorkloadSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Arrival times, ContextTokens and GeneratedTokens of the spec's trace segment."""
    a: ArrivalSpec = spec.arrival
    trace = read_azure_trace(a.path, start_s=a.start_s, window_s=a.window_s, time_scale=a.time_scale,
                             max_requests=spec.num_requests)
    keep = np.ones(len(trace), dtype=bool)
    if spec.duration_s is not None:
        keep = trace.arrival_s < spec.duration_s
    if not keep.any():
        raise SpecError(f"arrival: the trace segment of {a.path} has no requests "
                        f"(start_s={a.start_s}, window_s={a.window_s}, duration_s={spec.duration_s})")
    return trace.arrival_s[keep], trace.context_tokens[keep], trace.generated_tokens[keep]


def save_requests(path: str | Path, requests: list[RequestSpec]) -> Path:
    """Write requests as JSONL (one object per line), atomically."""
    lines = [json.dumps(asdict(r), ensure_ascii=False) for r in requests]
    return atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))


def load_requests(path: str | Path) -> list[RequestSpec]:
    """Read requests written by :func:`save_requests` (errors name the file and line)."""
    out = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row: Any = json.loads(line)
            out.append(RequestSpec(**row))
        except (json.JSONDecodeError, TypeError) as exc:
            raise ValueError(f"{path}:{lineno}: not a request record: {exc}") from None
    return out
