"""Prometheus metrics of one server (its own :class:`CollectorRegistry`, so two apps never collide).

vLLM-style request metrics (requests by status, TTFT / TPOT / end-to-end histograms, token counters,
running / waiting gauges) plus what is particular to early-exit serving under a controller: tokens
per exit layer, greedy exits and confidence breaches, the loaded depth and active model, switches
and layer loads, memory budget use, and the controller's decision time, fallbacks and overrides.

Everything is updated from the engine thread (or the control thread) and read by ``/metrics``;
``prometheus_client`` metrics are thread-safe.
"""

from __future__ import annotations

from typing import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from helios_rl.engine.telemetry import TelemetrySnapshot

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_TPOT = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_DECISION = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.5)


class ServerMetrics:
    """All metrics of one server; see the module docstring."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        # --- requests (vLLM-style) ---
        self.requests = Counter("helios_requests", "HTTP generation requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        # --- quality of served output (sampled, scored off the request path) ---
        self.served_agreement = Gauge("helios_served_agreement", "Free-running agreement of sampled served "
                                      "requests with the serving model's full-depth output", ["model"], registry=r)
        self.served_reference_ppl = Gauge("helios_served_reference_ppl", "Perplexity of sampled served text under "
                                          "the reference model (token-weighted)", ["model"], registry=r)
        self.scored_requests = Counter("helios_scored_requests", "Sampled requests scored", registry=r)
        self.scorer_dropped = Counter("helios_scorer_dropped", "Samples skipped (scorer queue full)", registry=r)
        self.connections_refused = Counter("helios_connections_refused", "Connections refused over max_connections",
                                           registry=r)
        self.cancelled = Counter("helios_requests_cancelled", "Requests cancelled through the API", registry=r)
        self.scorer_cpu = Counter("helios_scorer_cpu_seconds", "CPU seconds spent scoring samples", registry=r)
        self.request_success = Counter("helios_request_success", "Finished requests by finish reason",
                                       ["finished_reason"], registry=r)
        self.prompt_tokens = Counter("helios_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("helios_generation_tokens", "Generated tokens", registry=r)
        self.ttft = Histogram("helios_time_to_first_token_seconds", "Time to first token", buckets=_LATENCY,
                              registry=r)
        self.tpot = Histogram("helios_time_per_output_token_seconds", "Time per output token after the first",
                              buckets=_TPOT, registry=r)
        self.e2e = Histogram("helios_e2e_request_latency_seconds", "Arrival to last token", buckets=_LATENCY,
                             registry=r)
        self.running = Gauge("helios_num_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("helios_num_requests_waiting", "Requests waiting for a batch slot", registry=r)
        self.outstanding = Gauge("helios_num_requests_outstanding", "Accepted requests not yet finished",
                                 registry=r)
        self.queue_limit = Gauge("helios_queue_limit", "Outstanding requests beyond which new ones get 429",
                                 registry=r)
        # --- early exit and control state ---
        self.exit_tokens = Counter("helios_exit_layer_tokens", "Tokens by the layer they exited at (0-based)",
                                   ["model", "layer"], registry=r)
        self.greedy_exits = Counter("helios_greedy_exits", "Tokens that reached the last loaded layer unconfident",
                                    registry=r)
        self.breaches = Counter("helios_confidence_breaches", "Greedy exits below the model's full depth",
                                registry=r)
        self.depth = Gauge("helios_loaded_depth", "Layers loaded of the active model", registry=r)
        self.num_layers = Gauge("helios_model_layers", "Layers of the active model", registry=r)
        self.active_model = Gauge("helios_active_model", "1 for the active model, 0 for the other candidates",
                                  ["model"], registry=r)
        self.max_batch = Gauge("helios_max_batch", "Effective batch cap (config and memory budget)", registry=r)
        self.switches = Counter("helios_model_switches", "Model switches", registry=r)
        self.loads = Counter("helios_layer_loads", "Weight loads (model switches and depth increases)", registry=r)
        self.resident = Gauge("helios_memory_resident_bytes", "Resident weights + KV", registry=r)
        self.weight_bytes = Gauge("helios_memory_weight_bytes", "Resident weights", registry=r)
        self.kv_bytes = Gauge("helios_memory_kv_bytes", "KV storage", registry=r)
        self.budget_bytes = Gauge("helios_memory_budget_bytes", "Memory budget (0: none)", registry=r)
        self.budget_used = Gauge("helios_memory_budget_used_ratio", "Resident bytes / budget (0: no budget)",
                                 registry=r)
        self.tokens_per_s = Gauge("helios_tokens_per_second", "Output tokens/s over the last control interval",
                                  registry=r)
        # --- controller ---
        self.decision_seconds = Histogram("helios_controller_decision_seconds", "Time inside decide()",
                                          ["controller"], buckets=_DECISION, registry=r)
        self.decisions = Counter("helios_controller_decisions", "Decisions by source and what became of them",
                                 ["source", "result"], registry=r)
        self.fallbacks = Counter("helios_controller_fallbacks", "Decisions taken by the fallback, by reason",
                                 ["reason"], registry=r)
        self.apply_errors = Counter("helios_config_apply_errors", "Configs the engine refused", ["source"],
                                    registry=r)
        self.overrides = Counter("helios_admin_overrides", "Admin config overrides", ["result"], registry=r)
        self.engine_errors = Counter("helios_engine_errors", "Engine steps that raised", registry=r)
        self.available = Gauge("helios_engine_available", "1 while the engine can serve, 0 while it cannot "
                               "(see /health for why)", registry=r)
        self.available.set(1)
        self.steps = Counter("helios_engine_steps", "Engine steps", registry=r)
        self._layers_seen: set[tuple[str, int]] = set()

    # ------------------------------------------------------------------ updates (engine thread)
    def observe_exits(self, model: str, layers: Iterable[int]) -> None:
        """Count one step's tokens by exit layer."""
        counts: dict[int, int] = {}
        for layer in layers:
            counts[layer] = counts.get(layer, 0) + 1
        for layer, n in counts.items():
            self.exit_tokens.labels(model, str(layer)).inc(n)
        self.generation_tokens.inc(sum(counts.values()))

    def observe_finished(self, reason: str, prompt_tokens: int, ttft: float | None, tpot: float | None,
                         e2e: float | None) -> None:
        self.request_success.labels(reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        if ttft is not None:
            self.ttft.observe(ttft)
        if tpot is not None:
            self.tpot.observe(tpot)
        if e2e is not None:
            self.e2e.observe(e2e)

    def observe_state(self, snap: TelemetrySnapshot, models: Iterable[str], max_batch: int) -> None:
        """Gauges from a telemetry snapshot (called once per control interval and after applies)."""
        self.running.set(snap.running)
        self.waiting.set(snap.waiting)
        self.depth.set(snap.depth)
        self.num_layers.set(snap.num_layers)
        self.max_batch.set(max_batch)
        for m in set(models) | {snap.model}:
            self.active_model.labels(m).set(1.0 if m == snap.model else 0.0)
        self.resident.set(snap.resident_bytes)
        self.weight_bytes.set(snap.weight_bytes)
        self.kv_bytes.set(snap.kv_bytes)
        self.budget_bytes.set(snap.budget_bytes or 0)
        self.budget_used.set(snap.resident_bytes / snap.budget_bytes if snap.budget_bytes else 0.0)
        if snap.steps:
            self.tokens_per_s.set(snap.tokens_per_s)

    def render(self) -> bytes:
        """The Prometheus text exposition of this server's registry."""
        return generate_latest(self.registry)
