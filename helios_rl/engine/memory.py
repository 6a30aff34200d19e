"""What one engine step needs beyond weights and KV: the activations of its largest prefill chunk.

Prefill is chunked to ``max_prefill_tokens`` positions per step, so the activation peak is bounded
by that chunk: the layer's input, output and residual, the Q/K/V projections, the MLP's gate, up and
activation tensors, and the attention scores (float32, every head, over the slot's ``max_len`` keys).
The engine subtracts this from the memory budget before it admits a batch, as it does the weights, the
exit heads and the per-slot KV, pending rings and logits rows.
"""

from __future__ import annotations


def activation_bytes(hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int, tokens: int,
                     max_len: int, elem: int) -> int:
    """Peak activation bytes of one decoder layer over ``tokens`` positions attending to ``max_len`` keys."""
    if tokens <= 0:
        return 0
    per_token = 3 * hidden + (heads + 2 * kv_heads) * head_dim + 3 * intermediate
    return tokens * per_token * elem + heads * tokens * max_len * 4


def model_activation_bytes(model, tokens: int, max_len: int) -> int:
    """:func:`activation_bytes` for a :class:`~helios_rl.models.layered.LayeredModel`."""
    import torch

    elem = torch.tensor([], dtype=model.dtype).element_size()
    return activation_bytes(model.hidden_size, model.intermediate_size, model.num_heads, model.num_kv_heads,
                            model.head_dim, tokens, max_len, elem)
