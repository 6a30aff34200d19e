"""Build the model repository: measure each candidate offline into a :class:`ModelProfile` JSON.

What is measured, and how (see :mod:`helios_rl.controllers.repository` for what it is used for):

* sizes from the loaded model (the same numbers the engine's memory budget uses);
* exits: the model's own greedy continuations of calibration prompts (train split, never the
  held-out evaluation prompts) are replayed teacher-forced through every layer; the engine's exit
  rule (first exit layer whose confidence passes its threshold, else a greedy exit at the last
  loaded layer) is applied for every depth HELIOS may load, giving the full-depth exit distribution,
  the predicted agreement with full-depth output and the predicted breach rate per depth;
* speed: engine decode steps timed at three depths x ``repository.batches`` batch sizes, fitted by
  ``t = c0 + c1 b + d (c2 + c3 b)`` (non-negative least squares); prefill time per token-layer from
  the prefill steps; layer-load time per byte from re-reading the layers.

Profiles are cached in ``repository.dir`` (default: ``<cache>/repository``) under a key that covers
the checkpoint, its exit heads, the exit rule, dtype/device/threads and the timing mode. Engine code
changes do not invalidate a profile (HELIOS corrects the speed model live); delete the file to
re-measure after a large engine speed-up.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from helios_rl.controllers.repository import PROFILE_FORMAT, ModelProfile, profile_filename
from helios_rl.engine.config import EngineSettings
from helios_rl.engine.engine import Engine
from helios_rl.engine.request import SamplingParams
from helios_rl.evaluation.accuracy import run_layers
from helios_rl.evaluation.runtime import MODELED, ModelLoader, Timer, exit_layers_for
from helios_rl.models.heads import confidence
from helios_rl.scenario import Scenario
from helios_rl.utils.paths import cache_dir
from helios_rl.workload.workload import build_pool


def repository_dir(scenario: Scenario) -> Path:
    return Path(scenario.repository.dir) if scenario.repository.dir else cache_dir() / "repository"


def profile_key(ref: str, scenario: Scenario) -> str:
    """Fingerprint of everything a profile depends on (a changed one means re-measure)."""
    from helios_rl.models.registry import resolve_model

    folder = resolve_model(ref, progress=False)
    parts = {"format": PROFILE_FORMAT, "ref": ref, "config": (folder / "config.json").read_text(encoding="utf-8"),
             "exits": repr(scenario.exits), "repo": repr(replace(scenario.repository, dir=None)),
             "device": scenario.engine.device, "dtype": scenario.engine.dtype, "threads": scenario.engine.threads,
             "timing": scenario.backend.timing, "max_model_len": scenario.engine.max_model_len}
    heads = scenario.exits.heads_for(ref)
    manifest = (Path(heads) if heads not in ("auto", "shared") else folder / "exit_heads") / "manifest.json"
    if heads != "shared" and manifest.exists():
        parts["heads"] = hashlib.sha256(manifest.read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def calibration_texts(scenario: Scenario, n: int) -> list[str]:
    """``n`` prompts from the workload's *train* split, round-robin over its tasks (seeded)."""
    spec = replace(scenario.workload, split="train")
    pool = build_pool(spec)
    if not len(pool):
        pool = build_pool(replace(spec, split="all"))
    rng = np.random.default_rng(scenario.seed + 1234)
    tasks = [t for t in spec.tasks.used_tasks() if pool.by_task(t)] or list(pool.tasks())
    return [pool.sample(tasks[i % len(tasks)], rng).text for i in range(n)]


def ensure_repository(scenario: Scenario, loader: ModelLoader, timer: Timer,
                      say: Callable[[str], None] = lambda s: None) -> dict[str, ModelProfile]:
    """Profiles of every scenario model, measured now where missing or stale."""
    folder = repository_dir(scenario)
    out = {}
    texts = None
    for ref in scenario.models:
        key = profile_key(ref, scenario)
        path = folder / profile_filename(ref)
        if path.exists():
            try:
                prof = ModelProfile.load(path)
                if prof.key == key:
                    out[ref] = prof
                    continue
            except ValueError:
                pass
        say(f"profiling {ref} for the model repository (once; cached in {path})")
        texts = texts or calibration_texts(scenario, scenario.repository.prompts)
        prof = build_profile(ref, scenario, loader, timer, texts)
        prof.key = key
        prof.save(path)
        out[ref] = prof
    return out


def build_profile(ref: str, scenario: Scenario, loader: ModelLoader, timer: Timer, texts: list[str]) -> ModelProfile:
    lm = loader(ref, None)
    try:
        return _measure(lm, ref, scenario, timer, texts)
    finally:
        lm.unload()


def _measure(lm, ref: str, scenario: Scenario, timer: Timer, texts: list[str]) -> ModelProfile:
    ex = scenario.exits
    L = lm.num_layers
    if ex.mode == "target":  # the scenario's default precision target names layers and thresholds
        spec = lm.heads.target(ex.target) if lm.heads.targets else None
        table = spec.thresholds.get(ex.measure, {}) if spec is not None else {}
        layers = [l for l in (spec.layers if spec is not None else ()) if l < L - 1]
    else:
        layers = exit_layers_for(lm, ex.layers_for(ref), ex.measure)
        table = {}

    def thr(layer: int) -> float:
        return float(ex.threshold) if ex.threshold is not None else float(table.get(layer, 1.1))

    prof = ModelProfile(
        name=ref, num_layers=L, non_layer_bytes=lm.weight_bytes_at_depth(0), vocab_size=lm.vocab_size,
        layer_bytes=[lm.layer_bytes(i) for i in range(L)], adapter_bytes=int(lm.heads.nbytes()),
        kv_bytes_per_token_layer=lm.kv_bytes_per_token_layer(), hidden_size=lm.hidden_size,
        elem_bytes=torch.tensor([], dtype=lm.dtype).element_size(), max_positions=lm.max_positions,
        exit_layers=layers, heads="trained" if lm.heads.adapters else "shared", measure=ex.measure,
        head_layers=sorted(lm.heads.adapters), intermediate_size=lm.intermediate_size, num_heads=lm.num_heads,
        num_kv_heads=lm.num_kv_heads, head_dim=lm.head_dim)
    tok = lm.tokenizer
    prompts = [tok(t, add_special_tokens=True)["input_ids"][:48] for t in texts] if tok is not None else \
        [[(7 * i + j) % (lm.vocab_size - 3) + 3 for j in range(16)] for i in range(len(texts))]
    new = scenario.repository.new_tokens
    eng = Engine(lm, EngineSettings(max_batch=len(prompts), max_model_len=64 + new, measure=ex.measure))
    reqs = eng.generate(prompts, SamplingParams(max_new_tokens=new, ignore_eos=True))
    _simulate_exits(prof, lm, [(r.prompt_ids, r.output_ids) for r in reqs], layers, thr)
    _measure_speed(prof, lm, prompts, scenario, timer)
    prof.meta = {"calibration_prompts": len(prompts), "new_tokens": new, "timing": timer.mode,
                 "threads": torch.get_num_threads(), "thresholds": {str(l): thr(l) for l in layers}}
    return prof


@torch.inference_mode()
def _simulate_exits(prof: ModelProfile, lm, seqs: list[tuple[list[int], list[int]]], layers: list[int],
                    thr: Callable[[int], float]) -> None:
    """Apply the engine's exit rule, teacher-forced, at every depth option (see module docstring)."""
    L = lm.num_layers
    depths = prof.depth_options()
    need = set(layers) | {d - 1 for d in depths if d < L}
    conf: dict[int, list[np.ndarray]] = {l: [] for l in need}
    top: dict[int, list[np.ndarray]] = {l: [] for l in need}
    final: list[np.ndarray] = []
    for prompt, out in seqs:
        ids = list(prompt) + list(out)
        kept, h = run_layers(lm, ids[:-1], need)
        sl = slice(len(prompt) - 1, len(ids) - 1)
        for l in need:
            logits = lm.heads.logits(l, kept[l][sl])
            conf[l].append(confidence(logits, prof.measure).float().cpu().numpy())
            top[l].append(logits.argmax(-1).cpu().numpy())
        final.append(lm.heads.final_logits(h[sl]).argmax(-1).cpu().numpy())
    fin = np.concatenate(final)
    c = {l: np.concatenate(v) for l, v in conf.items()}
    a = {l: np.concatenate(v) for l, v in top.items()}
    n = fin.size
    for d in depths:
        exited = np.zeros(n, dtype=bool)
        token = np.full(n, -1, dtype=np.int64)
        where = np.full(n, d - 1, dtype=np.int64)
        for l in sorted(layers):
            if l >= d - 1:
                break
            hit = ~exited & (c[l] >= thr(l))
            token[hit], where[hit] = a[l][hit], l
            exited |= hit
        rest = ~exited
        token[rest] = fin[rest] if d == L else a[d - 1][rest]
        if d < L:  # below full depth every token still in flight at the last loaded layer is a breach,
            # unless that layer is an exit layer and the token meets its threshold there
            greedy = rest & (c[d - 1] < thr(d - 1)) if d - 1 in layers else rest
        else:
            greedy = np.zeros(n, dtype=bool)
        prof.agreement[d] = float((token == fin).mean()) if n else 1.0
        prof.breach_rate[d] = float(greedy.mean()) if (n and d < L) else 0.0
        if d == L:
            prof.exit_share = (np.bincount(where, minlength=L) / max(n, 1)).tolist()
    prof.calibration_tokens = int(n)


def _measure_speed(prof: ModelProfile, lm, prompts: list[list[int]], scenario: Scenario, timer: Timer) -> None:
    L = lm.num_layers
    if timer.mode == "modeled":
        prof.step_coef = [MODELED["c0"], MODELED["c_tok"], MODELED["c_depth"], MODELED["c_row_layer"]]
        prof.prefill_s_per_token_layer = MODELED["c_prefill"]
        prof.load_s_per_byte = MODELED["c_load"]
        return
    samples, prefill_rates = [], []
    for d in sorted({max(1, L // 4), max(1, L // 2), L}):
        lm.set_depth(d)
        for b in scenario.repository.batches:
            eng = Engine(lm, EngineSettings(max_batch=b, max_model_len=96))
            for i in range(b):
                eng.add_request(prompts[i % len(prompts)][:32], SamplingParams(max_new_tokens=8, ignore_eos=True))
            t0 = timer.start()
            eng.step()
            pre = timer.elapsed(t0)
            prefill_rates.append(pre / max(1, eng.telemetry.steps[-1].prefill_tokens * d))
            times = []
            for _ in range(4):
                t0 = timer.start()
                eng.step()
                times.append(timer.elapsed(t0))
            samples.append([d, b, float(np.median(times))])
    prof.step_samples = samples
    prof.step_coef = fit_step_model(samples)
    prof.prefill_s_per_token_layer = float(np.median(prefill_rates))
    lm.set_depth(1)
    t0 = timer.start()
    lm.set_depth(L)
    prof.load_s_per_byte = timer.elapsed(t0) / max(1, sum(prof.layer_bytes[1:]))


def fit_step_model(samples: list[list[float]]) -> list[float]:
    """Non-negative least squares for ``t = c0 + c1 b + c2 d + c3 d b`` (features dropped until >= 0)."""
    s = np.asarray(samples, dtype=float)
    d, b, t = s[:, 0], s[:, 1], s[:, 2]
    feats = np.stack([np.ones_like(d), b, d, d * b], axis=1)
    active = [0, 1, 2, 3]
    coef = np.zeros(4)
    while active:
        sol, *_ = np.linalg.lstsq(feats[:, active], t, rcond=None)
        if (sol >= 0).all():
            coef[:] = 0
            coef[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    return coef.tolist()
