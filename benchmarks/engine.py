"""Engine benchmark (issue 2): identity with transformers, speed against generate / generate_batch,
reported-versus-measured memory, and the batch that half depth admits under a 1 GiB budget.

    python benchmarks/engine.py --model smollm2-135m --out engine.json

Prompts are real text (gensim's Lee news corpus), cut to a spread of lengths. Every timed run is
preceded by a warm-up; engine and transformers runs alternate and the median is kept.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

from helios_rl.engine.config import EngineSettings
from helios_rl.engine.engine import Engine
from helios_rl.engine.request import SamplingParams
from helios_rl.models.registry import load_model, resolve_model
from helios_rl.utils.io import atomic_write_json
from helios_rl.workload.texts import load_news

GIB = 1 << 30


def real_prompts(tokenizer, n: int, seed: int = 0) -> list[list[int]]:
    """``n`` news passages cut to lengths spread over 24..96 tokens."""
    docs = load_news()
    out = []
    for i in range(n):
        ids = tokenizer(docs[(seed * 7 + i * 13) % len(docs)].text)["input_ids"]
        out.append(ids[: 24 + (i * 37) % 73])
    return out


def engine_run(model, prompts, new_tokens: int, batch: int) -> tuple[float, list[list[int]]]:
    eng = Engine(model, EngineSettings(max_batch=batch, max_model_len=256))
    t = time.perf_counter()
    reqs = eng.generate(prompts, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
    dt = time.perf_counter() - t
    return sum(r.num_generated for r in reqs) / dt, [r.output_ids for r in reqs]


def hf_generate_run(hf, tok, prompts, new_tokens: int, batch: int) -> float:
    """transformers ``generate`` over static batches of ``batch`` left-padded prompts."""
    t = time.perf_counter()
    n = 0
    for i in range(0, len(prompts), batch):  # noqa: B007
        chunk = prompts[i:i + batch]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), tok.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(chunk):
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, pad_token_id=tok.pad_token_id or 0)
        n += (out.shape[1] - width) * len(chunk)
    return n / (time.perf_counter() - t)


def hf_generate_batch_run(hf, prompts, new_tokens: int) -> float:
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    t = time.perf_counter()
    outs = hf.generate_batch(inputs=prompts, generation_config=cfg, progress_bar=False)
    dt = time.perf_counter() - t
    n = sum(len(o.generated_tokens) for o in outs.values())
    return n / dt


def identical_to_hf(model, hf, prompts, new_tokens: int) -> tuple[bool, int]:
    """Engine (batched, continuous) greedy output against batch-1 ``generate`` for every prompt."""
    _, outs = engine_run(model, prompts, new_tokens, batch=len(prompts))
    same = 0
    for p, o in zip(prompts, outs):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          pad_token_id=0)[0, len(p):].tolist()
        same += ref == o
    return same == len(prompts), same


MEMORY_PROBE = r"""
import json, os, sys, gc, psutil, torch
torch.set_num_threads(1)
from helios_rl.engine.config import EngineSettings
from helios_rl.engine.engine import Engine
from helios_rl.models.layered import LayeredModel
folder, depth, slots, shrink_from = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
proc = psutil.Process()
def rss():
    gc.collect()
    return proc.memory_info().rss
# warm-up: imports, allocator arenas and kernels cost the process memory once, not the model
LayeredModel(folder, depth=1, device="cpu", dtype="float32").unload()
before = rss()
model = LayeredModel(folder, depth=shrink_from or depth, device="cpu", dtype="float32")
if shrink_from:
    model.set_depth(depth)
eng = Engine(model, EngineSettings(max_batch=slots, max_model_len=256))
after = rss()
print(json.dumps({"depth": depth, "loaded_from_depth": shrink_from or depth, "reported": eng.resident_bytes(),
                  "measured": after - before}))
"""


def memory_errors(folder: Path, depths: list[int], slots: int, shrink_from: int = 0) -> list[dict]:
    """Fresh process per depth: RSS growth across loading + KV pool allocation vs the engine's report.

    With ``shrink_from`` the model is first loaded deeper and then shrunk, so the row shows that a
    depth decrease really returns memory.
    """
    rows = []
    for d in depths:
        out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(folder), str(d), str(slots), str(shrink_from)],
                             capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["rel_error"] = abs(row["measured"] - row["reported"]) / row["reported"]
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", required=True)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--identity-prompts", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's); 1 is steadier on a shared CPU")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = load_model(args.model, progress=False)
    folder = resolve_model(args.model, progress=False)
    tok = model.tokenizer
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    prompts16 = real_prompts(tok, 16)
    results: dict = {"model": args.model, "new_tokens": args.new_tokens, "device": str(model.device),
                     "torch_threads": torch.get_num_threads(), "runs": {}}

    print("identity check ...", file=sys.stderr)
    ident, n_same = identical_to_hf(model, hf, prompts16[: args.identity_prompts], args.new_tokens)
    results["identity"] = {"prompts": args.identity_prompts, "identical": n_same}

    speed: dict[str, list[float]] = {k: [] for k in ("engine_b8", "hf_b8", "engine_b16", "hf_b16", "hf_gb16")}
    engine_run(model, prompts16[:4], 4, 4)  # warm-up
    hf_generate_run(hf, tok, prompts16[:4], 4, 4)
    hf_generate_batch_run(hf, prompts16[:2], 4)
    for rep in range(args.repeats):
        print(f"speed repeat {rep + 1}/{args.repeats} ...", file=sys.stderr)
        speed["engine_b8"].append(engine_run(model, prompts16, args.new_tokens, 8)[0])
        speed["hf_b8"].append(hf_generate_run(hf, tok, prompts16, args.new_tokens, 8))
        speed["engine_b16"].append(engine_run(model, prompts16, args.new_tokens, 16)[0])
        speed["hf_b16"].append(hf_generate_run(hf, tok, prompts16, args.new_tokens, 16))
        speed["hf_gb16"].append(hf_generate_batch_run(hf, prompts16, args.new_tokens))
    med = {k: statistics.median(v) for k, v in speed.items()}
    results["runs"] = {k: {"tok_s": v, "median": med[k]} for k, v in speed.items()}

    print("memory probes ...", file=sys.stderr)
    n = model.num_layers
    mem = memory_errors(folder, sorted({max(1, n // 4), n // 2, (3 * n) // 4, n}), slots=16)
    mem += memory_errors(folder, [n // 2], slots=16, shrink_from=n)
    results["memory"] = mem

    budget_engine = Engine(model, EngineSettings(memory_budget_bytes=GIB, max_batch=4096, max_model_len=256))
    full, half = budget_engine.admissible_batch(n), budget_engine.admissible_batch(n // 2)
    results["budget_1gib"] = {"max_batch_full_depth": full, "max_batch_half_depth": half, "max_model_len": 256}

    results["summary"] = {
        "identical_to_hf": ident,
        "speedup_vs_generate_b8": med["engine_b8"] / med["hf_b8"],
        "speedup_vs_generate_b16": med["engine_b16"] / med["hf_b16"],
        "speedup_vs_generate_batch": med["engine_b16"] / med["hf_gb16"],
        "engine_tok_s_b16": med["engine_b16"],
        "memory_error_max": max(r["rel_error"] for r in mem),
        "max_batch_gain_half_depth": half / full if full else float("inf"),
    }
    results["machine"] = {"platform": platform.platform(), "cpus": torch.get_num_threads(),
                          "torch": torch.__version__, "date": date.today().isoformat()}
    atomic_write_json(args.out, results)
    print(json.dumps(results["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
