"""Token selection for a whole step at once, on the model's device: greedy, or temperature with top-k
and nucleus (top-p) filtering, seeded per request.

All rows' logits are stacked into one ``[N, V]`` tensor; filtering, normalisation and the draw run
there, and only the ``N`` chosen ids cross to the host (one copy per step). A sampled row draws by
the exponential race: ``argmax(p / E)`` with ``E ~ Exp(1)`` per vocabulary entry is an exact draw from
``p``, and its noise comes from the request's own generator, so a seeded request gets the same
tokens whatever else shares its batch.
"""

from __future__ import annotations

import torch

from helios_rl.engine.request import SamplingParams

MIN_TEMPERATURE = 1e-5  # below this, dividing logits overflows: treat as greedy


def is_greedy(params: SamplingParams) -> bool:
    return params.greedy or params.temperature < MIN_TEMPERATURE


def filtered_probs(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                   top_k: torch.Tensor) -> torch.Tensor:
    """Rows' sampling distributions ``[N, V]`` after temperature, top-k (0: off) and top-p."""
    probs = torch.softmax(logits.float() / temperature[:, None], dim=-1)
    vocab = probs.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    need_sort = bool((k < vocab).any()) or bool((top_p < 1.0).any())
    if not need_sort:
        return probs
    sorted_p, order = torch.sort(probs, dim=-1, descending=True)
    rank = torch.arange(vocab, device=probs.device)[None, :]
    cum = torch.cumsum(sorted_p, dim=-1)
    drop = (rank >= k[:, None]) | (cum - sorted_p >= top_p[:, None])  # smallest prefix reaching top_p
    drop[:, 0] = False  # the top token always stays, however small top_p or top_k
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(1, order, sorted_p)


def select_tokens(logits: torch.Tensor, params: list[SamplingParams],
                  generators: list[torch.Generator | None], with_max: bool = False):
    """Next token of every row of ``logits`` ``[N, V]`` under its own ``params`` (ids on the device).
    ``with_max``: also each row's largest logit (one pass gives both; a non-finite one flags a bad row)."""
    greedy_list = [is_greedy(p) for p in params]
    top, out = logits.max(dim=-1)
    if all(greedy_list):
        return (out, top) if with_max else out
    greedy = torch.tensor(greedy_list, device=logits.device)
    rows = torch.nonzero(~greedy).flatten()
    dev = logits.device
    sel = [params[i] for i in rows.tolist()]
    probs = filtered_probs(logits.index_select(0, rows),
                           torch.tensor([p.temperature for p in sel], device=dev, dtype=torch.float32),
                           torch.tensor([p.top_p for p in sel], device=dev, dtype=torch.float32),
                           torch.tensor([p.top_k for p in sel], device=dev, dtype=torch.long))
    noise = torch.empty_like(probs)
    for j, i in enumerate(rows.tolist()):  # per-request streams: a seeded request is batch-independent
        noise[j].exponential_(1.0, generator=generators[i])
    out[rows] = (probs / noise).argmax(dim=-1)
    return (out, top) if with_max else out


def select_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """One row's next token (``logits`` ``[V]``)."""
    return int(select_tokens(logits[None], [params], [generator])[0])
