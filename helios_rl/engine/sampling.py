"""Token selection: greedy, or temperature + nucleus (top-p) sampling with a per-request generator."""

from __future__ import annotations

import torch

from helios_rl.engine.request import SamplingParams


MIN_TEMPERATURE = 1e-5  # below this, dividing logits overflows: treat as greedy


def select_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """Pick the next token from ``logits`` [V]."""
    if params.greedy or params.temperature < MIN_TEMPERATURE:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1).cpu()
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_p, dim=-1)
        cut = cum - sorted_p >= params.top_p  # keep the smallest prefix whose mass reaches top_p
        cut[0] = False  # the top token always stays, however small top_p is
        sorted_p[cut] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator))
