"""Trained exit heads: a low-rank "tuned lens" adapter per exit layer, read out on a reduced vocabulary.

Why this shape (issue #3):

* **Adapter = low-rank residual + a trainable copy of the final norm.** An intermediate hidden state
  differs from the last one mostly by a few directions the remaining layers would still add (the
  tuned-lens finding, Belrose et al. 2023; EE-Tuning trains similar light heads on a frozen model).
  ``norm_l(h + U_l D_l h + b_l)`` captures that with ``2 H r + 2 H`` parameters (74k for SmolLM2 at
  ``r = 64``), starts *equal* to the shared head (``U = 0``, norm copied) so training can only
  improve on it, and keeps feeding the model's own (frozen) LM head rows, so no output embedding is
  learned or stored.
* **Reduced vocabulary + an "other" bucket.** At an exit the LM head is the expensive part: 49152 x
  576 for SmolLM2 (the cost of ~8 decoder layers) and 262144 x 640 for Gemma3-270M (~30 layers).
  The exit head scores only the ``K`` most frequent tokens of real text (``vocab_ids``; one gathered
  ``K x H`` copy of those LM-head rows shared by all exit layers) plus one learned logit for "the
  answer is outside that set". The logits handed to the engine are full-width: in-set tokens get
  their exact LM-head logit; every other token gets ``other - log(V - K)``, so the out-of-set mass
  is the bucket's, no out-of-set token is ever the argmax of a confident row, and ``confidence()``
  over the full row equals the calibrated confidence. A token is only emitted at an exit if it is
  in the set and confident; calibration accounts for the rest.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from helios_rl.models.heads import ExitHeads, Readout
from helios_rl.models.kernels import head_linear


class TunedAdapter(nn.Module):
    """``h -> norm(h + up(down(h)))`` (the LM head's input) plus the out-of-vocabulary-set logit."""

    def __init__(self, norm: nn.Module, hidden_size: int, head_dim: int, rank: int,
                 post: nn.Module | None = None) -> None:
        super().__init__()
        self.down = nn.Linear(hidden_size, rank, bias=False)
        self.up = nn.Linear(rank, hidden_size, bias=True)
        self.norm = norm
        self.other = nn.Linear(head_dim, 1, bias=True)
        nn.init.normal_(self.down.weight, std=1.0 / math.sqrt(hidden_size))
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        nn.init.zeros_(self.other.weight)
        nn.init.zeros_(self.other.bias)
        self._post = (post,)  # shared, frozen projection (OPT project_out); a tuple keeps it out of state_dict

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.norm(h + self.up(self.down(h)))
        post = self._post[0]
        return post(x) if post is not None else x


def final_norm_parts(model) -> tuple[nn.Module, nn.Module | None]:
    """The model's final norm as a module to copy, and the frozen projection after it (or None)."""
    fam = model.family
    if fam.model_type == "opt":
        norm = fam.base.final_layer_norm if fam.base.final_layer_norm is not None else nn.Identity()
        return norm, fam.base.project_out
    return fam.base.norm, None


def new_adapter(model, rank: int, dtype: torch.dtype = torch.float32) -> TunedAdapter:
    """A fresh adapter for ``model`` that reproduces its shared head exactly (trainable, ``dtype``)."""
    norm, post = final_norm_parts(model)
    norm = copy.deepcopy(norm).to(device=model.device, dtype=dtype)
    norm.requires_grad_(True)
    head_dim = output_embedding(model).shape[1]
    return TunedAdapter(norm, model.hidden_size, head_dim, rank, post).to(device=model.device, dtype=dtype)


def output_embedding(model) -> torch.Tensor:
    """The LM head's weight ``[V, H_in]``."""
    return model.hf.get_output_embeddings().weight


class TunedExitHeads(ExitHeads):
    """:class:`ExitHeads` whose trained layers read out on ``vocab_ids`` (None: the full vocabulary).

    Layers without an adapter keep the shared head; ``final_logits`` is always the model's own head.
    """

    def __init__(self, base: ExitHeads, model, vocab_ids: torch.Tensor | None) -> None:
        super().__init__(base.final_norm, base.lm_head)
        self.vocab_size = int(model.vocab_size)
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        head = model.hf.get_output_embeddings()
        self._head = head
        self.vocab_ids = None if vocab_ids is None else vocab_ids.to(device=model.device, dtype=torch.long)
        if self.vocab_ids is None:
            self.sub_weight, self.sub_bias = None, None
        else:
            self.sub_weight = head.weight.detach().index_select(0, self.vocab_ids).contiguous()
            bias = getattr(head, "bias", None)
            self.sub_bias = None if bias is None else bias.detach().index_select(0, self.vocab_ids)
        self.manifest: dict = {}

    def subset_logits(self, layer: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """In-set logits ``[N, K]`` and the out-of-set logit ``[N]`` (None with the full vocabulary)."""
        adapter = self.adapters[layer]
        x = adapter(h)
        if self.vocab_ids is None:
            w = self._head.weight
            if x.dtype == w.dtype:
                return self.lm_head(x), None
            bias = getattr(self._head, "bias", None)  # training in float32 over a lower/higher-precision model
            z = nn.functional.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))
        else:
            z = head_linear(x, self.sub_weight, self.sub_bias)
        if self.softcap:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z, None if self.vocab_ids is None else adapter.other(x)[..., 0]

    def expand(self, sub: torch.Tensor, other: torch.Tensor | None) -> torch.Tensor:
        """Full-width logits ``[N, V]`` from :meth:`subset_logits` (see module docstring)."""
        if other is None:
            return sub
        rest = self.vocab_size - sub.shape[-1]
        fill = (other - math.log(max(rest, 1))).to(sub.dtype)
        out = fill[:, None].expand(sub.shape[0], self.vocab_size).clone()
        out.index_copy_(1, self.vocab_ids, sub)
        return out

    def logits(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        if layer not in self.adapters:
            return super().logits(layer, h)
        return self.expand(*self.subset_logits(layer, h))

    def readout(self, layer: int, h: torch.Tensor) -> Readout:
        if layer not in self.adapters or self.vocab_ids is None:
            return super().readout(layer, h)
        sub, other = self.subset_logits(layer, h)
        return Readout(sub=sub, other=other, expand=self.expand, vocab_size=self.vocab_size)

    def full_vocab_logits(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """The trained adapter read out on the *whole* vocabulary (one full LM head): for a forced exit
        at a partial depth, where no deeper layer can produce an out-of-set token instead."""
        adapter = self.adapters.get(layer)
        return self.lm_head(adapter(h) if adapter is not None else self.final_norm(h))

    def _tensors(self) -> list[torch.Tensor]:
        """Adapters plus the gathered exit-vocabulary rows of the LM head and their index."""
        extra = [x for x in (self.sub_weight, self.sub_bias, self.vocab_ids) if x is not None]
        return super()._tensors() + extra
