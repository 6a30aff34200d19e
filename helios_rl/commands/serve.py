"""``helios-rl serve``: the OpenAI-compatible HTTP server with a controller deciding model, depth and batch."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve an OpenAI-compatible API under a controller (static, helios, policy)",
                       description="Serve SCENARIO's candidate models (or one --model) over HTTP. The controller "
                                   "decides model, depth and batch every control interval; errors and timeouts fall "
                                   "back to HELIOS (or static).")
    p.add_argument("scenario", nargs="?", help="scenario YAML (envs/...); omit and give --model for a quick start")
    p.add_argument("--model", default=None, help="serve one model without a scenario (bundled name, folder, hub id)")
    p.add_argument("--controller", default=None,
                   help="static | helios | random | policy:runs/<id> (default: helios with a scenario, else static)")
    p.add_argument("--shadow", default=None, help="log this controller's decisions without applying them")
    p.add_argument("--shadow-log", default=None, help="JSONL file for shadow decisions (default: runs/shadow/...)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait beyond the batch cap; more get 429 with Retry-After")
    p.add_argument("--interval", type=float, default=None, help="seconds between decisions (default: scenario's)")
    p.add_argument("--decision-deadline-ms", type=float, default=50.0,
                   help="a decision not back within this is replaced by the fallback's")
    p.add_argument("--profiles", default="auto", choices=("auto", "facts"),
                   help="auto: model repository (measured once, cached); facts: checkpoint sizes only (fast start)")
    p.add_argument("--served-name", default=None, help="model alias in /v1/models (default: scenario name)")
    p.add_argument("--admin-token", default=None, help="require 'Authorization: Bearer TOKEN' on /admin/*")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of the engine (default: the scenario's engine.threads, else 1)")
    p.add_argument("--max-batch", type=int, default=16, help="--model only: batch cap")
    p.add_argument("--max-model-len", type=int, default=512, help="--model only: tokens per request")
    p.add_argument("--log-level", default="info")
    p.add_argument("--max-connections", type=int, default=256,
                   help="concurrent /v1 connections; beyond it a request gets 503 with Retry-After (0: unbounded)")
    p.add_argument("--enable-fault-injection", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--score-sample", type=float, default=0.0,
                   help="share of finished requests to score off the request path (free-running agreement, "
                        "reference perplexity; needs full-depth model copies outside the budget); 0: none")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from helios_rl.server import ServerSettings, create_app, runtime_from_model, runtime_from_scenario

    if (args.scenario is None) == (args.model is None):
        raise ValueError("give a SCENARIO file or --model NAME (exactly one)")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.decision_deadline_ms <= 0:
        raise ValueError(f"--decision-deadline-ms must be > 0, got {args.decision_deadline_ms}")
    controller = args.controller or ("helios" if args.scenario else "static")
    settings = ServerSettings(max_queue=args.max_queue, decision_deadline_s=args.decision_deadline_ms / 1e3,
                              admin_token=args.admin_token, shadow_log=args.shadow_log,
                              score_sample=args.score_sample, max_connections=args.max_connections,
                              fault_injection=args.enable_fault_injection,
                              torch_threads=args.threads if args.threads is not None or args.scenario else 1)
    if args.scenario:
        from helios_rl.scenario import Scenario

        sc = Scenario.from_yaml(args.scenario)
        settings.served_name = args.served_name or sc.name
        settings.interval_s = args.interval or sc.backend.interval_s
        settings.default_temperature = sc.sampling.temperature
        settings.seed = sc.seed
        rt = runtime_from_scenario(args.scenario, controller, args.shadow, settings, args.profiles)
    else:
        settings.served_name = args.served_name or args.model
        settings.interval_s = args.interval or settings.interval_s
        rt = runtime_from_model(args.model, controller, args.shadow, settings, args.max_batch, args.max_model_len)
    for note in rt.notes:
        print(note)
    st = rt.loop.state
    print(f"serving {rt.served_ids} on http://{args.host}:{args.port} (controller {controller}; "
          f"{st.model} at depth {st.depth}/{st.num_layers}, batch cap {st.max_batch}, queue {args.max_queue})",
          flush=True)
    uvicorn.run(create_app(rt), host=args.host, port=args.port, log_level=args.log_level)
    return 0
