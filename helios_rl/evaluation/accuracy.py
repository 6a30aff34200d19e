"""Accuracy of served output against the full-depth model, teacher-forced.

For every output token, the model that produced it is run at full depth on exactly the context the
engine had (prompt + output so far, re-tokenised after a switch to a model with another tokenizer,
as the engine does). Two numbers per token:

* **agreement**: does the full model's greedy choice at that position equal the served token?
  (1.0 for full-depth greedy serving; early exits and partial loads lower it.)
* **NLL** of the served token under the full model (perplexity = exp(mean NLL)).
* **match** (free-running, see :class:`AccuracyScorer`): equal to the full model's own greedy
  continuation at the same position.

The pass uses the same family functions and heads as the engine (``final_logits``), so a full-depth
greedy run scores exactly 1.0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from helios_rl.models.layered import LayeredModel


@dataclass
class Segment:
    """Consecutive output tokens of one request produced by one model."""

    model: str
    ids: list[int] = field(default_factory=list)
    exit_layers: list[int] = field(default_factory=list)


def causal_mask(t: int, window: int | None, device: torch.device) -> torch.Tensor:
    q = torch.arange(t, device=device)[:, None]
    k = torch.arange(t, device=device)[None, :]
    m = k <= q
    if window is not None:
        m &= k > q - window
    return m[None, None]


@torch.inference_mode()
def run_layers(model: LayeredModel, ids: list[int], keep: set[int] = frozenset()) -> tuple[dict[int, torch.Tensor],
                                                                                              torch.Tensor]:
    """Teacher-forced pass over ``ids`` through every loaded layer: hidden states ``[T, H]`` after the
    layers in ``keep``, and after the last loaded layer."""
    fam, dev = model.family, model.device
    x = torch.as_tensor([ids], device=dev)
    pos = torch.arange(len(ids), device=dev)[None]
    h = fam.embed(x, pos)
    tables = fam.position_tables(h, pos)
    masks: dict[int | None, torch.Tensor] = {}
    kept = {}
    for i in range(model.depth):
        win = fam.sliding_window(i)
        if win not in masks:
            masks[win] = causal_mask(len(ids), win, dev)
        h = fam.run_layer(i, h, masks[win], None, tables, pos)
        if i in keep:
            kept[i] = h[0]
    return kept, h[0]


@torch.inference_mode()
def score_continuation(model: LayeredModel, context: list[int], targets: list[int]) -> tuple[int, float]:
    """(tokens where full-depth greedy == target, summed NLL of the targets) given ``context``."""
    if not targets:
        return 0, 0.0
    if model.depth != model.num_layers:
        raise ValueError(f"{model.name}: accuracy needs the full model (depth {model.depth}/{model.num_layers})")
    ids = list(context) + list(targets)
    _, h = run_layers(model, ids[:-1])
    start = len(context) - 1
    logits = model.heads.final_logits(h[start:]).float()
    tgt = torch.as_tensor(targets, device=logits.device)
    agree = int((logits.argmax(-1) == tgt).sum())
    nll = float(torch.nn.functional.cross_entropy(logits, tgt, reduction="sum"))
    return agree, nll


@dataclass
class Accuracy:
    """Token counts over scored output: teacher-forced agreement, NLL, and free-running match."""

    agree: int = 0
    nll: float = 0.0
    tokens: int = 0
    match: int = 0

    def __iadd__(self, other: "Accuracy") -> "Accuracy":
        self.agree += other.agree
        self.nll += other.nll
        self.tokens += other.tokens
        self.match += other.match
        return self


class AccuracyScorer:
    """Scores requests' segments with full models (loaded once each, results cached by token ids).

    Besides the teacher-forced numbers, :meth:`score_requests` computes the **match**: the share of
    output tokens equal, position by position, to the full model's own greedy continuation from the
    same starting context (free-running). Teacher forcing alone flatters degenerate output -- once a
    partial model falls into repeating a token, the full model, fed that repetition, predicts more
    of it -- and the match exposes that.
    """

    def __init__(self, loader, max_model_len: int, batch: int = 16) -> None:
        self.loader = loader
        self.max_len = max_model_len
        self.batch = batch
        self.models: dict[str, LayeredModel] = {}
        self.cache: dict[tuple, tuple[int, float]] = {}
        self.refs: dict[tuple, list[int]] = {}  # (model, context) -> the longest continuation computed
        self._asked: dict[tuple, int] = {}  # (model, context) -> the length it was asked for
        self._vocab: dict[str, dict] = {}

    def model(self, name: str) -> LayeredModel:
        if name not in self.models:
            self.models[name] = self.loader(name, None)
        return self.models[name]

    def _same_tokenizer(self, a: str, b: str) -> bool:
        if a == b:
            return True
        ta, tb = self.model(a).tokenizer, self.model(b).tokenizer
        if ta is None or tb is None:
            return ta is None and tb is None and self.model(a).vocab_size == self.model(b).vocab_size
        for n, t in ((a, ta), (b, tb)):
            if n not in self._vocab:
                self._vocab[n] = t.get_vocab()
        return self._vocab[a] == self._vocab[b]

    def contexts(self, prompt: str | list[int], segments: list[Segment]) -> list[tuple[str, list[int], list[int]]]:
        """``(model, context ids, segment ids)`` per segment, with the context the engine had."""
        if not segments:
            return []
        cur = segments[0].model
        tok = self.model(cur).tokenizer
        ctx = list(prompt) if not isinstance(prompt, str) else tok(prompt, add_special_tokens=True)["input_ids"]
        text_before, since, out = "", [], []
        for seg in segments:
            if seg.model != cur:
                if not self._same_tokenizer(cur, seg.model):
                    old = self.model(cur).tokenizer
                    text_before += old.decode(since, skip_special_tokens=True) if since else ""
                    new = self.model(seg.model).tokenizer
                    ctx = new(prompt + text_before, add_special_tokens=True)["input_ids"]
                    if len(ctx) >= self.max_len:
                        ctx = ctx[-(self.max_len - 1):]
                    since = []
                cur = seg.model
            out.append((cur, ctx + since, list(seg.ids)))
            since = since + seg.ids
        return out

    def reference(self, model: str, ctx: list[int], n: int) -> list[int]:
        """The first ``n`` tokens of the full model's greedy continuation of ``ctx`` (computed by
        :meth:`_references`)."""
        return self.refs[(model, tuple(ctx))][:n]

    def teacher_forced(self, model: str, ctx: list[int], ids: list[int]) -> tuple[int, float]:
        """:func:`score_continuation` of ``ids`` after ``ctx`` on the full ``model`` (cached by token ids)."""
        key = (model, tuple(ctx), tuple(ids))
        if key not in self.cache:
            self.cache[key] = score_continuation(self.model(model), ctx, ids)
        return self.cache[key]

    def _references(self, jobs: list[tuple[str, list[int], list[int]]]) -> None:
        """Full-depth greedy continuations for every job not cached yet (batched per model, in the jobs' order).

        One continuation is kept per (model, context), the longest asked for; a job that needs fewer tokens
        reads its prefix (greedy decoding: the first ``n`` tokens do not depend on how many follow)."""
        from helios_rl.engine.config import EngineSettings
        from helios_rl.engine.engine import Engine
        from helios_rl.engine.request import SamplingParams

        todo: dict[str, dict[tuple, int]] = {}
        for model, ctx, ids in jobs:
            key = (model, tuple(ctx))
            if self._asked.get(key, -1) < len(ids):  # (a continuation may stop short at max_model_len)
                want = todo.setdefault(model, {})
                want[key] = max(want.get(key, 0), len(ids))
        for model, keys in todo.items():
            lm = self.model(model)
            eng = Engine(lm, EngineSettings(max_batch=self.batch, max_model_len=self.max_len))
            items = list(keys.items())
            reqs = eng.generate([list(k[1]) for k, _ in items],
                                [SamplingParams(max_new_tokens=n, ignore_eos=True) for _, n in items])
            for (k, n), r in zip(items, reqs):
                self.refs[k], self._asked[k] = list(r.output_ids), n
            del eng

    def score_requests(self, requests: list[tuple[str | list[int], list[Segment]]]) -> Accuracy:
        """Totals over ``(prompt, segments)`` pairs (see class docstring)."""
        jobs = [job for prompt, segs in requests for job in self.contexts(prompt, segs) if job[2]]
        self._references(jobs)
        acc = Accuracy()
        for model, ctx, ids in jobs:
            a, l = self.teacher_forced(model, ctx, ids)
            ref = self.reference(model, ctx, len(ids))
            acc += Accuracy(a, l, len(ids), sum(1 for x, y in zip(ids, ref) if x == y))
        return acc

    def close(self) -> None:
        for m in self.models.values():
            m.unload()
        self.models.clear()


def perplexity(nll_sum: float, n: int) -> float:
    return math.exp(nll_sum / n) if n else float("nan")
