"""Training data for exit heads: real text as token chunks, and the frozen model's features over them.

Text comes from the workload's real sources (gensim news and Wikipedia; ShareGPT first turns with
their replies, chat-formatted when the tokenizer has a template). The train/held-out split is the
workload's document hash (:func:`helios_rl.workload.prompts.split_of`), so the held-out prompts that
benchmarks generate from never share a document with the text heads were trained or calibrated on.

The model is frozen, so its forward pass over the data is run exactly once: :func:`extract_features`
keeps the hidden state after each chosen exit layer plus the final layer's top-k log-probabilities
and argmax (the distillation target), which is all that training and calibration need.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from helios_rl.models.heads import CONFIDENCE_MEASURES, confidence
from helios_rl.workload import texts
from helios_rl.workload.prompts import split_of

SOURCES = ("news", "wiki", "sharegpt")


@dataclass
class TokenData:
    """Token chunks ``[n, seq_len]`` per split, and where they came from."""

    train: torch.Tensor
    heldout: torch.Tensor
    info: dict = field(default_factory=dict)


def _doc_texts(source: str, tokenizer) -> list[tuple[str, str]]:
    """``(split key, text)`` for every document of ``source``."""
    if source != "sharegpt":
        return [(d.id, d.text) for d in texts.load_source(source)]
    out = []
    for c in texts.load_sharegpt():
        key = re.sub(r"_\d+$", "", c.id)
        if c.reply and getattr(tokenizer, "chat_template", None):
            msgs = [{"role": "user", "content": c.human}, {"role": "assistant", "content": c.reply}]
            out.append((key, tokenizer.apply_chat_template(msgs, tokenize=False)))
        else:
            out.append((key, c.human + ("\n\n" + c.reply if c.reply else "")))
    return out


def build_token_data(tokenizer, tokens: int, seq_len: int = 128, heldout_share: float = 0.25, seed: int = 0,
                     sources: tuple[str, ...] = SOURCES, max_doc_chunks: int = 1) -> TokenData:
    """About ``tokens`` tokens of real text in chunks of ``seq_len``, split by document.

    Each source contributes an equal share; documents are taken in a seeded order and each gives at
    most ``max_doc_chunks`` chunks from seeded random positions, so many documents (and not only
    their openings) are seen.
    """
    rng = np.random.default_rng(seed)
    budgets = {"train": int(tokens * (1 - heldout_share)), "heldout": int(tokens * heldout_share)}
    out: dict[str, list[list[int]]] = {"train": [], "heldout": []}
    info: dict = {"sources": list(sources), "seq_len": seq_len, "seed": seed, "docs": {}}
    for source in sources:
        docs = _doc_texts(source, tokenizer)
        order = rng.permutation(len(docs))
        for split, budget in budgets.items():
            want = max(1, budget // len(sources) // seq_len)
            got, ndocs = 0, 0
            for i in order:
                key, text = docs[i]
                if split_of(key) != split:
                    continue
                ids = tokenizer(text, add_special_tokens=True)["input_ids"]
                chunks = [ids[j:j + seq_len] for j in range(0, len(ids) - seq_len + 1, seq_len)]
                if not chunks:
                    continue
                chunks = [chunks[c] for c in sorted(rng.permutation(len(chunks))[:max_doc_chunks])]
                take = chunks[: want - got]
                out[split] += take
                got += len(take)
                ndocs += 1
                if got >= want:
                    break
            info["docs"][f"{source}/{split}"] = ndocs
    info["tokens"] = {s: len(v) * seq_len for s, v in out.items()}
    return TokenData(torch.tensor(out["train"], dtype=torch.long).view(-1, seq_len),
                     torch.tensor(out["heldout"], dtype=torch.long).view(-1, seq_len), info)


def generated_token_data(model, tokens: int, seq_len: int = 128, heldout_share: float = 0.25, seed: int = 0,
                         batch: int = 16, progress: bool = True) -> TokenData:
    """About ``tokens`` tokens of the model's own greedy continuations of train-split workload prompts.

    Why: served tokens are the model's own continuations, which are more predictable than human text,
    so heads and thresholds fitted on them match what the engine sees. Each chunk is a prompt cropped
    to about ``seq_len / 3`` tokens followed by the continuation that fills it to ``seq_len``. The
    prompts come from the workload's *train* split only, so held-out benchmark prompts stay unseen.
    """
    from helios_rl.engine.config import EngineSettings
    from helios_rl.engine.engine import Engine
    from helios_rl.engine.request import SamplingParams
    from helios_rl.exits.profile import workload_prompts

    n = max(2, tokens // seq_len)
    prompts = workload_prompts(model, n, max(8, seq_len // 3), seed, split="train")
    ids = [model.tokenizer(p, add_special_tokens=True)["input_ids"][: seq_len - 8] for p in prompts]
    engine = Engine(model, EngineSettings(max_batch=batch, max_model_len=seq_len + 8))
    params = [SamplingParams(max_new_tokens=seq_len - len(i), ignore_eos=True) for i in ids]
    bar = tqdm(total=n, desc="generating", unit="seq", disable=not progress, leave=False)
    rids = [engine.add_request(i, p) for i, p in zip(ids, params)]
    while engine.has_unfinished():
        bar.update(sum(e.finished for e in engine.step()))
    bar.close()
    seqs = torch.tensor([engine.requests[r].token_ids[:seq_len] for r in rids], dtype=torch.long)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = max(1, int(round(n * heldout_share)))
    info = {"generated": {"prompts_split": "train", "sequences": n, "seq_len": seq_len,
                          "generated_tokens": int(sum(p.max_new_tokens for p in params))}}
    return TokenData(seqs[order[k:]], seqs[order[:k]], info)


def merge(a: TokenData, b: TokenData) -> TokenData:
    """Both corpora (same ``seq_len``), infos merged."""
    return TokenData(torch.cat([a.train, b.train]), torch.cat([a.heldout, b.heldout]), {**a.info, **b.info})


def _causal_mask(t: int, window: int | None, device) -> torch.Tensor:
    q = torch.arange(t, device=device)[:, None]
    k = torch.arange(t, device=device)[None, :]
    m = k <= q
    if window is not None:
        m &= k > q - window
    return m[None, None]


@torch.inference_mode()
def run_stack(model, ids: torch.Tensor, keep: tuple[int, ...] = ()) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Teacher-forced pass over ``ids`` [B, T] through every loaded layer (no cache).

    Returns the hidden states after the layers in ``keep`` and after the last loaded layer.
    """
    fam, dev = model.family, model.device
    ids = ids.to(dev)
    pos = torch.arange(ids.shape[1], device=dev)[None].expand_as(ids)
    h = fam.embed(ids, pos)
    tables = fam.position_tables(h, pos)
    masks: dict[int | None, torch.Tensor] = {}
    kept = {}
    for i in range(model.depth):
        win = fam.sliding_window(i)
        if win not in masks:
            masks[win] = _causal_mask(ids.shape[1], win, dev)
        h = fam.run_layer(i, h, masks[win], None, tables, pos)
        if i in keep:
            kept[i] = h
    return kept, h


@dataclass
class Features:
    """Per-token features of one split (N tokens): exit-layer hidden states and the final layer's output.

    ``shared`` (optional) holds the shared head's argmax and confidences at each exit layer on the
    tokens :func:`shared_subset` picks, for the tuned-vs-shared comparison.
    """

    hidden: dict[int, torch.Tensor]  # layer -> [N, H] float32
    top_ids: torch.Tensor  # [N, k] final layer's top-k token ids
    top_logp: torch.Tensor  # [N, k] their log-probabilities (full softmax)
    final_argmax: torch.Tensor  # [N]
    shared: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.final_argmax.shape[0])

    def save(self, path) -> None:
        torch.save({"hidden": self.hidden, "top_ids": self.top_ids, "top_logp": self.top_logp,
                    "final_argmax": self.final_argmax, "shared": self.shared}, path)

    @classmethod
    def load(cls, path) -> "Features":
        return cls(**torch.load(path, weights_only=False))


def _row_chunks(n: int, vocab: int) -> int:
    """Rows per LM-head chunk so one chunk of logits stays near 256 MB."""
    return max(1, min(n, (1 << 26) // max(vocab, 1)))


@torch.inference_mode()
def shared_head_stats(model, h: torch.Tensor) -> dict[str, np.ndarray]:
    """Argmax and every confidence measure of the shared head (final norm + LM head) on ``h`` [N, H]."""
    out: dict[str, list] = {"argmax": [], **{m: [] for m in CONFIDENCE_MEASURES}}
    step = _row_chunks(len(h), model.vocab_size)
    for s in range(0, len(h), step):
        logits = model.heads.final_logits(h[s:s + step].to(model.device, model.dtype)).float()
        out["argmax"].append(logits.argmax(-1).cpu())
        for m in CONFIDENCE_MEASURES:
            out[m].append(confidence(logits, m).cpu())
    return {k: torch.cat(v).numpy() for k, v in out.items()}


@torch.inference_mode()
def extract_features(model, seqs: torch.Tensor, layers: tuple[int, ...], topk: int = 32, batch_size: int = 8,
                     shared: int = 0, progress: bool = True, desc: str = "features") -> Features:
    """Run the frozen model once over ``seqs`` [n, T]; keep what exit-head training needs.

    ``shared``: also score the shared head on (an even spread of) that many tokens, for the tuned-vs-
    shared comparison (each costs one full LM head per layer). The model must be loaded to full
    depth (the final layer is the teacher).
    """
    if model.depth != model.num_layers:
        raise ValueError(f"{model.name}: feature extraction needs every layer loaded "
                         f"(depth {model.depth} of {model.num_layers})")
    hidden: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    top_ids, top_logp, argmax = [], [], []
    k = min(topk, model.vocab_size)
    bar = tqdm(total=int(seqs.numel()), desc=desc, unit="tok", disable=not progress, leave=False)
    for b in range(0, len(seqs), batch_size):
        ids = seqs[b:b + batch_size]
        kept, h = run_stack(model, ids, tuple(layers))
        for l in layers:
            hidden[l].append(kept[l].reshape(-1, kept[l].shape[-1]).float().cpu())
        hf = h.reshape(-1, h.shape[-1])
        step = _row_chunks(len(hf), model.vocab_size)
        for s in range(0, len(hf), step):
            logp = torch.log_softmax(model.heads.final_logits(hf[s:s + step]).float(), dim=-1)
            v, i = logp.topk(k, dim=-1)
            top_ids.append(i.cpu())
            top_logp.append(v.cpu())
            argmax.append(i[:, 0].cpu())
        bar.update(int(ids.numel()))
    bar.close()
    feats = Features({l: torch.cat(v) for l, v in hidden.items()}, torch.cat(top_ids), torch.cat(top_logp),
                     torch.cat(argmax))
    if shared:
        idx = shared_subset(len(feats), shared)
        for l in tqdm(layers, desc="shared head", disable=not progress, leave=False):
            feats.shared[l] = shared_head_stats(model, feats.hidden[l][idx])
    return feats


def shared_subset(n: int, k: int) -> torch.Tensor:
    """Indices of an even spread of ``min(n, k)`` of ``n`` tokens."""
    return torch.linspace(0, n - 1, min(n, k)).round().long().unique()


def token_counts(tokenizer, vocab_size: int, seed: int = 0, max_chars: int = 3_000_000,
                 sources: tuple[str, ...] = SOURCES) -> np.ndarray:
    """How often each token id occurs in train-split text of ``sources`` (about ``max_chars`` characters)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    rng = np.random.default_rng(seed + 1)
    for source in sources:
        docs = _doc_texts(source, tokenizer)
        budget = max_chars // len(sources)
        for i in rng.permutation(len(docs)):
            key, text = docs[i]
            if split_of(key) != "train":
                continue
            text = text[:20_000]
            ids = np.asarray(tokenizer(text, add_special_tokens=True)["input_ids"], dtype=np.int64)
            np.add.at(counts, ids[ids < vocab_size], 1)
            budget -= len(text)
            if budget <= 0:
                break
    return counts


def choose_vocab(counts: np.ndarray, teacher_argmax: torch.Tensor, size: int,
                 always: tuple[int, ...] = ()) -> torch.Tensor:
    """The ``size`` most useful exit-vocabulary ids: teacher argmax tokens first, then frequent text tokens.

    Sorted ids; ``always`` (e.g. EOS and other special tokens) are included.
    """
    vocab = len(counts)
    score = counts.astype(np.float64) / max(counts.sum(), 1)
    t = np.bincount(teacher_argmax.numpy(), minlength=vocab)[:vocab].astype(np.float64)
    score += 4.0 * t / max(t.sum(), 1)
    score[[a for a in always if 0 <= a < vocab]] = np.inf
    ids = np.argsort(-score, kind="stable")[: min(size, vocab)]
    return torch.as_tensor(np.sort(ids), dtype=torch.long)
