"""The engine thread: the only owner of the :class:`Engine`; everything else talks to it by messages.

HTTP handlers put a :class:`Submission` into the inbox and await :class:`StreamEvent` s, which this
thread delivers through ``deliver`` (``loop.call_soon_threadsafe`` into the handler's asyncio queue).
Admin commands arrive as callables and run here between two steps; controller decisions arrive from
the control plane and are applied here too. Admission is bounded: at most ``max_batch + max_queue``
requests may be outstanding (accepted, not finished); :meth:`EngineLoop.try_admit` refuses beyond that
and says how long to wait (the 429's ``Retry-After``). An accepted request always ends with a
``final`` event (or ``failed`` if the engine itself breaks): model switches and depth changes keep
every request (the engine guarantees it).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from helios_rl.engine import Engine, EngineUnavailable, RequestError, SamplingParams, ServingConfig
from helios_rl.evaluation.accuracy import Segment
from helios_rl.evaluation.scorer import ServedRequest
from helios_rl.server.control import ControlPlane, Decision
from helios_rl.server.metrics import ServerMetrics

log = logging.getLogger("helios_rl.server")


@dataclass
class Final:
    """A finished request, as the HTTP layer reports it."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    models: list[str]
    exit_layers: list[int]
    model: str
    depth: int


@dataclass
class StreamEvent:
    """``accepted`` | ``rejected`` (error, param) | ``unavailable`` (error: the engine cannot serve now) |
    ``delta`` (text) | ``final`` (final) | ``failed`` (error)."""

    kind: str
    text: str = ""
    error: str | None = None
    param: str | None = None
    final: Final | None = None


@dataclass
class Submission:
    """One request for the engine thread; ``messages`` (chat) are rendered there with the active model's template."""

    request_id: str
    params: SamplingParams
    deliver: Callable[[StreamEvent], None]
    prompt: str | list[int] | None = None
    messages: list[dict[str, str]] | None = None
    stream: bool = False


@dataclass
class _Live:
    sub: Submission
    sent: str = ""
    segments: list = field(default_factory=list)  # tokens by serving model (for sampled scoring)


@dataclass
class _Call:
    fn: Callable[[Engine], Any]
    future: Future


@dataclass
class _Abort:
    request_id: str


@dataclass
class PublicState:
    """What other threads may read without touching the engine (replaced whole, never mutated)."""

    model: str
    depth: int
    num_layers: int
    config: dict
    max_batch: int
    pinned: bool = False
    alive: bool = True
    models_loaded: list[str] = field(default_factory=list)
    unavailable: str | None = None  # why the engine cannot serve now (None: it can)


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The model's chat template applied to ``messages``; a plain ``role: content`` frame when it has none."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def _param_of(message: str, chat: bool) -> str | None:
    """Request field an engine :class:`RequestError` is about (its message starts with the engine's name)."""
    head = message.split(" ", 1)[0]
    return {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "seed": "seed",
            "stop": "stop"}.get(head, "messages" if chat else "prompt") if head != "request" else None


def _hold_back(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of ``text`` not to stream yet: a possible stop-string prefix or a broken character."""
    keep = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                keep = max(keep, k)
                break
    if text.endswith("\ufffd"):
        keep = max(keep, len(text) - len(text.rstrip("\ufffd")))
    return keep


class EngineLoop:
    """See the module docstring."""

    def __init__(self, engine: Engine, metrics: ServerMetrics, control: ControlPlane | None = None,
                 models: list[str] | None = None, max_queue: int = 64, interval_s: float = 0.25,
                 torch_threads: int | None = None) -> None:
        self.engine = engine
        self.metrics = metrics
        self.control = control
        self.models = list(models or [engine.model.name])
        self.max_queue = int(max_queue)
        self.interval_s = float(interval_s)
        self.torch_threads = torch_threads
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._live: dict[str, _Live] = {}
        self._lock = threading.Lock()
        self._outstanding = 0
        self._finish_rate = 0.0  # finished requests/s, smoothed over control intervals
        self._finished_in_interval = 0
        self._pinned = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen = {"breaches": 0, "switches": 0, "loads": 0}
        self.crashed: BaseException | None = None
        self.scorer = None  # a SampledScorer (helios_rl.server.quality) when --score-sample is set
        self.state = self._public()

    # ------------------------------------------------------------------ any thread
    def try_admit(self) -> tuple[bool, int]:
        """Reserve a place for a new request: ``(True, 0)``, or ``(False, retry_after_seconds)``."""
        with self._lock:
            limit = self.state.max_batch + self.max_queue
            if self._outstanding < limit:
                self._outstanding += 1
                self.metrics.outstanding.set(self._outstanding)
                return True, 0
            excess = self._outstanding - self.state.max_batch + 1
        rate = self._finish_rate
        return False, int(min(60, max(1, math.ceil(excess / rate)))) if rate > 0 else 1

    @property
    def outstanding(self) -> int:
        return self._outstanding

    def submit(self, sub: Submission) -> None:
        """Queue an admitted request (call :meth:`try_admit` first)."""
        self._inbox.put(sub)

    def abort(self, request_id: str) -> None:
        self._inbox.put(_Abort(request_id))

    def cancel(self, request_id: str) -> Future:
        """Cancel an accepted request through the API (future: True if it was live). Its slot and KV are
        freed at the next step boundary; its client gets a final ``cancelled`` answer."""
        def run(engine: Engine) -> bool:
            live = self._live.get(request_id)
            if live is None:
                return False
            engine.abort(request_id)
            self._live.pop(request_id, None)
            req = engine.requests.pop(request_id, None)
            self.metrics.cancelled.inc()
            self.metrics.request_success.labels("cancelled").inc()
            self._done()
            text = req.output_text if req is not None else ""
            final = Final(text, "cancelled", len(req.prompt_ids) if req else 0, req.num_generated if req else 0,
                          list(dict.fromkeys(req.models)) if req else [], list(req.exit_layers) if req else [],
                          engine.model.name, engine.model.depth)
            self._send(live.sub, StreamEvent("final", final=final))
            return True
        return self.call(run)

    def call(self, fn: Callable[[Engine], Any]) -> Future:
        """Run ``fn(engine)`` on the engine thread at the next step boundary."""
        fut: Future = Future()
        if self.crashed is not None or not self.alive:
            fut.set_exception(RuntimeError("the engine loop is not running"))
        else:
            self._inbox.put(_Call(fn, fut))
        return fut

    def post_decision(self, decision: Decision) -> None:
        self._inbox.put(decision)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self._thread is not None:
            return
        self.metrics.queue_limit.set(self.max_queue)
        if self.control is not None:
            self.control.start(self.post_decision)
        self._thread = threading.Thread(target=self._run, name="helios-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
        if self.control is not None:
            self.control.stop()
        if self.scorer is not None:
            self.scorer.close()

    # ------------------------------------------------------------------ engine thread
    def _public(self) -> PublicState:
        e = self.engine
        return PublicState(e.model.name, e.model.depth, e.model.num_layers, e.config.to_dict(), e.max_batch,
                           self._pinned, self.crashed is None, list(self.models), e.unavailable)

    def _run(self) -> None:
        if self.torch_threads:
            import torch

            torch.set_num_threads(self.torch_threads)  # one thread: an oversubscribed pool is far slower
        next_tick = time.perf_counter() + self.interval_s
        last_tick = self.engine.clock()
        try:
            while not self._stop.is_set():
                busy = self.engine.has_unfinished()
                wait = 0.0 if busy else max(0.0, min(next_tick - time.perf_counter(), 0.05))
                self._drain(wait)
                if self.engine.has_unfinished() or self.engine.unavailable is not None or self.engine.pending_errors:
                    self._step()  # also reports requests failed outside a step, and retries recovery
                if time.perf_counter() >= next_tick:
                    last_tick = self._tick(last_tick)
                    next_tick = time.perf_counter() + self.interval_s
        except BaseException as exc:  # noqa: BLE001 - fail every request rather than leave clients hanging
            log.exception("engine loop crashed")
            self.crashed = exc
            raise
        finally:
            self._fail_all("the server is shutting down" if self.crashed is None else f"engine loop crashed: {self.crashed}")
            state = self._public()
            state.alive = False
            self.state = state

    def _drain(self, wait: float) -> None:
        try:
            item = self._inbox.get(timeout=wait) if wait > 0 else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if item is not None:
                self._handle(item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, item: Any) -> None:
        if isinstance(item, Submission):
            self._admit(item)
        elif isinstance(item, _Call):
            if item.future.set_running_or_notify_cancel():
                try:
                    result = item.fn(self.engine)
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    self.state = self._public()
                    item.future.set_exception(exc)
                else:
                    self.state = self._public()  # before the caller wakes: it reads the state next
                    item.future.set_result(result)
        elif isinstance(item, _Abort):
            live = self._live.get(item.request_id)
            if live is not None:
                self.engine.abort(item.request_id)
                self._release(item.request_id, "abort")
        elif isinstance(item, Decision):
            self._apply_decision(item)

    def _admit(self, sub: Submission) -> None:
        chat = sub.messages is not None
        try:
            prompt = render_chat(self.engine.model.tokenizer, sub.messages) if chat else sub.prompt
            self.engine.add_request(prompt, sub.params, request_id=sub.request_id)
        except EngineUnavailable as exc:
            self._send(sub, StreamEvent("unavailable", error=f"engine unavailable: {exc}"))
            self._done()
            return
        except RequestError as exc:
            self._reject(sub, str(exc), _param_of(str(exc), chat))
            return
        except Exception as exc:  # noqa: BLE001 - a prompt the tokenizer or template cannot take
            self._reject(sub, f"{'messages' if chat else 'prompt'} could not be processed: {type(exc).__name__}: "
                              f"{exc}", "messages" if chat else "prompt")
            return
        self._live[sub.request_id] = _Live(sub)
        self._send(sub, StreamEvent("accepted"))

    def _reject(self, sub: Submission, message: str, param: str | None) -> None:
        self._send(sub, StreamEvent("rejected", error=message, param=param))
        self._done()

    def _send(self, sub: Submission, ev: StreamEvent) -> None:
        try:
            sub.deliver(ev)
        except RuntimeError:  # the handler's event loop is gone (server shutting down)
            if sub.request_id in self._live and ev.kind not in ("final", "failed"):
                self.engine.abort(sub.request_id)
                self._release(sub.request_id, "abort")

    def _done(self) -> None:
        with self._lock:
            self._outstanding -= 1
            self.metrics.outstanding.set(self._outstanding)

    def _release(self, rid: str, reason: str) -> None:
        self._live.pop(rid, None)
        self.engine.requests.pop(rid, None)  # a long-running server must not keep every request
        self.metrics.request_success.labels(reason).inc()
        self._done()

    def _step(self) -> None:
        model = self.engine.model.name
        try:
            events = self.engine.step()
        except Exception as exc:  # noqa: BLE001 - a broken step fails its requests, not the server
            log.exception("engine step failed")
            self.metrics.engine_errors.inc()
            self._fail_all(f"engine error: {type(exc).__name__}: {exc}")
            return
        self.metrics.steps.inc()
        if self.state.unavailable != self.engine.unavailable:
            self.state = self._public()  # /health tells the truth from the next request on
            self.metrics.available.set(0 if self.engine.unavailable else 1)
        if not events:
            return
        self.metrics.observe_exits(model, (ev.exit_layer for ev in events))
        for ev in events:
            live = self._live.get(ev.request_id)
            if live is None:
                continue
            req = self.engine.requests[ev.request_id]
            if ev.finished and ev.finish_reason == "error":  # failed by the engine: the client gets why
                self._fail_one(live, req.error or "engine error")
                continue
            if self.scorer is not None and ev.token_id >= 0:
                if not live.segments or live.segments[-1].model != model:
                    live.segments.append(Segment(model))
                live.segments[-1].ids.append(int(ev.token_id))
            if ev.finished:
                self._finish(live, req)
            elif live.sub.stream:
                text = self.engine.output_text(req)
                text = text[: len(text) - _hold_back(text, req.params.stop)]
                if len(text) > len(live.sent) and text.startswith(live.sent):
                    self._send(live.sub, StreamEvent("delta", text=text[len(live.sent):]))
                    live.sent = text

    def _finish(self, live: _Live, req: Any) -> None:
        text = req.output_text
        if live.sub.stream:
            rest = text[len(live.sent):] if text.startswith(live.sent) else ""
            if rest:
                self._send(live.sub, StreamEvent("delta", text=rest))
        models = list(dict.fromkeys(req.models))
        final = Final(text, req.finish_reason or "stop", len(req.prompt_ids), req.num_generated, models,
                      list(req.exit_layers), self.engine.model.name, self.engine.model.depth)
        self.metrics.observe_finished(final.finish_reason, final.prompt_tokens, req.ttft(), req.tpot(),
                                      None if req.finish_time is None else req.finish_time - req.arrival_time)
        self._finished_in_interval += 1
        if self.scorer is not None and live.segments:
            prompt = req.prompt_text if req.prompt_text is not None else list(req.prompt_ids)
            self.scorer.offer(ServedRequest(req.request_id, prompt, live.segments, None, text))
        self._live.pop(req.request_id, None)
        self.engine.requests.pop(req.request_id, None)
        self._done()
        self._send(live.sub, StreamEvent("final", final=final))

    def _fail_one(self, live: _Live, message: str) -> None:
        rid = live.sub.request_id
        self._live.pop(rid, None)
        self.engine.requests.pop(rid, None)
        self.metrics.engine_errors.inc()
        self._done()
        self._send(live.sub, StreamEvent("failed", error=message))

    def _fail_all(self, message: str) -> None:
        for rid, live in list(self._live.items()):
            try:
                self.engine.abort(rid)
            except Exception:  # noqa: BLE001 - the engine may be in a bad state; the client must still hear
                pass
            self._live.pop(rid, None)
            self.engine.requests.pop(rid, None)
            self.metrics.request_success.labels("error").inc()
            self._done()
            self._send(live.sub, StreamEvent("failed", error=message))

    def _tick(self, since: float) -> float:
        now = self.engine.clock()
        snap = self.engine.snapshot(since=since)
        self.metrics.observe_state(snap, self.models, self.engine.max_batch)
        tel = self.engine.telemetry
        for key, counter in (("breaches", self.metrics.breaches), ("switches", self.metrics.switches),
                             ("loads", self.metrics.loads)):
            value = tel.total_breaches if key == "breaches" else getattr(tel, key)
            if value > self._seen[key]:
                counter.inc(value - self._seen[key])
            self._seen[key] = value
        if snap.greedy_exits:
            self.metrics.greedy_exits.inc(snap.greedy_exits)
        dt = max(now - since, 1e-6)
        self._finish_rate = 0.7 * self._finish_rate + 0.3 * (self._finished_in_interval / dt)
        self._finished_in_interval = 0
        if self.control is not None:
            self.control.offer(snap)
        self.state = self._public()
        return now

    def _apply_decision(self, d: Decision) -> None:
        if d.config is None:
            self.metrics.decisions.labels(d.source, "keep").inc()
            return
        if self._pinned:
            self.metrics.decisions.labels(d.source, "pinned").inc()
            return
        try:
            self.engine.apply(d.config)
        except Exception as exc:  # noqa: BLE001 - refused or rolled back: the engine says what it serves now
            log.warning("config from %s (%s) not applied: %s", d.controller, d.source, exc)
            self.metrics.decisions.labels(d.source, "rejected").inc()
            self.metrics.apply_errors.labels(d.source).inc()
            if self.control is not None:
                self.control.rejected(d, f"{type(exc).__name__}: {exc}")
            self.state = self._public()
            self.metrics.available.set(0 if self.engine.unavailable else 1)
            return
        self.metrics.decisions.labels(d.source, "applied").inc()
        self.state = self._public()

    def override(self, config: ServingConfig, pin: bool | None) -> Future:
        """Apply an admin override at the next step boundary (future: the new config dict)."""
        def run(engine: Engine) -> dict:
            if any(v is not None for v in vars(config).values()):
                engine.apply(config)
            if pin is not None:
                self._pinned = pin
            return engine.config.to_dict()
        return self.call(run)
