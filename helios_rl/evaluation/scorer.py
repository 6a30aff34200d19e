"""Scoring what was actually served: one accuracy contract for the live env, the harness and the server.

For every finished request, from the tokens it was served (segment by segment when a switch moved it
to another model):

* **agreement** (the contract's headline, *free-running*): the share of served tokens equal, position
  by position, to the serving model's own full-depth greedy continuation from the same context. One
  early divergence usually changes everything after it, so this is what a user of the output feels.
* **teacher-forced agreement** (labelled as such): each served token against the serving model's
  full-depth greedy choice on exactly the prefix the engine had.
* **reference perplexity**: the served *text* scored by one fixed reference model per scenario
  (``slo.reference_model``, default the largest candidate), so quality is comparable across
  candidates with different tokenizers: a cheaper candidate is a real trade, not a free win.

The scorer holds its own full-depth copies of the models (outside the engine's memory budget and
the episode's clock), batches the reference continuations (all of an episode's at once where it was told
which requests to expect), caches what repeats (continuations per context, scores per token sequence) and
says what it cost (process CPU seconds per scored token). The teacher-forced agreement and the reference
perplexity are optional (each is a full-depth pass over every distinct served output); one not measured
is ``None``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from helios_rl.evaluation.accuracy import AccuracyScorer, Segment, score_continuation


@dataclass
class ServedRequest:
    """A finished request as served: its prompt, its output by serving model, and its task."""

    request_id: str
    prompt: str | list[int]
    segments: list[Segment]
    task: str | None = None
    text: str | None = None  # the output text as the user got it (for the reference model)


@dataclass
class RequestScore:
    request_id: str
    task: str | None
    tokens: int = 0
    match: int = 0  # free-running: equal to the full model's own continuation
    agree: int = 0  # teacher-forced: equal to the full model's argmax on the same prefix
    ref_nll: float = 0.0
    ref_tokens: int = 0
    tf_tokens: int = 0  # tokens scored teacher-forced (0 where the scorer does not measure it)

    @property
    def agreement(self) -> float | None:
        return self.match / self.tokens if self.tokens else None


@dataclass
class ScoreTotals:
    """Token-weighted totals over scored requests."""

    tokens: int = 0
    match: int = 0
    agree: int = 0
    ref_nll: float = 0.0
    ref_tokens: int = 0
    tf_tokens: int = 0
    requests: int = 0
    by_task: dict = field(default_factory=dict)

    def add(self, s: RequestScore) -> None:
        self.tokens += s.tokens
        self.match += s.match
        self.agree += s.agree
        self.tf_tokens += s.tf_tokens
        self.ref_nll += s.ref_nll
        self.ref_tokens += s.ref_tokens
        self.requests += 1
        t = self.by_task.setdefault(s.task or "all", [0, 0])
        t[0] += s.tokens
        t[1] += s.match

    @property
    def agreement(self) -> float | None:
        """Free-running agreement (None: nothing scored)."""
        return self.match / self.tokens if self.tokens else None

    @property
    def teacher_forced(self) -> float | None:
        """Teacher-forced agreement (None: nothing scored, or a scorer that does not measure it)."""
        return self.agree / self.tf_tokens if self.tf_tokens else None

    @property
    def reference_ppl(self) -> float | None:
        import math

        return math.exp(self.ref_nll / self.ref_tokens) if self.ref_tokens else None

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "requests": self.requests, "agreement": self.agreement,
                "teacher_forced_agreement": self.teacher_forced, "reference_ppl": self.reference_ppl,
                "agreement_by_task": {k: (m / n if n else None) for k, (n, m) in self.by_task.items()}}


def quality_ok(score: RequestScore | None, slo) -> bool:
    """Whether a scored request meets the scenario's quality floors (agreement, reference perplexity)."""
    import math

    if score is None or score.agreement is None:
        return False
    if score.agreement < slo.agreement_floor:
        return False
    if slo.max_reference_ppl is not None and score.ref_tokens:
        return math.exp(score.ref_nll / score.ref_tokens) <= slo.max_reference_ppl
    return True


class ServedScorer:
    """See the module docstring. ``loader(name, depth)`` loads a model (full depth when ``depth`` None).

    The free-running agreement is always measured. ``teacher_forced`` and ``reference_ppl`` choose whether the
    secondary figures are: each costs a full-depth pass over every distinct served output (the live backend
    leaves them out where nothing reads them, see :class:`~helios_rl.env.live.LiveBackend`); a figure not
    measured is ``None``, never a default."""

    def __init__(self, loader, max_model_len: int, reference_model: str | None = None, batch: int = 16,
                 teacher_forced: bool = True, reference_ppl: bool = True) -> None:
        self.acc = AccuracyScorer(loader, max_model_len, batch)
        self.reference = reference_model if reference_ppl else None
        self.teacher_forced = teacher_forced
        self.max_len = max_model_len
        self.cpu_s = 0.0
        self.wall_s = 0.0
        self.tokens = 0
        self.requests = 0
        self._ref_cache: dict[tuple, tuple[float, int]] = {}
        self._expected: list[tuple[str | list[int], int]] = []  # (prompt, new tokens) of the requests to come
        self._expected_done: set[str] = set()  # models whose references for them were computed

    @property
    def measures(self) -> list[str]:
        """The figures this scorer measures."""
        return ["agreement"] + ["teacher_forced_agreement"] * self.teacher_forced \
            + ["reference_ppl"] * (self.reference is not None)

    def expect(self, requests: list[tuple[str | list[int], int]]) -> None:
        """The ``(prompt, max new tokens)`` of the requests about to be served (an episode's workload): the first
        time a model's reference continuation is needed, every expected request's is computed at once, in this
        order and batched (rather than a handful at a time as requests finish), so each reference is computed
        the same way whichever method served first."""
        self._expected, self._expected_done = list(requests), set()

    def _expected_jobs(self, models: set[str]) -> list[tuple[str, list[int], list[int]]]:
        jobs = []
        for model in sorted(models - self._expected_done):
            self._expected_done.add(model)
            for prompt, n in self._expected:
                ctx = self.acc.contexts(prompt, [Segment(model)])[0][1]
                if n > 0 and len(ctx) + n <= self.max_len:  # (one the engine would refuse is not expected)
                    jobs.append((model, ctx, [0] * n))  # (only the length of the third element is read)
        return jobs

    def score(self, served: list[ServedRequest]) -> list[RequestScore]:
        """Score finished requests (batched: every reference continuation they need at once)."""
        cpu0, wall0 = time.process_time(), time.perf_counter()
        jobs = {r.request_id: [j for j in self.acc.contexts(r.prompt, r.segments) if j[2]] for r in served}
        flat = [j for js in jobs.values() for j in js]
        self.acc._references(self._expected_jobs({m for m, _, _ in flat}))  # alone: the same batches every time
        self.acc._references(flat)  # what was not expected (a context after a switch)
        out = []
        for r in served:
            s = RequestScore(r.request_id, r.task)
            for model, ctx, ids in jobs[r.request_id]:
                ref = self.acc.reference(model, ctx, len(ids))
                s.tokens += len(ids)
                s.match += sum(1 for x, y in zip(ids, ref) if x == y)
                if self.teacher_forced:
                    s.agree += self.acc.teacher_forced(model, ctx, ids)[0]
                    s.tf_tokens += len(ids)
            if self.reference is not None and r.text:
                s.ref_nll, s.ref_tokens = self._reference_nll(r.prompt, r.text)
            out.append(s)
            self.tokens += s.tokens
        self.requests += len(served)
        self.cpu_s += time.process_time() - cpu0
        self.wall_s += time.perf_counter() - wall0
        return out

    def _reference_nll(self, prompt: str | list[int], text: str) -> tuple[float, int]:
        """Summed NLL and token count of ``text`` after ``prompt`` under the reference model."""
        lm = self.acc.model(self.reference)
        tok = lm.tokenizer
        if tok is None or not isinstance(prompt, str):
            return 0.0, 0
        key = (prompt, text)
        if key not in self._ref_cache:
            ctx = tok(prompt, add_special_tokens=True)["input_ids"]
            ids = tok(text, add_special_tokens=False)["input_ids"]
            room = self.max_len - 1 - len(ids)
            if room < 1:
                ids = ids[: self.max_len // 2]
                room = self.max_len - 1 - len(ids)
            ctx = ctx[-room:]
            _, nll = score_continuation(lm, ctx, ids) if ids else (0, 0.0)
            self._ref_cache[key] = (nll, len(ids))
        return self._ref_cache[key]

    def cost(self, served_cpu_s: float | None = None) -> dict:
        """What scoring cost: CPU seconds per scored token and, given serving's CPU seconds, its share."""
        per = self.cpu_s / self.tokens if self.tokens else None
        out = {"cpu_s": round(self.cpu_s, 4), "wall_s": round(self.wall_s, 4), "tokens": self.tokens,
               "requests": self.requests, "cpu_s_per_token": per}
        if served_cpu_s:
            out["share_of_serving"] = round(self.cpu_s / served_cpu_s, 4)
        return out

    def close(self) -> None:
        self.acc.close()
