"""Fused projections for transformers' own decoder layers.

vLLM merges q/k/v into one matmul (``QKVParallelLinear``) and gate/up into one
(``MergedColumnParallelLinear``): at decode batch sizes one wider GEMM is markedly cheaper than
several narrow ones on GPUs. On this project's 2-core CPU it measured the other way (gate+up at
batch 8, one thread: 2.29 ms fused vs 1.82 ms separate), so ``LayeredModel`` fuses on CUDA only.
helios_rl keeps transformers' layer code, so it fuses underneath it: the sibling projections are
replaced by views onto one fused linear. The first of them to be called with an input computes the
fused product; the others return their slice of it for the same input tensor.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

FUSE_GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))


class _FusedGroup(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, sizes: list[int]) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.sizes = sizes
        self._x: torch.Tensor | None = None
        self._outs: tuple[torch.Tensor, ...] = ()
        self._taken = 0

    def part(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if self._x is not x or self._taken >= len(self.sizes):
            self._outs = F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)
            self._x, self._taken = x, 0
        self._taken += 1
        out = self._outs[index]
        if self._taken == len(self.sizes):  # every sibling has its slice: drop the references
            self._x, self._outs = None, ()
        return out


class _FusedSlice(nn.Module):
    """Stands in for one projection of a fused group (keeps ``in/out_features`` for callers)."""

    def __init__(self, group: _FusedGroup, index: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self._group = (group,)  # a tuple: not registered as a child, so the weight is counted once
        self.index, self.in_features, self.out_features = index, in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._group[0].part(x, self.index)


def fuse_layer(layer: nn.Module) -> None:
    """Fuse q/k/v and gate/up of one loaded decoder layer in place (no-op where absent)."""
    for parent_name, names in FUSE_GROUPS:
        parent = getattr(layer, parent_name, None)
        if parent is None or not all(isinstance(getattr(parent, n, None), nn.Linear) for n in names):
            continue
        linears = [getattr(parent, n) for n in names]
        has_bias = [lin.bias is not None for lin in linears]
        if any(has_bias) and not all(has_bias):
            continue
        weight = torch.cat([lin.weight for lin in linears])
        bias = torch.cat([lin.bias for lin in linears]) if all(has_bias) else None
        group = _FusedGroup(weight, bias, [lin.out_features for lin in linears])
        parent.add_module(f"fused_{'_'.join(names)}", group)
        for i, (n, lin) in enumerate(zip(names, linears)):
            setattr(parent, n, _FusedSlice(group, i, lin.in_features, lin.out_features))
