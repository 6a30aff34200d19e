"""The serving engine: continuous batching with per-request early exit.

One ``step()`` is ``schedule() -> execute() -> update()``: admit waiting requests into free KV slots
(prefill), advance every running request by one token (each row exits at its own layer), then
append tokens, check stop conditions and free finished slots. ``apply(ServingConfig)`` changes the
active model, loaded depth, thresholds or batch cap between steps without losing a request.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch

from helios_rl.engine.config import EngineSettings, ServingConfig
from helios_rl.engine.exits import CONFIDENCE
from helios_rl.engine.forward import ExitPolicy, LayerLoop
from helios_rl.engine.kv_cache import KVPool
from helios_rl.engine.memory import model_activation_bytes
from helios_rl.engine.request import Request, RequestError, SamplingParams, Status
from helios_rl.engine.sampling import select_tokens
from helios_rl.engine.telemetry import RequestRecord, StepRecord, Telemetry, TelemetrySnapshot
from helios_rl.models.heads import CONFIDENCE_MEASURES
from helios_rl.models.attention import sdpa_scope
from helios_rl.models.layered import LayeredModel, release_freed_memory
from helios_rl.utils.nvml import NvmlEnergy, open_energy_counter

ModelLoader = Callable[[str, int | None], LayeredModel]
MAX_STEP_FAILURES = 3  # consecutive failing steps before the engine calls itself unavailable


@dataclass
class TokenEvent:
    """One token produced for one request in one step."""

    request_id: str
    token_id: int
    exit_layer: int
    finished: bool
    finish_reason: str | None = None


class ApplyError(ValueError):
    """A config change failed while being made and was rolled back; the engine serves its previous config
    (a ``ValueError``, as a rejected config is: callers treat both as "this config did not take")."""


class EngineUnavailable(RuntimeError):
    """The engine could not restore a config after a failure: it serves nothing until it recovers."""


def _what(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class Engine:
    """Early-exit continuous-batching engine over one active :class:`LayeredModel`.

    Args:
        model: the initial model (already loaded to its initial depth).
        settings: fixed engine settings (budget, batch cap, KV strategy, ...).
        loader: ``loader(name, depth)`` returns another model when ``apply`` switches to it.
        clock: time source for arrivals, TTFT and TPOT (wall clock by default; the environment
            passes a virtual clock).
    """

    def __init__(self, model: LayeredModel, settings: EngineSettings | None = None,
                 loader: ModelLoader | None = None, clock: Callable[[], float] | None = None) -> None:
        self.settings = settings or EngineSettings()
        self.settings.validate()
        self.loader = loader
        self.clock = clock or time.perf_counter
        self.model = model
        self.telemetry = Telemetry()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self.step_count = 0
        self.config = ServingConfig(model=model.name, depth=model.depth, max_batch=None,
                                    threshold=None, exit_layers=(), measure=self.settings.measure)
        self.max_len = min(self.settings.max_model_len, model.max_positions)
        self.pool: KVPool | None = None
        self.loop: LayerLoop | None = None
        self._policy = ExitPolicy()
        self.max_batch = 0
        self._energy = open_energy_counter(model.device) if self.settings.energy else None
        self.unavailable: str | None = None  # why the engine cannot serve (None: it can)
        self._recover_to: ServingConfig | None = None
        self._next_recovery, self._recovery_wait = 0.0, 0.0
        self._failed: list[Request] = []  # failed outside a step; reported by the next step's events
        self.step_failures = 0  # consecutive steps that raised
        self._last_step_error = ""
        self._configure(self.config, self.model)

    @property
    def exit_mode(self) -> str:
        """``confidence`` (real exits) or ``replay`` (exits replayed from a measured distribution)."""
        return self._policy.decider.mode

    # ================================================================== requests
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, arrival_time: float | None = None) -> str:
        """Queue a request; raises :class:`RequestError` naming the problem if it cannot be served."""
        if self.unavailable is not None:
            raise EngineUnavailable(self.unavailable)
        params = params or SamplingParams()
        params.validate()
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("prompt is empty")
            if self.model.tokenizer is None:
                raise RequestError(f"model {self.model.name} has no tokenizer: pass token ids")
            ids = self.model.tokenizer(prompt, add_special_tokens=True)["input_ids"]
            text = prompt
        else:
            ids, text = [int(t) for t in prompt], None
            if any(t < 0 or t >= self.model.vocab_size for t in ids):
                raise RequestError(f"prompt token ids must be in [0, {self.model.vocab_size})")
        if not ids:
            raise RequestError("prompt is empty")
        if len(ids) >= self.max_len:
            raise RequestError(f"prompt has {len(ids)} tokens; the context holds {self.max_len} "
                               f"(max_model_len), leaving no room to generate")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.requests and not self.requests[rid].finished:
            raise RequestError(f"request id {rid!r} is already in use")
        req = Request(rid, ids, params, prompt_text=text,
                      arrival_time=self.clock() if arrival_time is None else arrival_time)
        if not params.greedy and params.seed is not None:  # on the model's device: sampling runs there
            req.generator = torch.Generator(device=self.model.device).manual_seed(params.seed)
        self.requests[rid] = req
        self.waiting.append(req)
        self.telemetry.record_arrival(req.arrival_time)
        return rid

    def release(self, request_id: str) -> Request | None:
        """Forget a finished request (servers call this once the client has its result)."""
        req = self.requests.get(request_id)
        if req is not None and req.finished:
            return self.requests.pop(request_id)
        return None

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def pending_errors(self) -> bool:
        """Requests failed outside a step (a config change that could not be undone) not yet reported."""
        return bool(self._failed)

    def abort(self, request_id: str) -> None:
        req = self.requests.get(request_id)
        if req is None or req.finished:
            return
        if req in self.waiting:
            self.waiting.remove(req)
        self._finish(req, "abort")

    # ================================================================== control
    def apply(self, config: ServingConfig) -> ServingConfig:
        """Change model / depth / batch cap / thresholds at a step boundary; returns the new config.

        Transactional. A config that is invalid (``ValueError``) changes nothing. A change that fails
        while it is being made (out of memory, a missing or truncated weights file, a layer that fails
        to load) is rolled back: the engine returns to its previous config with every request intact
        and :class:`ApplyError` says what failed. Only if the previous config cannot be restored either
        are the accepted requests failed, each with that error, and the engine marked unavailable
        (:attr:`unavailable`); :meth:`step` then keeps trying to bring the previous config back.

        Memory stays within the budget throughout: a switch frees the old model and its KV before the
        new one loads, a batch-cap change resizes the KV pool one layer at a time, and re-prefills are
        chunked by ``max_prefill_tokens``. Accepted requests always continue: across a depth change
        and a batch shrink (re-prefilled where needed) and across a model switch (on the new model,
        from their text so far).
        """
        if self.unavailable is not None:
            raise EngineUnavailable(self.unavailable)
        new = config.merged_over(self.config)
        self._check_fields(new)
        prev = self.config
        if new.model != self.model.name:
            if self.loader is None:
                raise ValueError(f"unknown model {new.model!r}: this engine has no loader for other models")
            validate = getattr(self.loader, "validate", None)
            if validate is not None:  # a bad name or depth is refused before anything is unloaded
                validate(new.model, config.depth)
            return self._apply_switch(new, config.depth, prev)
        self._check(new, self.model)
        try:
            self._configure(new, self.model)
        except Exception as exc:  # noqa: BLE001 - rolled back, then reported
            self._restore(prev, self.model, exc)
        return self.config

    def _apply_switch(self, new: ServingConfig, depth: int | None, prev: ServingConfig) -> ServingConfig:
        old = self.model
        _ = old.tokenizer  # kept: requests are re-tokenized after the old weights are gone
        saved = self._save_requests()
        self._drop_pool()
        old.unload()  # the budget holds one model: the old one goes before the new one loads
        self.telemetry.memory_note(self.resident_bytes())
        model = None
        try:
            model = self.loader(new.model, depth)  # depth None: the new model's full depth
            self.telemetry.loads += 1
            new.depth = model.depth
            self._check(new, model)
            self._retokenize(old, model)
            self._configure(new, model)
        except Exception as exc:  # noqa: BLE001 - rolled back, then reported
            if model is not None:
                model.unload()
            self._restore_requests(saved)
            self._reload(prev, old.name, exc)
        self.telemetry.switches += 1
        return self.config

    def _check_fields(self, cfg: ServingConfig) -> None:
        """What can be validated without the model."""
        if cfg.max_batch is not None and (not isinstance(cfg.max_batch, int) or cfg.max_batch < 1):
            raise ValueError(f"max_batch must be an integer >= 1, got {cfg.max_batch!r}")
        if cfg.measure not in CONFIDENCE_MEASURES:
            raise ValueError(f"measure must be one of {CONFIDENCE_MEASURES}, got {cfg.measure!r}")
        if cfg.target is not None and (isinstance(cfg.target, bool) or not isinstance(cfg.target, (int, float))
                                       or not 0.0 < cfg.target <= 1.0):
            raise ValueError(f"target must be a precision in (0, 1], got {cfg.target!r}")

    def _check(self, cfg: ServingConfig, model: LayeredModel) -> None:
        self._check_fields(cfg)
        if not isinstance(cfg.depth, int) or not 1 <= cfg.depth <= model.num_layers:
            raise ValueError(f"depth must be between 1 and {model.num_layers} for {model.name}, got {cfg.depth!r}")
        for layer in cfg.exit_layers or ():
            if not 0 <= layer < model.num_layers:
                raise ValueError(f"exit layer {layer} is outside {model.name}'s 0..{model.num_layers - 1}")
        if cfg.target is not None and model.heads.targets:
            model.heads.target(cfg.target)  # ValueError naming the calibrated targets
        thr = cfg.threshold
        vals = thr.values() if isinstance(thr, dict) else ([] if thr in (None, "calibrated") else [thr])
        for v in vals:
            if not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(f"threshold must be in [0, 1], got {v!r}")
        if self.admissible_batch(cfg.depth, model) < 1:
            raise ValueError(f"memory budget {self.settings.memory_budget_bytes} bytes cannot hold {model.name} "
                             f"at depth {cfg.depth} plus one request's KV")

    def admissible_batch(self, depth: int | None = None, model: LayeredModel | None = None) -> int:
        """Largest batch the memory budget admits at ``depth`` (the settings' cap when no budget)."""
        model = model or self.model
        depth = model.depth if depth is None else depth
        cap = self.settings.max_batch
        budget = self.settings.memory_budget_bytes
        if budget is None:
            return cap
        free = budget - model.weight_bytes_at_depth(depth) - model.heads.nbytes() - prefill_bytes(self.settings, model)
        return max(0, min(cap, free // slot_bytes(self.settings, model, depth)))

    def _configure(self, cfg: ServingConfig, model: LayeredModel) -> None:
        """Bring ``model``, the KV pool and the exit policy to ``cfg``, freeing before allocating: a
        shallower depth and a smaller pool shrink first, then what grows grows (the peak stays at the
        larger of the two configs plus one layer's tensor)."""
        old_depth = model.depth
        admissible = self.admissible_batch(cfg.depth, model)
        if admissible < 1:
            raise ValueError(f"memory budget cannot hold {model.name} at depth {cfg.depth}")
        max_batch = min(admissible, cfg.max_batch or admissible)
        self.max_len = min(self.settings.max_model_len, model.max_positions)
        if cfg.depth < old_depth:
            model.set_depth(cfg.depth)
        self._resize_pool(max_batch, cfg.depth, model)
        if cfg.depth > old_depth:
            model.set_depth(cfg.depth)  # all or nothing: a layer that fails to load frees the ones it loaded
            self.telemetry.loads += 1
            self.pool.set_depth(cfg.depth)
            for req in self.running:  # new layers have no K/V for their positions yet: rebuild them
                self.pool.kv_len[req.slot] = 0
                req.needs_prefill = True
        self.telemetry.memory_note(self.resident_bytes(model))
        self.model = model
        self.max_batch = max_batch  # effective cap; cfg.max_batch stays the requested one
        self.config = cfg
        self._policy = self._exit_policy(cfg, model)

    def _exit_policy(self, cfg: ServingConfig, model: LayeredModel) -> ExitPolicy:
        decider = self.settings.exit_replay or CONFIDENCE
        if cfg.target is not None:
            spec = model.heads.target(cfg.target) if model.heads.targets else None
            if spec is None:  # nothing calibrated: no exit can claim the target
                return ExitPolicy(measure=cfg.measure, kv_strategy=self.settings.kv_strategy, decider=decider)
            table = spec.thresholds.get(cfg.measure, {})
            layers = frozenset(l for l in spec.layers if l < model.depth and l in table)
            return ExitPolicy(layers=layers, thresholds={l: float(table[l]) for l in layers}, measure=cfg.measure,
                              kv_strategy=self.settings.kv_strategy, track_confidence=bool(layers), decider=decider)
        layers = frozenset(l for l in (cfg.exit_layers or ()) if l < model.depth)
        calibrated = model.heads.thresholds.get(cfg.measure, {})
        thr: dict[int, float] = {}
        for layer in range(model.num_layers):
            if cfg.threshold == "calibrated":
                thr[layer] = float(calibrated.get(layer, self.settings.default_threshold))
            elif isinstance(cfg.threshold, dict):
                thr[layer] = float(cfg.threshold.get(layer, cfg.threshold.get(str(layer), 1.1)))
            elif cfg.threshold is not None:
                thr[layer] = float(cfg.threshold)
            else:
                thr[layer] = float(calibrated.get(layer, self.settings.default_threshold))
        return ExitPolicy(layers=layers, thresholds=thr, measure=cfg.measure, kv_strategy=self.settings.kv_strategy,
                          track_confidence=bool(layers), decider=decider)

    def _resize_pool(self, slots: int, depth: int, model: LayeredModel) -> None:
        """``slots`` slots at (at most) ``depth`` layers; the pool's own depth grows in ``_configure``."""
        same_model = self.pool is not None and self.loop is not None and self.loop.model is model
        while len(self.running) > slots:  # preempt the newest beyond the cap (they resume by re-prefill)
            self._preempt(self.running.pop())
        if same_model:
            if depth < self.pool.depth:
                self.pool.set_depth(depth)
            if self.pool.num_slots != slots:  # in place, one layer at a time (never two pools)
                keep = {req.slot: i for i, req in enumerate(self.running)}
                self.pool.resize(slots, keep)
                for i, req in enumerate(self.running):
                    req.slot = i
                self.telemetry.memory_note(model.resident_bytes() + self.pool.peak_bytes)
            return
        self._drop_pool()  # the old pool goes before the new one is allocated
        pool = KVPool(slots, min(depth, model.depth), self.max_len, model.num_kv_heads, model.head_dim,
                      model.hidden_size, self.settings.pending_window, model.dtype, model.device,
                      with_hbuf=self.settings.kv_strategy == "recompute")
        for req in self.running:
            req.slot = pool.alloc()
            req.needs_prefill = True
        self.pool = pool
        self.loop = LayerLoop(model, pool)

    def _drop_pool(self) -> None:
        self.pool = None
        self.loop = None
        for req in self.running:
            req.slot = None
            req.needs_prefill = True
        release_freed_memory(self.model.device)

    # ----- rollback ----------------------------------------------------------------------------
    def _save_requests(self) -> list[tuple]:
        return [(r, list(r.token_ids), list(r.output_ids), r.text_before_switch, r.prompt_text,
                 (r.prefix_offset, r.read_offset)) for r in list(self.running) + list(self.waiting)]

    def _restore_requests(self, saved: list[tuple]) -> None:
        for req, token_ids, output_ids, before, prompt, offsets in saved:
            req.token_ids, req.output_ids, req.text_before_switch, req.prompt_text = token_ids, output_ids, before, prompt
            req.prefix_offset, req.read_offset = offsets
            req.needs_prefill = True

    def _restore(self, prev: ServingConfig, model: LayeredModel, exc: BaseException) -> None:
        """Back to ``prev`` on the same model after a failed change; raises ApplyError (or, when even
        that fails, fails the accepted requests and raises EngineUnavailable)."""
        try:
            self._configure(prev, model)
        except Exception as exc2:  # noqa: BLE001
            self._give_up(prev, f"{_what(exc)}; restoring {prev.model} at depth {prev.depth} failed too: {_what(exc2)}")
        raise ApplyError(f"could not apply the config ({_what(exc)}); still serving {prev.model} at depth "
                         f"{prev.depth}") from exc

    def _reload(self, prev: ServingConfig, name: str, exc: BaseException) -> None:
        """Reload the previous model after a failed switch (its weights were freed for the new one)."""
        try:
            model = self.loader(name, prev.depth)
            self.telemetry.loads += 1
            self.model = model
            self._configure(prev, model)
        except Exception as exc2:  # noqa: BLE001
            self._give_up(prev, f"switch failed ({_what(exc)}); reloading {name} at depth {prev.depth} failed "
                                f"too: {_what(exc2)}")
        raise ApplyError(f"could not switch models ({_what(exc)}); back on {name} at depth {prev.depth}") from exc

    def _give_up(self, prev: ServingConfig, reason: str) -> None:
        """The previous config cannot be restored: fail every accepted request with ``reason`` (they are
        reported as ``error`` events by the next step) and stay unavailable until ``prev`` loads again."""
        self.unavailable = reason
        self._recover_to = prev
        now = self.clock()
        for req in list(self.running) + list(self.waiting):
            req.error = f"engine unavailable: {reason}"
            self.waiting = deque(r for r in self.waiting if r is not req)
            self._finish(req, "error", now)
            self._failed.append(req)
        self.pool, self.loop = None, None
        raise EngineUnavailable(reason)

    def _try_recover(self) -> None:
        """Load the config the engine last served, from disk (what was resident is suspect)."""
        prev = self._recover_to
        if self.loader is None or time.monotonic() < self._next_recovery:
            return
        self._recovery_wait = min(30.0, max(0.5, 2 * self._recovery_wait))  # back off: a reload is costly
        self._next_recovery = time.monotonic() + self._recovery_wait
        try:
            self.model.unload()
            model = self.loader(prev.model, prev.depth)
            self.telemetry.loads += 1
            self.model = model
            self._configure(prev, model)
        except Exception as exc:  # noqa: BLE001 - still unavailable; the reason says why
            self.unavailable = f"{self.unavailable} (recovery: {_what(exc)})"[:2000]
            return
        self.unavailable = None
        self._recovery_wait = 0.0

    def _preempt(self, req: Request) -> None:
        if self.pool is not None and req.slot is not None and req.slot < self.pool.num_slots:
            self.pool.free(req.slot)
        req.slot = None
        req.status = Status.WAITING
        req.needs_prefill = True
        req.preemptions += 1
        self.waiting.appendleft(req)

    def _retokenize(self, old: LayeredModel, model: LayeredModel) -> None:
        """Move every accepted request onto ``model``, continuing from its text so far."""
        if _same_tokenizer(old, model):
            return
        max_len = min(self.settings.max_model_len, model.max_positions)
        for req in list(self.running) + list(self.waiting):
            produced = old.tokenizer.decode(req.output_ids, skip_special_tokens=True) if req.output_ids else ""
            prompt = req.prompt_text if req.prompt_text is not None else old.tokenizer.decode(req.prompt_ids)
            req.text_before_switch += produced
            req.token_ids = model.tokenizer(prompt + req.text_before_switch, add_special_tokens=True)["input_ids"]
            req.prompt_text = prompt
            req.output_ids = []
            req.prefix_offset = req.read_offset = 0  # req.text (before + produced) stays as it was
            if len(req.token_ids) >= max_len:
                req.token_ids = req.token_ids[-(max_len - 1):]

    # ================================================================== step
    def step(self) -> list[TokenEvent]:
        """One engine iteration. Returns the tokens produced (and ``error`` events for requests that failed).

        Prefill is chunked: at most ``max_prefill_tokens`` prompt (or re-prefill) positions run per
        step, so a long prompt, a depth grow or a switch never prefills everything at once. A row whose
        prefill completes this step emits its first token; the others continue next step. A failure
        inside the layer loop fails exactly the rows of that call (their requests end with the error)
        and the engine keeps serving the rest; after ``MAX_STEP_FAILURES`` consecutive failing steps it
        reports itself unavailable.
        """
        events: list[TokenEvent] = [TokenEvent(r.request_id, -1, -1, True, "error") for r in self._failed]
        self._failed.clear()
        if self.unavailable is not None:
            self._try_recover()
            if self.unavailable is not None:
                return events
        t_start = self.clock()
        mj0 = self._energy.millijoules() if self._energy is not None else None
        t0 = time.perf_counter()
        self._schedule()
        cap_wait = bool(self.waiting) and len(self.running) >= self.max_batch  # the cap (not prefill) held them
        prefill_rows = [r for r in self.running if r.needs_prefill]
        decode_rows = [r for r in self.running if not r.needs_prefill]
        counts = np.zeros(self.model.num_layers, dtype=np.int64)
        stats = {"greedy": 0, "breach": 0, "conf_sum": 0.0, "conf_n": 0}
        prefill_tokens = prefill_n = prefill_done = 0
        prefill_wall = prefill_cpu = 0.0
        failed = False
        with torch.inference_mode(), sdpa_scope(self.model.device):  # once per step, not per layer
            if prefill_rows:
                tp0, cp0 = time.perf_counter(), time.process_time()  # the prefill pass's own cost, apart
                rows, seqs, done = [], [], []
                budget = self.settings.max_prefill_tokens
                for r in prefill_rows:  # chunks in admission order, until the step's prefill budget is spent
                    start = int(self.pool.kv_len[r.slot, 0])
                    take = min(r.seq_len - start, budget)
                    if take <= 0:
                        continue
                    budget -= take
                    rows.append(r)
                    seqs.append(r.token_ids[: start + take])
                    done.append(start + take == r.seq_len)
                    prefill_tokens += take
                if rows:
                    prefill_n = len(rows)
                    try:  # prefill runs every loaded layer (no exit); its first token is judged like any other
                        exits = self.loop.run_rows([r.slot for r in rows], seqs, self._policy,
                                                   allow_exit=np.zeros(len(rows), dtype=bool))
                    except Exception as exc:  # noqa: BLE001 - fails these rows, not the engine
                        events += self._fail_rows(rows, exc)
                        failed = True
                    else:
                        finished = [r for r, d in zip(rows, done) if d]
                        prefill_done = len(finished)
                        for r in finished:
                            r.needs_prefill = False
                        keep = {i: j for j, i in enumerate(i for i, d in enumerate(done) if d)}
                        exits = [replace(ex, index=keep[ex.index]) for ex in exits if ex.index in keep]
                        events += self._update(finished, exits, counts, stats)
                prefill_wall, prefill_cpu = time.perf_counter() - tp0, time.process_time() - cp0
            if decode_rows:
                depth = self.model.depth
                allow = np.asarray([r.seq_len - self.pool.kv_len[r.slot, depth - 1] <= self.pool.pending_window
                                    for r in decode_rows]) if self._policy.kv_strategy == "recompute" else None
                try:
                    exits = self.loop.run_rows([r.slot for r in decode_rows], [r.token_ids for r in decode_rows],
                                               self._policy, allow)
                except Exception as exc:  # noqa: BLE001 - fails these rows, not the engine
                    events += self._fail_rows(decode_rows, exc)
                    failed = True
                else:
                    events += self._update(decode_rows, exits, counts, stats)
        self.step_failures = self.step_failures + 1 if failed else 0
        if self.step_failures >= MAX_STEP_FAILURES:  # not a bad request: the engine itself is broken
            reason = f"{self.step_failures} consecutive steps failed; last: {self._last_step_error}"
            try:
                self._give_up(self.config, reason)
            except EngineUnavailable:
                pass
            events += [TokenEvent(r.request_id, -1, -1, True, "error") for r in self._failed]
            self._failed.clear()
        duration = time.perf_counter() - t0  # the step ended on the host reading its tokens: GPU work is done
        energy = NvmlEnergy.joules_between(mj0, self._energy.millijoules()) if self._energy is not None else None
        self.step_count += 1
        finished = sum(1 for e in events if e.finished)
        self.telemetry.record_step(StepRecord(
            step=self.step_count, t_start=t_start, duration=duration, model=self.model.name, depth=self.model.depth,
            prefill_tokens=prefill_tokens, decode_tokens=sum(1 for e in events if e.token_id >= 0), exit_counts=counts,
            greedy_exits=stats["greedy"], breaches=stats["breach"], conf_sum=stats["conf_sum"],
            conf_n=stats["conf_n"], running=len(self.running), waiting=len(self.waiting), finished=finished,
            exit_mode=self.exit_mode, energy_j=energy, row_positions=self._row_positions(),
            prefill_rows=prefill_n, prefill_done=prefill_done, prefill_wall_s=prefill_wall,
            prefill_cpu_s=prefill_cpu, cap_wait=cap_wait))
        return events

    def _fail_rows(self, rows: list[Request], exc: BaseException) -> list[TokenEvent]:
        """End ``rows`` with ``exc`` (their K/V is suspect); the engine serves on."""
        self._last_step_error = _what(exc)
        now = self.clock()
        out = []
        for r in rows:
            r.error = f"engine step failed: {_what(exc)}"
            self._finish(r, "error", now)
            out.append(TokenEvent(r.request_id, -1, -1, True, "error"))
        return out

    def _row_positions(self) -> np.ndarray:
        """Positions each layer ran this step, sized to the model's layer count."""
        if self.loop is None:
            return np.zeros(self.model.num_layers, dtype=np.int64)
        return self.loop.take_row_positions()

    def _schedule(self) -> list[Request]:
        """Admit waiting requests into free slots while this step's prefill budget lasts (a long prompt
        is admitted alone and prefilled in chunks over several steps)."""
        admitted = []
        budget = self.settings.max_prefill_tokens - sum(r.seq_len - int(self.pool.kv_len[r.slot, 0])
                                                        for r in self.running if r.needs_prefill)
        while self.waiting and len(self.running) < self.max_batch and self.pool.free_slots:
            req = self.waiting[0]
            if admitted and req.seq_len > budget:
                break
            self.waiting.popleft()
            req.slot = self.pool.alloc()
            req.status = Status.RUNNING
            req.needs_prefill = True
            self.running.append(req)
            admitted.append(req)
            budget -= req.seq_len
        return admitted

    def _update(self, rows: list[Request], exits, counts: np.ndarray, stats: dict) -> list[TokenEvent]:
        events = []
        now = self.clock()
        tokens, bad = self._select(rows, exits)
        for k, ex in enumerate(exits):
            req = rows[ex.index]
            if k in bad:  # one bad row must not fail the batch
                req.error = f"token selection failed: {bad[k]}"
                self._finish(req, "error", now)
                events.append(TokenEvent(req.request_id, -1, ex.layer, True, "error"))
                continue
            tok = tokens[k]
            counts[ex.layer] += 1
            if ex.conf is not None:
                stats["conf_sum"] += ex.conf
                stats["conf_n"] += 1
            if ex.greedy:  # the layer loop marks greedy exits only below full depth: each is a breach
                stats["greedy"] += 1
                stats["breach"] += 1
            req.token_ids.append(tok)
            req.output_ids.append(tok)
            req.num_generated += 1
            req.exit_layers.append(ex.layer)
            req.greedy_flags.append(ex.greedy)
            req.models.append(self.model.name)
            if ex.conf is not None:
                req.confidences.append(ex.conf)
            if req.first_token_time is None:
                req.first_token_time = now
            new_text = self._detokenize(req)
            reason = self._stop_reason(req, tok, new_text)
            if reason is not None:
                self._finish(req, reason, now)
            events.append(TokenEvent(req.request_id, tok, ex.layer, reason is not None, reason))
        return events

    def _select(self, rows: list[Request], exits) -> tuple[list[int], dict[int, str]]:
        """Every exit's token, chosen together on the device (one host copy); rows whose logits are not
        finite are reported in the second value instead."""
        if not exits:
            return [], {}
        logits = torch.stack([ex.logits for ex in exits])
        params = [rows[ex.index].params for ex in exits]
        gens = [rows[ex.index].generator for ex in exits]
        try:
            tokens, top = select_tokens(logits, params, gens, with_max=True)
            picked = torch.stack([tokens.to(top.dtype), top]).tolist()  # one host copy: ids and row maxima
            ids = picked[0]
            bad = {k: "logits are not finite" for k, v in enumerate(picked[1]) if not math.isfinite(v)}
        except RuntimeError as exc:  # a generator on another device, ...: report each row, keep serving
            return [-1] * len(exits), {k: str(exc) for k in range(len(exits))}
        return [int(t) for t in ids], bad

    def _detokenize(self, req: Request) -> str:
        """Append the newest token's text to ``req.text`` and return it. Only a short window of ids is
        decoded (the newest token with the few before it), not the whole output: a byte-level token
        that ends inside a character waits for the next one."""
        tok = self.model.tokenizer
        if tok is None:
            return ""
        ids = req.output_ids
        prefix = tok.decode(ids[req.prefix_offset:req.read_offset], skip_special_tokens=True)
        full = tok.decode(ids[req.prefix_offset:], skip_special_tokens=True)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        new = full[len(prefix):]
        req.prefix_offset, req.read_offset = req.read_offset, len(ids)
        req.text += new
        return new

    def _stop_reason(self, req: Request, tok: int, new_text: str = "") -> str | None:
        if not req.params.ignore_eos and tok in self.model.eos_token_ids:
            return "stop"
        if req.params.stop and new_text:  # only where a stop string can end: in the newest text
            longest = max(len(s) for s in req.params.stop)
            tail = req.text[-(len(new_text) + longest - 1):]
            if any(s in tail for s in req.params.stop):
                return "stop"
        if req.num_generated >= req.params.max_new_tokens or req.seq_len >= self.max_len:
            return "length"
        return None

    def _finish(self, req: Request, reason: str, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        if req in self.running:
            self.running.remove(req)
        if req.slot is not None and self.pool is not None:
            self.pool.free(req.slot)
        req.slot = None
        req.status = Status.FINISHED
        req.finish_reason = reason
        req.finish_time = now
        req.output_text = self.output_text(req)
        self.telemetry.record_request(RequestRecord(req.request_id, req.arrival_time, req.ttft(), req.tpot(),
                                                    now - req.arrival_time, req.num_generated, reason))

    def output_text(self, req: Request) -> str:
        """User-visible output so far (stop strings cut it)."""
        text = self._raw_text(req)
        for s in req.params.stop:
            i = text.find(s)
            if i >= 0:
                text = text[:i]
        return text

    def _raw_text(self, req: Request) -> str:
        """The output text so far, incrementally detokenized (``req.text``)."""
        return req.text

    # ================================================================== helpers
    def run_until_done(self, max_steps: int | None = None) -> list[TokenEvent]:
        events = []
        steps = 0
        while self.has_unfinished() and (max_steps is None or steps < max_steps):
            events += self.step()
            steps += 1
        return events

    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[Request]:
        """Serve ``prompts`` to completion (all queued at once); returns their finished requests."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, SamplingParams(**vars(pp)) if pp else None) for p, pp in zip(prompts, plist)]
        self.run_until_done()
        return [self.requests[i] for i in ids]

    def resident_bytes(self, model: LayeredModel | None = None) -> int:
        """Weights, exit heads and the KV pool (with its pending rings) held now."""
        model = model or self.model
        return model.resident_bytes() + (self.pool.nbytes() if self.pool is not None else 0)

    def snapshot(self, since: float | None = None) -> TelemetrySnapshot:
        return self.telemetry.snapshot(
            since=since, now=self.clock(), model=self.model.name, depth=self.model.depth,
            num_layers=self.model.num_layers, max_batch=self.max_batch, running=len(self.running),
            waiting=len(self.waiting), resident_bytes=self.resident_bytes(),
            weight_bytes=self.model.resident_bytes(), kv_bytes=self.pool.nbytes() if self.pool else 0,
            budget_bytes=self.settings.memory_budget_bytes, exit_mode=self.exit_mode)


def prefill_bytes(settings: EngineSettings, model: LayeredModel) -> int:
    """Activations of the largest prefill chunk (``max_prefill_tokens`` positions), see engine.memory."""
    return model_activation_bytes(model, settings.max_prefill_tokens,
                                  min(settings.max_model_len, model.max_positions))


def slot_bytes(settings: EngineSettings, model: LayeredModel, depth: int) -> int:
    """Memory one running request costs at ``depth``: its KV slot (and pending ring) plus its rows of
    the step's logits at every trained exit below the last loaded layer (see ``KVPool.logits_bytes``)."""
    elem = torch.tensor([], dtype=model.dtype).element_size()
    kv = KVPool.slot_bytes(depth, min(settings.max_model_len, model.max_positions), model.kv_bytes_per_token_layer(),
                           model.hidden_size, settings.pending_window, elem, settings.kv_strategy == "recompute")
    exits = sum(1 for layer in model.heads.adapters if layer < depth - 1)
    return kv + KVPool.logits_bytes(model.vocab_size, exits)


def _same_tokenizer(a: LayeredModel, b: LayeredModel) -> bool:
    """Whether token ids carry over unchanged: same tokenizer files (cheap) or, failing that, same vocab."""
    fa, fb = a.path / "tokenizer.json", b.path / "tokenizer.json"
    if fa.exists() and fb.exists():
        return _file_digest(fa) == _file_digest(fb)
    ta, tb = a.tokenizer, b.tokenizer
    if ta is None and tb is None:
        return a.vocab_size == b.vocab_size
    if ta is None or tb is None:
        return False
    return ta.get_vocab() == tb.get_vocab()


@functools.lru_cache(maxsize=64)
def _file_digest(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()
