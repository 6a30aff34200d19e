"""The attention function helios_rl registers with transformers (``attn_implementation="helios"``).

transformers' attention modules project Q/K/V, apply rotary embeddings, hand K/V to the cache and
then call the function registered under ``config._attn_implementation``. helios_rl registers this
one, so every supported family keeps its own projections and rotary code while the engine decides
two things transformers' stock functions cannot:

* **Ragged (packed) windows.** The engine runs rows whose query windows differ in width (a decode
  row carries 1 position, a row catching up on skipped layers carries its pending positions, a
  prefill carries its prompt) as one packed ``[1, T, H]`` sequence: every projection and MLP runs on
  exactly the ``T`` real positions. Only here, inside attention, are the queries scattered into a
  ``[B, Q]`` grid (``Ragged.dest``), because each row attends to its own KV slot; the outputs are
  gathered back to ``[1, T]``. Pad queries see one key and are discarded.
* **Logit soft-capping** (Gemma2): SDPA cannot apply ``tanh`` to the scores, so capped layers run
  the scores explicitly with the engine's boolean mask.

Everything else goes to transformers' own SDPA function, on CUDA without PyTorch's cuDNN attention
backend (:data:`CUDA_SDPA_BACKENDS`, :func:`sdpa_scope`).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

NAME = "helios"

#: The SDPA backends PyTorch may choose among on CUDA: all but cuDNN's. cuDNN attention builds a graph for
#: every new shape, and a serving engine's shapes change every step (the KV length grows, the batch moves).
#: Measured on an NVIDIA H200 (torch 2.11, cuDNN 9.19, 2026-12-04): a decode-shaped masked call (batch 32,
#: 32 heads, 1 query, ~200 keys) took 40 ms on its first shape and 0.25 ms after, against 0.16 ms every
#: time for the memory-efficient kernel; PyTorch's default chose cuDNN. With cuDNN left out, an
#: OPT-1.3B decode step at batch 1 fell from 23.6 ms (warmed over the same shapes; 55 ms cold) to 12.8 ms.
#: ``None`` leaves PyTorch's own choice (the A/B baseline of ``benchmarks/gpu.py --sdpa torch-default``).
CUDA_SDPA_BACKENDS: tuple[SDPBackend, ...] | None = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                                     SDPBackend.MATH)


def sdpa_scope(device: torch.device | str):
    """A context in which SDPA on ``device`` uses :data:`CUDA_SDPA_BACKENDS` (a no-op off CUDA, when that is
    None, or when cuDNN attention is already off, e.g. inside an engine step that entered this once)."""
    if (torch.device(device).type == "cuda" and CUDA_SDPA_BACKENDS is not None
            and torch.backends.cuda.cudnn_sdp_enabled()):
        return sdpa_kernel(list(CUDA_SDPA_BACKENDS))
    return nullcontext()


@dataclass
class Ragged:
    """Where each of the ``T`` packed query positions sits in the ``[B, Q]`` attention grid."""

    dest: torch.Tensor  # [T] long: row * Q + column
    rows: int  # B
    width: int  # Q


def _softcapped(module, query, key, value, mask, scaling, softcap):
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous()


def helios_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs):
    """transformers attention-function signature; returns ``([b, q, heads, head_dim], None)``."""
    ragged: Ragged | None = kwargs.pop("helios_ragged", None)
    softcap = kwargs.pop("softcap", None)
    if ragged is not None:
        heads, dim = query.shape[1], query.shape[3]
        packed = query[0].transpose(0, 1)  # [T, heads, D]
        grid = packed.new_zeros(ragged.rows * ragged.width, heads, dim)
        grid.index_copy_(0, ragged.dest, packed)
        query = grid.view(ragged.rows, ragged.width, heads, dim).transpose(1, 2)
    if softcap is not None:
        out = _softcapped(module, query, key, value, attention_mask, scaling, softcap)
    else:
        with sdpa_scope(query.device):
            out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                            scaling=scaling, **kwargs)
    if ragged is not None:
        out = out.reshape(ragged.rows * ragged.width, out.shape[2], out.shape[3]).index_select(0, ragged.dest)[None]
    return out, None


AttentionInterface.register(NAME, helios_attention)
