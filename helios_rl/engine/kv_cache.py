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
        self.peak_bytes = 0  # the largest footprint of the last resize (pool + the one tensor being built)
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

    def resize(self, num_slots: int, keep: dict[int, int]) -> dict[int, int]:
        """Change the number of slots in place, one layer at a time, keeping the slots in ``keep``
        (old slot -> new slot, new slots dense from 0). The peak is the pool plus one layer's new K or V
        tensor, never two pools (a batch-cap change must not double the KV memory). Returns ``keep``."""
        if any(not 0 <= new < num_slots for new in keep.values()) or len(set(keep.values())) != len(keep):
            raise ValueError(f"slot mapping {keep} does not fit {num_slots} slots")
        src = torch.as_tensor(list(keep), dtype=torch.long, device=self.device)
        dst = torch.as_tensor(list(keep.values()), dtype=torch.long, device=self.device)
        old_slots = self.num_slots
        done: list[tuple[list, int]] = []
        self.peak_bytes = self.nbytes()
        try:
            for store in (self.k, self.v):
                for i in range(len(store)):
                    store[i] = self._moved(store[i], num_slots, src, dst)
                    done.append((store, i))
            if self.hbuf is not None:
                self.hbuf = self._moved(self.hbuf, num_slots, src, dst)
        except BaseException:  # out of memory half-way: put the converted layers back (the kept rows)
            for store, i in done:
                store[i] = self._moved(store[i], old_slots, dst, src)
            raise
        kv_len = np.zeros((num_slots, self.depth), dtype=np.int64)
        for old_slot, new_slot in keep.items():
            kv_len[new_slot] = self.kv_len[old_slot]
        self.kv_len = kv_len
        self.num_slots = num_slots
        self._free = [s for s in range(num_slots) if s not in set(keep.values())]
        heapq.heapify(self._free)
        return keep

    def _moved(self, old: torch.Tensor, num_slots: int, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        """``old`` with ``num_slots`` rows, rows ``src`` copied to ``dst`` (the old tensor is then dropped)."""
        new = torch.zeros((num_slots,) + tuple(old.shape[1:]), dtype=old.dtype, device=old.device)
        self.peak_bytes = max(self.peak_bytes, self.nbytes() + new.numel() * new.element_size())
        if src.numel():
            new.index_copy_(0, dst, old.index_select(0, src))
        return new

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
