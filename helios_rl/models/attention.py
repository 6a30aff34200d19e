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

Everything else goes to transformers' own SDPA function.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

NAME = "helios"


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
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                        scaling=scaling, **kwargs)
    if ragged is not None:
        out = out.reshape(ragged.rows * ragged.width, out.shape[2], out.shape[3]).index_select(0, ragged.dest)[None]
    return out, None


AttentionInterface.register(NAME, helios_attention)
