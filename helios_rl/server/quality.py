"""Sampled scoring of served output in the server, off the request path.

A share (``--score-sample``) of finished requests is queued, with the tokens each model served, to one
background thread that scores them with :class:`~helios_rl.evaluation.scorer.ServedScorer` (its own
full-depth model copies, outside the engine's budget; nothing waits for it). It measures what it exports and
nothing else (the teacher-forced pass, which no metric reads, is not run: it would take CPU from serving).
Results go to metrics: ``helios_served_agreement{model}`` (free-running agreement of the sampled requests,
running token-weighted mean), ``helios_served_reference_ppl{model}`` (perplexity of the sampled served text under
the scenario's reference model, token-weighted; only where a reference model is set), ``helios_scored_requests_total``, ``helios_scorer_dropped_total`` (queue full: the sample is skipped,
never the request) and ``helios_scorer_cpu_seconds_total``. Sampling is seeded.
"""

from __future__ import annotations

import logging
import math
import queue
import random
import threading

from helios_rl.evaluation.scorer import ServedRequest, ServedScorer

log = logging.getLogger("helios_rl.server")


class SampledScorer:
    def __init__(self, loader, max_model_len: int, reference: str | None, metrics, share: float, seed: int = 0,
                 max_pending: int = 64) -> None:
        if not 0.0 < share <= 1.0:
            raise ValueError(f"--score-sample must be in (0, 1], got {share}")
        self.scorer = ServedScorer(loader, max_model_len, reference, teacher_forced=False,
                                   reference_ppl=reference is not None)
        self.metrics, self.share = metrics, share
        self.rng = random.Random(seed)
        self.q: queue.Queue = queue.Queue(maxsize=max_pending)
        self.sums: dict[str, list[int]] = {}  # model -> [tokens, free-running matches]
        self.nll: dict[str, list[float]] = {}  # model -> [summed reference NLL, reference tokens]
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="helios-scorer", daemon=True)
        self.thread.start()

    def offer(self, served: ServedRequest) -> bool:
        """Queue ``served`` for scoring with probability ``share``; never blocks the engine thread."""
        if self.rng.random() >= self.share:
            return False
        try:
            self.q.put_nowait(served)
        except queue.Full:
            self.metrics.scorer_dropped.inc()
            return False
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                item = self.q.get(timeout=0.2)
            except queue.Empty:
                continue
            cpu0 = self.scorer.cpu_s
            try:
                (score,) = self.scorer.score([item])
            except Exception:  # noqa: BLE001 - scoring must never take the server down
                log.exception("scoring a served request failed")
                continue
            finally:
                self.q.task_done()
            self.metrics.scorer_cpu.inc(self.scorer.cpu_s - cpu0)
            self.metrics.scored_requests.inc()
            model = item.segments[-1].model if item.segments else "?"
            tot = self.sums.setdefault(model, [0, 0])
            tot[0], tot[1] = tot[0] + score.tokens, tot[1] + score.match
            if tot[0]:
                self.metrics.served_agreement.labels(model).set(tot[1] / tot[0])
            if score.ref_tokens:
                acc = self.nll.setdefault(model, [0.0, 0])
                acc[0], acc[1] = acc[0] + score.ref_nll, acc[1] + score.ref_tokens
                self.metrics.served_reference_ppl.labels(model).set(math.exp(acc[0] / acc[1]))

    def drain(self, timeout: float = 60.0) -> None:
        """Wait until every queued sample is scored (tests, shutdown)."""
        import time

        end = time.monotonic() + timeout
        while self.q.unfinished_tasks and time.monotonic() < end:
            time.sleep(0.05)

    def close(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5)
        self.scorer.close()
