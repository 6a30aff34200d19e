"""``tune_exits``: train exit heads on a frozen model by distillation, calibrate, pick layers, save.

Pipeline (EE-Tuning's recipe with CALM's calibration, sized for a CPU):

1. real text -> token chunks, split by document (:mod:`helios_rl.exits.data`);
2. one frozen forward pass over them keeps the candidate layers' hidden states and the final layer's
   top-k log-probabilities (top-k distillation: k=32 entries per token instead of a 49k-262k row);
3. per candidate layer, train a light head (:mod:`helios_rl.exits.heads`) to minimise the cross-
   entropy to the final distribution over the exit vocabulary plus an "other" bucket;
4. on held-out tokens, measure each head's confidence and agreement, time a layer, an exit and the
   final head, keep the (at most ``max_layers``) exit layers whose calibrated cascade is fastest,
   and calibrate thresholds for every confidence measure and a few agreement targets;
5. save safetensors + manifest beside the model, and attach the heads.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from helios_rl.exits import calibrate as cal
from helios_rl.exits.data import (Features, TokenData, build_token_data, choose_vocab, extract_features,
                                  generated_token_data, merge, shared_subset, token_counts)
from helios_rl.exits.heads import TunedExitHeads, new_adapter
from helios_rl.exits.heads_io import describe, parse_targets, read_manifest, save_exit_heads
from helios_rl.exits.profile import target_agreement
from helios_rl.models.heads import CONFIDENCE_MEASURES, confidence, is_no_exit
from helios_rl.utils.provenance import command_line, git_revision, package_versions

TARGETS = (0.99, 0.95, 0.9, 0.8)  # precision targets calibrated by default, each with its own exit layers


@dataclass
class TuneSettings:
    """Everything that shapes the result (recorded in the manifest)."""

    layers: tuple[int, ...] | None = None  # None: candidates spread over the upper part of the stack
    tokens: int = 16384  # real text (news, wiki, ShareGPT)
    generated: int = 8192  # the model's own continuations of train-split prompts (0: none)
    seq_len: int = 128
    heldout_share: float = 0.25
    rank: int = 64
    vocab: int = -1  # exit-vocabulary size; 0: full vocabulary; -1: V/8 clamped to [8192, 32768]
    topk: int = 32
    epochs: int = 6
    batch_size: int = 256
    lr: float = 3e-3
    target: float = 0.95  # the default target (what ``threshold: calibrated`` serves)
    targets: tuple[float, ...] = TARGETS
    mode: str = "per_layer"
    max_layers: int = 3  # exit layers kept when ``layers`` is None (fastest calibrated cascade)
    min_count: int = 20
    shared_tokens: int = 2048  # held-out tokens the shared head is scored on (costs a full LM head each)
    what_if_last: bool = True  # also estimate an exit *at* the last layer (not saved: the engine cannot use it)
    seed: int = 0
    costs: dict | None = None  # batch-1 costs (ms) for layer selection; None: measured (a reproduction reuses them)
    free_running_prompts: int = 8  # held-out prompts generated per target to measure free-running agreement
    free_running_tokens: int = 32


def default_candidates(num_layers: int) -> tuple[int, ...]:
    """Exit-layer candidates: 50%, 60%, 70%, 80% of the depth and the last layer an exit can be taken at.

    Shallower exits were measured useless even at an 80% precision target on SmolLM2 and Gemma3
    (held-out coverage <= 3% below half depth), and each exit evaluated costs about one decoder layer.
    """
    out = {max(0, round(f * num_layers) - 1) for f in (0.5, 0.6, 0.7, 0.8)} | {num_layers - 2}
    return tuple(sorted(l for l in out if 0 <= l <= num_layers - 2))


def exit_vocab_size(vocab_size: int, requested: int) -> int:
    """``requested``, or for -1 one eighth of the vocabulary (an exit costs <= 1/8 of the full head) but
    at least 8192 tokens (about 90% of real-text predictions) and at most 32768."""
    if requested >= 0:
        return min(requested, vocab_size)
    return min(vocab_size, max(8192, min(32768, vocab_size // 8)))


def _targets(feats: Features, lookup: torch.Tensor | None, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher top-k as (class index, probability): in-set ids map into the subset, others to bucket ``k``."""
    ids = feats.top_ids
    if lookup is not None:
        ids = lookup[ids]
        ids = torch.where(ids < 0, torch.full_like(ids, k), ids)
    return ids, feats.top_logp.exp()


def distill_loss(heads: TunedExitHeads, layer: int, h: torch.Tensor, idx: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the head's (subset + other) distribution to the teacher's top-k mass."""
    sub, other = heads.subset_logits(layer, h.to(heads.adapters[layer].up.weight.dtype))
    z = sub if other is None else torch.cat([sub, other[:, None]], dim=-1)
    logq = torch.log_softmax(z.float(), dim=-1)
    return -(p * logq.gather(1, idx)).sum(-1).mean()


@torch.no_grad()
def eval_loss(heads, layer, feats: Features, idx, p, batch: int = 1024) -> float:
    """Held-out KL from the teacher's (bucketed) top-k distribution to the head: cross-entropy minus the
    teacher's own entropy over the same classes, so a perfect head scores 0."""
    h = feats.hidden[layer]
    k = None if heads.vocab_ids is None else int(heads.vocab_ids.numel())
    tot = 0.0
    for s in range(0, len(h), batch):
        pi, ii = p[s:s + batch], idx[s:s + batch]
        ce = float(distill_loss(heads, layer, h[s:s + batch], ii, pi)) * len(pi)
        inset = pi if k is None else pi * (ii != k)
        bucket = (pi - inset).sum(-1)
        ent = -(inset * torch.log(inset.clamp_min(1e-30))).sum() - (bucket * torch.log(bucket.clamp_min(1e-30))).sum()
        tot += ce - float(ent)
    return tot / max(len(h), 1)


def train_layer(heads: TunedExitHeads, layer: int, train: Features, held: Features, lookup, s: TuneSettings,
                progress: bool = True) -> dict:
    """Train ``heads.adapters[layer]`` in place; returns the held-out KL before and after."""
    k = 0 if heads.vocab_ids is None else int(heads.vocab_ids.numel())
    tr_idx, tr_p = _targets(train, lookup, k)
    he_idx, he_p = _targets(held, lookup, k)
    adapter = heads.adapters[layer]
    params = [q for q in adapter.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0)
    h = train.hidden[layer]
    n = len(h)
    steps = max(1, s.epochs * math.ceil(n / s.batch_size))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 20) * 0.5 * (1 + math.cos(math.pi * i / steps)))
    before = eval_loss(heads, layer, held, he_idx, he_p)
    gen = torch.Generator().manual_seed(s.seed * 1000 + layer)
    bar = tqdm(total=steps, desc=f"layer {layer}", disable=not progress, leave=False)
    step = 0
    while step < steps:
        for b in torch.randperm(n, generator=gen).split(s.batch_size):
            loss = distill_loss(heads, layer, h[b], tr_idx[b], tr_p[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
            if step >= steps:
                break
    bar.close()
    after = eval_loss(heads, layer, held, he_idx, he_p)
    return {"heldout_kl_before": round(before, 4), "heldout_kl_after": round(after, 4), "steps": steps}


@torch.no_grad()
def head_stats(heads, layer: int, h: torch.Tensor, final_argmax: torch.Tensor, dtype, device,
               chunk: int = 128) -> dict[str, np.ndarray]:
    """Engine-identical argmax agreement and confidences of ``heads.logits(layer, .)`` on ``h``."""
    out: dict[str, list] = {"correct": [], **{m: [] for m in CONFIDENCE_MEASURES}}
    for s in range(0, len(h), chunk):
        readout = heads.readout(layer, h[s:s + chunk].to(device, dtype))
        out["correct"].append((readout.logits().argmax(-1).cpu() == final_argmax[s:s + chunk]))
        for m in CONFIDENCE_MEASURES:
            out[m].append(readout.confidence(m).float().cpu())
    return {k: torch.cat(v).numpy() for k, v in out.items()}


@torch.inference_mode()
def measure_costs(model, heads: TunedExitHeads, layer: int, repeats: int = 20, batch: int = 1) -> cal.Costs:
    """Time (ms per step of ``batch`` rows) one decoder layer at window 1 and 2, one exit evaluation and
    the final head; the fastest of several rounds, since other load on the CPU only adds time."""
    fam = model.family
    h1 = torch.randn(batch, 1, model.hidden_size, device=model.device, dtype=model.dtype)

    def timed(fn, rounds: int = 5) -> float:  # the fastest round: other load on the CPU only adds time
        fn()
        best = float("inf")
        for _ in range(rounds):
            t = time.perf_counter()
            for _ in range(repeats):
                fn()
            best = min(best, (time.perf_counter() - t) / repeats * 1000)
        return best

    def layer_time(q: int) -> float:
        h = h1.expand(batch, q, -1).contiguous()
        pos = torch.arange(q, device=model.device)[None].expand(batch, q)
        tables = fam.position_tables(h, pos)
        mask = torch.ones(q, q, dtype=torch.bool, device=model.device).tril()[None, None]
        return timed(lambda: fam.run_layer(layer, h, mask, None, tables, pos))

    t1, t2 = layer_time(1), layer_time(2)
    exit_eval = timed(lambda: heads.readout(layer, h1[:, 0]).confidence("max_prob"))
    final = timed(lambda: confidence(heads.final_logits(h1[:, 0]), "max_prob"))
    return cal.Costs(layer=t1, recompute=max(0.0, t2 - t1), exit_eval=exit_eval, final_head=final,
                     num_layers=model.num_layers)


def _pick_layers(conf, correct, candidates, costs: cal.Costs, s: TuneSettings, explicit: bool, target: float):
    if explicit:
        thr = cal.calibrate(conf, correct, candidates, target, s.mode, s.min_count)
        return candidates, costs.speedup(cal.cascade(conf, correct, thr, candidates)["exit_at"], candidates)
    return cal.select_layers(conf, correct, candidates, costs, target, s.mode, s.max_layers, s.min_count)


def calibrate_targets(conf: dict, correct: dict, candidates, costs: cal.Costs, s: TuneSettings,
                      explicit: bool) -> dict[str, dict]:
    """Per precision target: the exit layers whose calibrated cascade runs fastest by ``costs``, their
    thresholds for every confidence measure, and what the cascade does on held-out tokens."""
    out = {}
    for t in sorted(set(s.targets) | {s.target}, reverse=True):
        layers, est = _pick_layers(conf["max_prob"], correct, candidates, costs, s, explicit, t)
        thr = {m: cal.calibrate(conf[m], correct, layers, t, s.mode, s.min_count) if layers else {}
               for m in CONFIDENCE_MEASURES}
        if layers:
            c = cal.cascade(conf["max_prob"], correct, thr["max_prob"], layers)
            exited = c["exit_at"] >= 0
            held = {"exit_rate": round(float(exited.mean()), 4), "agreement": round(c["agreement"], 4),
                    "precision": None if not exited.any() else round(float(
                        np.mean([correct[int(l)][i] for i, l in enumerate(c["exit_at"]) if l >= 0])), 4),
                    "exit_share": {str(l): round(v["exits"] / max(len(exited), 1), 4) for l, v in c["layers"].items()}}
        else:
            held, est = {"exit_rate": 0.0, "agreement": 1.0, "precision": None, "exit_share": {}}, 1.0
        out[_tkey(t)] = {"target": t, "layers": [int(l) for l in layers],
                         "thresholds": {m: {str(l): round(float(v), 6) for l, v in tab.items()} for m, tab in thr.items()},
                         "heldout": held, "estimated_speedup_batch1": round(float(est), 4)}
    return out


def _tkey(t: float) -> str:
    """Manifest key of a precision target: ``0.95`` -> ``"0.95"``."""
    return f"{float(t):g}"


def tune_exits(model, settings: TuneSettings | None = None, data: TokenData | None = None, save: bool = True,
               out: str | None = None, progress: bool = True, feature_cache: str | None = None) -> dict:
    """Train, calibrate, select and save exit heads for ``model`` (loaded to full depth); returns the manifest.

    ``data`` overrides the real-text corpus (models without a tokenizer need it). The heads are
    attached to ``model`` (``model.heads``) afterwards.
    """
    s = settings or TuneSettings()
    bad = [t for t in (*s.targets, s.target) if is_no_exit(t) or not 0.0 < t < 1.0]
    if bad:
        raise ValueError(f"precision targets to calibrate must lie in (0, 1), got {bad} (target 1 means no early "
                         f"exit and needs no calibration)")
    torch.manual_seed(s.seed)
    np.random.seed(s.seed)
    t0 = time.perf_counter()
    revision = git_revision()  # the code that runs, read when the run starts
    explicit = s.layers is not None
    candidates = tuple(sorted(set(s.layers))) if explicit else default_candidates(model.num_layers)
    if not candidates or any(not 0 <= l <= model.num_layers - 2 for l in candidates):
        raise ValueError(f"exit layers must be in 0..{model.num_layers - 2} for {model.name} (the last layer "
                         f"is full depth), got {candidates}")
    if data is None:
        if model.tokenizer is None:
            raise ValueError(f"{model.name} has no tokenizer: pass token data")
        data = build_token_data(model.tokenizer, s.tokens, s.seq_len, s.heldout_share, s.seed)
        if s.generated > 0:
            data = merge(data, generated_token_data(model, s.generated, s.seq_len, s.heldout_share, s.seed,
                                                    progress=progress))
    last = model.num_layers - 1
    keep = candidates + ((last,) if s.what_if_last else ())
    cache = Path(feature_cache) if feature_cache else None
    if cache is not None and (cache / "train.pt").exists() and (cache / "heldout.pt").exists():
        train, held = Features.load(cache / "train.pt"), Features.load(cache / "heldout.pt")
        if not set(keep) <= set(train.hidden):
            raise ValueError(f"{cache}: cached features lack layers {sorted(set(keep) - set(train.hidden))}")
    else:
        train = extract_features(model, data.train, keep, s.topk, progress=progress, desc="features (train)")
        held = extract_features(model, data.heldout, keep, s.topk, shared=s.shared_tokens, progress=progress,
                                desc="features (held-out)")
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)
            train.save(cache / "train.pt")
            held.save(cache / "heldout.pt")
    t_feat = time.perf_counter() - t0
    # --- exit vocabulary
    vocab_ids, lookup = None, None
    k = exit_vocab_size(model.vocab_size, s.vocab)
    if 0 < k < model.vocab_size:
        counts = token_counts(model.tokenizer, model.vocab_size, s.seed) if model.tokenizer is not None \
            else np.bincount(data.train.flatten().numpy(), minlength=model.vocab_size)
        always = tuple(sorted(model.eos_token_ids | set(getattr(model.tokenizer, "all_special_ids", []) or [])))
        vocab_ids = choose_vocab(counts, train.final_argmax, k, always)
        lookup = torch.full((model.vocab_size,), -1, dtype=torch.long)
        lookup[vocab_ids] = torch.arange(len(vocab_ids))
    # --- train (float32 heads), then evaluate the same way the engine will run them
    heads = TunedExitHeads(model.heads, model, vocab_ids)
    serve_weight = heads.sub_weight  # model dtype; training reads a float32 copy
    if heads.sub_weight is not None:
        heads.sub_weight = heads.sub_weight.float()
    training = {}
    for layer in keep:
        heads.adapters[layer] = new_adapter(model, s.rank)
        training[layer] = train_layer(heads, layer, train, held, lookup, s, progress)
    t_train = time.perf_counter() - t0 - t_feat
    for a in heads.adapters.values():
        a.to(device=model.device, dtype=model.dtype).requires_grad_(False).eval()
    heads.sub_weight = serve_weight
    stats = {l: head_stats(heads, l, held.hidden[l], held.final_argmax, model.dtype, model.device) for l in keep}
    measured = measure_costs(model, heads, candidates[-1])
    costs = cal.Costs(**{k: v for k, v in s.costs.items() if k in vars(measured)}) if s.costs else measured
    correct = {l: stats[l]["correct"] for l in candidates}
    conf = {m: {l: stats[l][m] for l in candidates} for m in CONFIDENCE_MEASURES}
    targets = calibrate_targets(conf, correct, candidates, costs, s, explicit)
    default = targets[_tkey(s.target)]
    # adapters kept: every target's layers (a target with none serves without exits)
    layers = tuple(sorted({l for t in targets.values() for l in t["layers"]})) or candidates[-1:]
    heads.adapters = {l: heads.adapters[l] for l in layers}
    thresholds = {"target": s.target, "mode": s.mode,
                  "by_measure": {m: {str(l): v for l, v in tab.items()} for m, tab in default["thresholds"].items()}}
    metrics = evaluate(stats, held, candidates, default["layers"] or list(layers[-1:]),
                       thresholds["by_measure"] if default["layers"] else
                       {"max_prob": {str(layers[-1]): cal.DISABLED}}, s)
    metrics["estimated_speedup_batch1"] = default["estimated_speedup_batch1"]
    if s.what_if_last:
        metrics["last_layer_exit_what_if"] = _last_layer_exit(stats, tuple(default["layers"]) or layers[-1:], last,
                                                              costs, s)
        training.pop(last, None)
    metrics["seconds"] = {"features": round(t_feat, 1), "training": round(t_train, 1),
                          "total": round(time.perf_counter() - t0, 1)}
    if vocab_ids is not None:
        metrics["vocab_coverage_heldout"] = round(float((lookup[held.final_argmax] >= 0).float().mean()), 4)
    manifest_extra = {
        "data": {**data.info, "tokens_total": int(data.train.numel() + data.heldout.numel())},
        "seed": s.seed,
        "provenance": {"command": command_line(), "git_revision": revision, "versions": package_versions(),
                       "threads": torch.get_num_threads(), "device": str(model.device), "dtype": str(model.dtype)},
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(s).items()},
        "candidates": list(candidates),
        "training": {str(l): v for l, v in training.items()},
        "costs_ms": {k: round(v, 3) if isinstance(v, float) else v for k, v in vars(costs).items()},
        "costs_ms_measured": {k: round(v, 3) if isinstance(v, float) else v for k, v in vars(measured).items()},
        "cost_source": "settings (reproduction)" if s.costs else "measured (fastest of 5 rounds, batch 1)",
        "metrics": metrics,
        "thresholds": thresholds,
        "targets": targets,
    }
    heads.thresholds = {m: {int(l): v for l, v in t.items()} for m, t in thresholds["by_measure"].items()}
    heads.targets = parse_targets(targets, Path("<tune-exits>"))
    heads.source = "tuned (unsaved)"
    model.heads = heads
    if s.free_running_prompts > 0 and model.tokenizer is not None:
        measured_fr = target_agreement(model, sorted(heads.targets), s.free_running_prompts, s.free_running_tokens,
                                       seed=s.seed, progress=progress)
        for t, row in measured_fr.items():
            targets[_tkey(t)]["served"] = row
    manifest = describe(model, heads, s.rank, manifest_extra)
    if save:
        folder = save_exit_heads(model, heads, s.rank, manifest_extra, out)
        heads.source = str(folder)
        manifest = {**read_manifest(folder), "path": str(folder)}
    heads.manifest = manifest
    model.heads = heads
    return manifest


def _last_layer_exit(stats: dict, layers: tuple[int, ...], last: int, costs: cal.Costs, s: TuneSettings) -> dict:
    """What an exit evaluated *at* the last layer (before the full LM head) would add to ``layers``.

    The engine runs the full LM head on every token that reaches the last loaded layer; if it tried the
    cheap exit head there first, a confident token would skip that head. Estimated on held-out tokens
    with the measured costs; the head is trained but not saved.
    """
    lay = tuple(layers) + (last,)
    conf, correct = {l: stats[l]["max_prob"] for l in lay}, {l: stats[l]["correct"] for l in lay}
    thr = cal.calibrate(conf, correct, lay, s.target, s.mode, s.min_count)
    c = cal.cascade(conf, correct, thr, lay)
    return {"layers": list(lay), "thresholds": {str(l): round(v, 5) for l, v in thr.items()},
            "coverage": round(float((c["exit_at"] >= 0).mean()), 4), "agreement": round(c["agreement"], 4),
            "last_layer_top1_agreement": round(float(correct[last].mean()), 4),
            "estimated_speedup_batch1": round(costs.speedup(c["exit_at"], lay), 3)}


def evaluate(stats: dict, held: Features, candidates, layers, thr_by_measure: dict, s: TuneSettings) -> dict:
    """Held-out report data: tuned vs shared head per candidate layer (on the tokens the shared head was
    scored on), cascades over all candidates for both, and the selected layers' calibrated cascade."""
    out: dict = {"heldout_tokens": len(held), "per_layer": {}}
    idx = shared_subset(len(held), s.shared_tokens).numpy()
    truth = held.final_argmax.numpy()[idx]
    both = {"tuned": ({l: stats[l]["max_prob"][idx] for l in candidates}, {l: stats[l]["correct"][idx] for l in candidates})}
    if all(l in held.shared for l in candidates):
        both["shared"] = ({l: held.shared[l]["max_prob"] for l in candidates},
                          {l: held.shared[l]["argmax"] == truth for l in candidates})
    out["compared_tokens"] = len(idx)
    for l in candidates:
        row = {f"{name}_top1_agreement": round(float(cr[l].mean()), 4) for name, (_, cr) in both.items()}
        for name, (cf, cr) in both.items():
            row[f"{name}_curve"] = cal.curve(cf[l], cr[l])
            thr = cal.lowest_threshold(cf[l], cr[l], s.target, s.min_count)
            row[f"{name}_coverage_at_target"] = round(float((cf[l] >= thr).mean()) if thr < cal.DISABLED else 0.0, 4)
        if "shared" in both:
            c = row["tuned_coverage_at_target"] or 0.2
            row["equal_coverage"] = c
            for name, (cf, cr) in both.items():
                row[f"{name}_precision_at_coverage"] = round(cal.precision_at_coverage(cf[l], cr[l], c), 4)
        out["per_layer"][str(l)] = row
    gains = [r["tuned_precision_at_coverage"] / max(r["shared_precision_at_coverage"], 1e-9)
             for r in out["per_layer"].values() if "shared_precision_at_coverage" in r]
    out["precision_gain_vs_shared"] = round(float(np.mean(gains)), 4) if gains else None
    out["cascade_all"] = {name: _cascade_summary(cf, cr, candidates, s) for name, (cf, cr) in both.items()}
    conf = {l: stats[l]["max_prob"] for l in layers}
    correct = {l: stats[l]["correct"] for l in layers}
    thr = {int(l): v for l, v in thr_by_measure["max_prob"].items()}
    out["cascade"] = _cascade_summary(conf, correct, layers, s, thr)
    return out


def _cascade_summary(conf, correct, layers, s: TuneSettings, thr: dict[int, float] | None = None) -> dict:
    """Per layer: calibrated threshold, share of tokens exited by it, agreement among them."""
    thr = thr if thr is not None else cal.calibrate(conf, correct, tuple(layers), s.target, s.mode, s.min_count)
    c = cal.cascade(conf, correct, thr, tuple(layers))
    rows = {str(l): {"threshold": round(thr[l], 5), "exits": v["exits"], "coverage": round(v["coverage"], 4),
                     "precision": None if v["cum_precision"] is None else round(v["cum_precision"], 4)}
            for l, v in c["layers"].items()}
    return {"layers": rows, "agreement": round(c["agreement"], 4), "coverage": round(float((c["exit_at"] >= 0).mean()), 4)}
