"""``exit_profile``: what an HELIOS-style controller needs to know about a model's exits, measured live.

HELIOS profiles each candidate model on a few live requests (throughput, exit-layer distribution)
and loads it only up to the layer most tokens exit by. This module runs those requests through the
real engine at a given serving config and returns one :class:`ExitProfile`: exit-layer histogram and
distribution, mean exit layer, tokens/s and, on request, agreement with the full model (exact
argmax identity, teacher-forced on each request's own prefix).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from helios_rl.engine.config import EngineSettings, ServingConfig
from helios_rl.engine.engine import Engine
from helios_rl.engine.request import Request, SamplingParams
from helios_rl.exits.data import run_stack
from helios_rl.exits.heads_io import enabled_layers


@dataclass
class ExitProfile:
    """Exit behaviour of one model under one serving config over a set of prompts."""

    model: str
    depth: int
    num_layers: int
    exit_layers: list[int]
    measure: str
    thresholds: dict[int, float]
    requests: int
    tokens: int
    exit_counts: list[int]  # tokens that left at each layer (len = num_layers)
    exit_distribution: list[float]  # exit_counts / tokens
    mean_exit_layer: float
    exit_rate: float  # share of tokens that left before the last loaded layer
    tokens_per_s: float  # engine tokens per wall-clock second
    wall_s: float
    batch: int
    cpu_s: float = 0.0  # process CPU time spent generating (robust to other load on a shared CPU)
    tokens_per_cpu_s: float = 0.0
    agreement: float | None = None  # share of tokens equal to the full model's argmax on the same prefix
    head_source: str = "shared"
    outputs: list[list[int]] = field(default_factory=list, repr=False)

    def layer_covering(self, share: float = 0.5) -> int:
        """Smallest layer by which at least ``share`` of tokens have exited (HELIOS' partial-load depth - 1)."""
        cum = np.cumsum(self.exit_distribution)
        return int(np.searchsorted(cum, share - 1e-12))

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("outputs")
        d["thresholds"] = {str(k): v for k, v in self.thresholds.items()}
        return d


def as_config(model, config: ServingConfig | float | dict | None, measure: str = "max_prob") -> ServingConfig:
    """A :class:`ServingConfig` from a threshold, a ``{layer: threshold}`` map or None (calibrated).

    Exit layers default to the tuned heads' enabled layers; with the shared head and a threshold,
    to every layer below the last loaded one.
    """
    if isinstance(config, ServingConfig):
        return config
    layers = enabled_layers(model, measure)
    if isinstance(config, dict):
        layers = tuple(sorted(int(k) for k in config))
    elif not layers and config is not None:
        layers = tuple(range(model.depth - 1))
    return ServingConfig(exit_layers=layers, threshold=config, measure=measure)


@torch.inference_mode()
def teacher_forced_agreement(model, requests: list[Request]) -> tuple[int, int]:
    """(agreeing, total) generated tokens: does each equal the full model's argmax on the same prefix?

    Layers not loaded are loaded for the check and freed afterwards.
    """
    depth = model.depth
    if depth < model.num_layers:
        model.set_depth(model.num_layers)
    try:
        agree = total = 0
        for req in requests:
            if not req.output_ids:
                continue
            ids = torch.as_tensor([req.token_ids[:-1]])
            _, h = run_stack(model, ids)
            n = len(req.output_ids)
            pred = model.heads.final_logits(h[0, -n:]).argmax(-1).cpu()
            agree += int((pred == torch.as_tensor(req.output_ids)).sum())
            total += n
        return agree, total
    finally:
        if model.depth != depth:
            model.set_depth(depth)


def exit_profile(model_or_engine, prompts: list[str | list[int]], config: ServingConfig | float | dict | None = None,
                 max_new_tokens: int = 32, measure: str = "max_prob", batch: int | None = None,
                 measure_agreement: bool = False, restore: bool = True) -> ExitProfile:
    """Serve ``prompts`` (greedy, EOS ignored) under ``config`` and profile the exits.

    ``model_or_engine``: a :class:`LayeredModel` (a private engine is built, ``batch`` caps it) or a
    live :class:`Engine` (its config is applied, and restored afterwards when ``restore``). Its
    requests must be finished first so the timing covers only these prompts.
    """
    if isinstance(model_or_engine, Engine):
        engine = model_or_engine
        if engine.has_unfinished():
            raise ValueError("exit_profile needs an idle engine (it still has unfinished requests)")
    else:
        engine = Engine(model_or_engine, EngineSettings(max_batch=batch or 8, measure=measure))
    model = engine.model
    previous = engine.config
    cfg = as_config(model, config, measure)
    m = cfg.measure or measure
    engine.apply(ServingConfig(exit_layers=cfg.exit_layers, threshold=_explicit(engine, cfg.threshold, cfg.exit_layers, m),
                               measure=m, max_batch=batch if batch is not None else cfg.max_batch))
    try:
        policy = engine._policy
        since, cpu0 = engine.clock(), time.process_time()
        reqs = engine.generate(list(prompts), SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True))
        cpu = time.process_time() - cpu0
        snap = engine.snapshot(since=since)
        counts = np.zeros(model.num_layers, dtype=np.int64)
        for r in reqs:
            np.add.at(counts, np.asarray(r.exit_layers, dtype=np.int64), 1)
        tokens = int(counts.sum())
        agreement = None
        if measure_agreement:
            good, total = teacher_forced_agreement(model, reqs)
            agreement = good / total if total else None
        layers = sorted(policy.layers)
        return ExitProfile(
            model=model.name, depth=model.depth, num_layers=model.num_layers, exit_layers=layers,
            measure=policy.measure, thresholds={l: policy.thresholds.get(l, 1.1) for l in layers},
            requests=len(reqs), tokens=tokens, exit_counts=counts.tolist(),
            exit_distribution=(counts / max(tokens, 1)).round(6).tolist(),
            mean_exit_layer=float((counts * np.arange(len(counts))).sum() / max(tokens, 1)),
            exit_rate=float(counts[: model.depth - 1].sum() / max(tokens, 1)),
            tokens_per_s=snap.tokens_per_s, wall_s=snap.window_s, batch=engine.max_batch, agreement=agreement,
            cpu_s=cpu, tokens_per_cpu_s=snap.output_tokens / max(cpu, 1e-9),
            head_source=model.heads.source, outputs=[list(r.output_ids) for r in reqs])
    finally:
        if restore:
            engine.apply(ServingConfig(exit_layers=previous.exit_layers, measure=previous.measure,
                                       threshold=_explicit(engine, previous.threshold, previous.exit_layers,
                                                           previous.measure),
                                       max_batch=previous.max_batch, depth=previous.depth))


def _explicit(engine: Engine, threshold, layers, measure: str):
    """``threshold`` None means "calibrated", but ``apply`` reads None as "keep the current one": spell the
    calibrated values out when the engine currently has an explicit threshold."""
    if threshold is not None or engine.config.threshold is None:
        return threshold
    calibrated = engine.model.heads.thresholds.get(measure, {})
    return {l: float(calibrated.get(l, engine.settings.default_threshold)) for l in range(engine.model.num_layers)}


def heldout_prompts(model, n: int = 12, max_prompt_tokens: int = 128, seed: int = 0,
                    tasks: tuple[str, ...] = ("completion", "summarize", "chat")) -> list[str]:
    """``n`` held-out workload prompts (see :func:`workload_prompts`)."""
    return workload_prompts(model, n, max_prompt_tokens, seed, tasks, split="heldout")


def workload_prompts(model, n: int = 12, max_prompt_tokens: int = 128, seed: int = 0,
                     tasks: tuple[str, ...] = ("completion", "summarize", "chat"), split: str = "heldout") -> list[str]:
    """``n`` workload prompts of ``split`` (tasks in turn), cropped to ``max_prompt_tokens`` and chat-formatted
    where the prompt is a chat turn and the tokenizer has a template."""
    from helios_rl.workload.lengths import crop_to_tokens
    from helios_rl.workload.prompts import PromptPool

    tok = model.tokenizer
    if tok is None:
        raise ValueError(f"{model.name} has no tokenizer")
    pool = PromptPool.from_sources(seed=seed).split(split)
    rng = np.random.default_rng(seed)
    order = {t: list(rng.permutation(len(pool.by_task(t)))) for t in tasks}
    count = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    out = []
    for i in range(n):
        task = tasks[i % len(tasks)]
        if not order[task]:
            order[task] = list(rng.permutation(len(pool.by_task(task))))
        p = crop_to_tokens(pool.by_task(task)[int(order[task].pop())], max_prompt_tokens, count)
        text = p.text
        if p.chat and getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
        out.append(text)
    return out


def free_running_match(outputs: list[list[int]], reference: list[list[int]]) -> float:
    """Share of served tokens equal to the full model's own greedy continuation at the same position
    (free-running agreement: one divergence usually changes everything after it)."""
    same = sum(a == b for o, f in zip(outputs, reference) for a, b in zip(o, f))
    total = sum(len(o) for o in outputs)
    return same / total if total else 1.0


def target_agreement(model, targets: list[float], prompts: int | list[str] = 8, max_new_tokens: int = 32,
                     seed: int = 0, progress: bool = False, batch: int | None = None) -> dict[float, dict]:
    """Serve held-out prompts at full depth and at each precision target (greedy, EOS ignored) and
    measure, per target, the free-running and teacher-forced agreement of the served tokens with the
    full model, the exit rate and the mean exit layer. ``model`` must be loaded to full depth."""
    from tqdm.auto import tqdm

    texts = heldout_prompts(model, prompts, 96, seed) if isinstance(prompts, int) else list(prompts)
    engine = Engine(model, EngineSettings(max_batch=batch or len(texts), max_model_len=96 + max_new_tokens + 64))
    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    engine.apply(ServingConfig(exit_layers=()))
    reference = [list(r.output_ids) for r in engine.generate(texts, params)]
    out = {}
    for t in tqdm(targets, desc="free-running agreement per target", disable=not progress, leave=False):
        engine.apply(ServingConfig(target=t))
        reqs = engine.generate(texts, params)
        good, total = teacher_forced_agreement(model, reqs)
        layers = np.concatenate([np.asarray(r.exit_layers, dtype=np.int64) for r in reqs])
        out[t] = {"free_running_agreement": round(free_running_match([list(r.output_ids) for r in reqs], reference), 4),
                  "teacher_forced_agreement": round(good / max(total, 1), 4),
                  "exit_rate": round(float((layers < model.num_layers - 1).mean()), 4),
                  "mean_exit_layer": round(float(layers.mean()), 3), "tokens": int(total),
                  "prompts": len(texts), "max_new_tokens": max_new_tokens}
    return out
