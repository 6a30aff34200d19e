"""A matmul orientation chosen by shape, for the wide output heads (LM head, exit vocabulary).

On this project's CPU (MKL, one thread) ``F.linear(x, W)`` with a few rows (2-8) and a wide ``W``
(the 49k-262k-row LM head, an 8k-32k-row exit vocabulary) is several times slower than the same
product computed as ``(W @ x.T).T`` (SmolLM2's LM head at 3 rows: 34.4 ms vs 8.3 ms; Gemma3's at 2
rows: 124 ms vs 32 ms; one row is the same either way), which made a batch shrunk by early exits
*slower* per step than the full batch. Other shapes keep ``F.linear``, and CUDA always does.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

WIDE = 4096  # output features from which a few-row product takes the other orientation
FEW = (2, 8)  # rows for which it does


def head_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for ``x`` ``[N, K]`` (or ``[..., K]``), fastest orientation on the CPU."""
    rows = x.numel() // x.shape[-1] if x.dim() else 0
    if x.device.type != "cpu" or weight.shape[0] < WIDE or not FEW[0] <= rows <= FEW[1]:
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, x.shape[-1])
    out = (weight @ flat.T).T
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])
