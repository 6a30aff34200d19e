"""``helios-rl demo``: the main job on its embedded default, end to end on the bundled model.

Prepares the bundled SmolLM2 (converted once, cached), then serves held-out real prompts (news,
Wikipedia, ShareGPT) through the early-exit engine under a memory budget, at full depth and at
partial depths, and prints what each configuration achieved. Later stages (simulator calibration,
PPO training, live comparison) join this command as they land.
"""

from __future__ import annotations

import argparse
import time


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the embedded default end to end on the bundled model")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--requests", type=int, default=12)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--budget-gib", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from helios_rl.engine.config import EngineSettings, ServingConfig
    from helios_rl.engine.engine import Engine
    from helios_rl.engine.request import SamplingParams
    from helios_rl.models.registry import load_model
    from helios_rl.workload import WorkloadSpec, build_workload

    console = Console()
    model = load_model(args.model)
    tok = model.tokenizer
    spec = WorkloadSpec.from_dict({"arrival": {"kind": "poisson", "rate": 4.0}, "num_requests": args.requests,
                                   "split": "heldout", "seed": args.seed, "max_new_tokens": args.max_new_tokens,
                                   "prompt_tokens": [16, 96]})
    reqs = build_workload(spec, count_tokens=lambda s: len(tok(s)["input_ids"]))
    engine = Engine(model, EngineSettings(memory_budget_bytes=int(args.budget_gib * (1 << 30)), max_batch=64,
                                          max_model_len=256))
    table = Table(title=f"{model.name}: {len(reqs)} held-out prompts, {args.max_new_tokens} new tokens each, "
                        f"budget {args.budget_gib} GiB")
    for col in ("depth", "max batch", "resident MiB", "tokens/s", "mean exit layer", "first output"):
        table.add_column(col)
    for depth in (model.num_layers, (3 * model.num_layers) // 4, model.num_layers // 2):
        engine.apply(ServingConfig(depth=depth, exit_layers=tuple(sorted(model.heads.adapters))))
        t0 = time.perf_counter()
        outs = engine.generate([r.prompt_text for r in reqs],
                               SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True))
        dt = time.perf_counter() - t0
        n = sum(o.num_generated for o in outs)
        layers = [layer for o in outs for layer in o.exit_layers]
        table.add_row(str(depth), str(engine.max_batch), f"{engine.resident_bytes() / 2**20:.0f}", f"{n / dt:.1f}",
                      f"{sum(layers) / len(layers):.1f}", repr(outs[0].output_text[:40]))
    console.print(table)
    return 0
