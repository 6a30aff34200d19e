"""``helios-rl generate``: run the engine on one prompt and show, per token, the layer it exited at."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text and show each token's exit layer")
    p.add_argument("--model", default="smollm2-135m", help="bundled name, local folder, .gguf file or hub id")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--depth", type=int, default=None, help="layers to load (default: all)")
    p.add_argument("--threshold", type=float, default=None,
                   help="confidence threshold for early exit (default: calibrated thresholds if tuned heads "
                        "exist, else no early exit)")
    p.add_argument("--exit-layers", default=None, help="comma-separated exit layers (default: tuned heads' layers)")
    p.add_argument("--measure", default="max_prob", choices=("max_prob", "margin", "entropy"))
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--kv-strategy", default="recompute", choices=("recompute", "copy"))
    p.add_argument("--device", default=None)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.text import Text

    from helios_rl.engine.config import EngineSettings, ServingConfig
    from helios_rl.engine.engine import Engine
    from helios_rl.engine.request import SamplingParams
    from helios_rl.models.registry import load_model

    model = load_model(args.model, depth=args.depth, device=args.device)
    engine = Engine(model, EngineSettings(kv_strategy=args.kv_strategy, max_batch=1))
    if args.exit_layers:
        layers = tuple(int(x) for x in args.exit_layers.split(","))
    elif model.heads.adapters:
        layers = tuple(sorted(model.heads.adapters))
    elif args.threshold is not None:
        layers = tuple(range(model.depth - 1))
    else:
        layers = ()
    engine.apply(ServingConfig(exit_layers=layers, threshold=args.threshold, measure=args.measure))
    prompt = args.prompt
    if args.chat:
        prompt = model.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                     add_generation_prompt=True)
    (req,) = engine.generate([prompt], SamplingParams(max_new_tokens=args.max_new_tokens,
                                                      temperature=args.temperature, top_p=args.top_p, seed=args.seed))
    console = Console()
    console.print(Text(req.output_text))
    console.print()
    console.print(f"[bold]{model.name}[/] depth {model.depth}/{model.num_layers}, exit layers "
                  f"{list(layers) or 'none'}; per token (layer is 0-based):")
    tok = model.tokenizer
    for t, layer in zip(req.output_ids, req.exit_layers):
        console.print(f"  {tok.decode([t])!r:>20}  layer {layer}")
    mean = sum(req.exit_layers) / max(1, len(req.exit_layers))
    console.print(f"mean exit layer {mean:.2f}; {req.num_generated} tokens; finish: {req.finish_reason}")
    return 0
