"""Slot-based KV pool: the one owner of KV memory.

Each running request owns one slot: a contiguous ``[kv_heads, max_len, head_dim]`` region per
loaded layer for K and for V, allocated up front for ``num_slots`` slots. Why slots and not pages:
on the CPU and at the short contexts these models serve, a contiguous per-request region lets
attention read a plain slice (no page-table gather per layer), and the budget is computed against
the worst-case length, so admission never has to preempt for memory mid-generation. The price is
internal fragmentation for requests shorter than ``max_len``; that is what the budget accounts for.

Per slot and layer the pool tracks ``kv_len``: how many leading positions have K/V in that layer.
Early exit leaves deeper layers behind (``kv_len`` is non-increasing in the layer index); under the
``recompute`` strategy the hidden states of those pending positions wait in ``hbuf`` (a ring of
``pending_window`` positions per slot) until a later token of the request goes deep.
"""

from __future__ import annotations

import heapq

import numpy as np
import torch


class KVPool:
    def __init__(self, num_slots: int, depth: int, max_len: int, kv_heads: int, head_dim: int, hidden: int,
                 pending_window: int, dtype: torch.dtype, device: torch.device, with_hbuf: bool = True) -> None:
        self.num_slots, self.max_len = num_slots, max_len
        self.kv_heads, self.head_dim, self.hidden = kv_heads, head_dim, hidden
        self.pending_window, self.dtype, self.device = pending_window, dtype, device
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.kv_len = np.zeros((num_slots, 0), dtype=np.int64)
        self.hbuf = (torch.zeros(num_slots, pending_window, hidden, dtype=dtype, device=device)
                     if with_hbuf else None)
        self._free = list(range(num_slots))
        heapq.heapify(self._free)
        self.set_depth(depth)

    # ----- sizing ------------------------------------------------------------------------------
    @staticmethod
    def slot_bytes(depth: int, max_len: int, kv_bytes_per_token_layer: int, hidden: int, pending_window: int,
                   elem: int, with_hbuf: bool) -> int:
        """Bytes one slot costs at ``depth`` loaded layers."""
        return depth * max_len * kv_bytes_per_token_layer + (pending_window * hidden * elem if with_hbuf else 0)

    @staticmethod
    def logits_bytes(vocab_size: int, exit_evals: int) -> int:
        """Per running row: the step's float32 logits rows. Each exit layer evaluated keeps a
        ``[B, V]`` block alive until token selection, the last layer one more, and the confidence
        softmax one transient: ``(exit_evals + 2) * V * 4`` bytes per row."""
        return (exit_evals + 2) * vocab_size * 4

    def nbytes(self) -> int:
        n = sum(t.numel() * t.element_size() for t in self.k + self.v)
        if self.hbuf is not None:
            n += self.hbuf.numel() * self.hbuf.element_size()
        return n

    @property
    def depth(self) -> int:
        return len(self.k)

    def set_depth(self, depth: int) -> None:
        """Grow (new layers start empty: ``kv_len`` 0) or shrink (deeper layers freed)."""
        shape = (self.num_slots, self.kv_heads, self.max_len, self.head_dim)
        while len(self.k) < depth:
            self.k.append(torch.zeros(shape, dtype=self.dtype, device=self.device))
            self.v.append(torch.zeros(shape, dtype=self.dtype, device=self.device))
        del self.k[depth:], self.v[depth:]
        old = self.kv_len
        self.kv_len = np.zeros((self.num_slots, depth), dtype=np.int64)
        keep = min(depth, old.shape[1])
        self.kv_len[:, :keep] = old[:, :keep]

    # ----- slots -------------------------------------------------------------------------------
    @property
    def free_slots(self) -> int:
        return len(self._free)

    def alloc(self) -> int:
        """Lowest free slot (keeps running slots dense, so reads are often plain slices)."""
        if not self._free:
            raise RuntimeError("KV pool has no free slot")
        slot = heapq.heappop(self._free)
        self.kv_len[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        self.kv_len[slot] = 0
        heapq.heappush(self._free, slot)

    # ----- access ------------------------------------------------------------------------------
    def read(self, layer: int, slots: torch.Tensor, contiguous_from: int | None, length: int):
        """K and V of ``slots`` for positions ``0..length-1``: [B, kv_heads, length, head_dim]."""
        k, v = self.k[layer], self.v[layer]
        if contiguous_from is not None:
            s = contiguous_from
            b = slots.numel()
            return k[s:s + b, :, :length], v[s:s + b, :, :length]
        return k[slots, :, :length], v[slots, :, :length]

    def write_last(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor,
                   v: torch.Tensor) -> None:
        """One new position per row: k, v [B, kv_heads, head_dim] at ``positions`` [B]."""
        self.k[layer][slots, :, positions] = k
        self.v[layer][slots, :, positions] = v

    def write_range(self, layer: int, slot: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Positions ``start..start+n-1`` of one slot: k, v [kv_heads, n, head_dim]."""
        n = k.shape[1]
        self.k[layer][slot, :, start:start + n] = k
        self.v[layer][slot, :, start:start + n] = v
