"""Exit heads and confidence measures.

An exit head turns the hidden state after layer ``l`` into next-token logits. The shared head is the
model's own final norm + LM head applied to any layer; a trained head (see ``helios_rl.exits``)
replaces the final norm by a light per-layer adapter and still feeds the shared LM head. Every
confidence measure is scaled so that higher means more confident and 1.0 is certain, so one
threshold per layer reads the same way for all of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

CONFIDENCE_MEASURES = ("max_prob", "margin", "entropy")


def confidence(logits: torch.Tensor, measure: str = "max_prob") -> torch.Tensor:
    """Confidence in [0, 1] per row of ``logits`` [N, V].

    - ``max_prob``: largest softmax probability.
    - ``margin``: top-1 minus top-2 probability.
    - ``entropy``: 1 - H(p) / log(V).
    """
    probs = torch.softmax(logits.float(), dim=-1)
    if measure == "max_prob":
        return probs.max(dim=-1).values
    if measure == "margin":
        top = probs.topk(2, dim=-1).values
        return top[:, 0] - top[:, 1]
    if measure == "entropy":
        ent = -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1)
        return 1.0 - ent / math.log(logits.shape[-1])
    raise ValueError(f"unknown confidence measure {measure!r}; choose one of {CONFIDENCE_MEASURES}")


class Readout:
    """An exit head's answer for a batch of rows: every row's confidence, and full-width logits for
    the rows that leave (token selection needs them only there).

    Full form: ``full`` logits ``[N, V]``. Compact form (a reduced exit vocabulary): ``sub`` logits
    ``[N, K]`` over ``vocab_ids`` and the out-of-set bucket's logit ``other`` ``[N]``, which stands for
    ``rest = V - K`` tokens of logit ``other - log(rest)`` each. Confidence is computed on the
    ``K + 1`` numbers exactly as it would be on the expanded ``[N, V]`` row (same softmax), at a
    fraction of the cost; expansion happens only for leaving rows.
    """

    def __init__(self, full: torch.Tensor | None = None, sub: torch.Tensor | None = None,
                 other: torch.Tensor | None = None, expand: Callable | None = None, vocab_size: int = 0) -> None:
        self.full, self.sub, self.other, self._expand, self.vocab_size = full, sub, other, expand, vocab_size

    def confidence(self, measure: str = "max_prob") -> torch.Tensor:
        if self.full is not None:
            if measure == "max_prob":  # max and log-sum-exp: two reductions, no [N, V] probability tensor
                z = self.full.float()
                return torch.exp(z.amax(dim=-1) - torch.logsumexp(z, dim=-1))
            return confidence(self.full, measure)
        sub = self.sub.float()
        rest = self.vocab_size - sub.shape[-1]
        fill = self.other.float() - math.log(max(rest, 1))  # each out-of-set token's logit
        lse = torch.logsumexp(torch.cat([sub, self.other.float()[:, None]], dim=-1), dim=-1)
        p_sub = torch.exp(sub - lse[:, None])
        p_fill = torch.exp(fill - lse)
        if measure == "max_prob":
            return torch.maximum(p_sub.max(dim=-1).values, p_fill)
        if measure == "margin":
            top = torch.cat([p_sub, p_fill[:, None].expand(-1, min(rest, 2))], dim=-1).topk(2, dim=-1).values
            return top[:, 0] - top[:, 1]
        if measure == "entropy":
            ent = -(p_sub * torch.log(p_sub.clamp_min(1e-12))).sum(-1) \
                - rest * p_fill * torch.log(p_fill.clamp_min(1e-12))
            return 1.0 - ent / math.log(self.vocab_size)
        raise ValueError(f"unknown confidence measure {measure!r}; choose one of {CONFIDENCE_MEASURES}")

    def logits(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Full-width logits ``[n, V]`` of ``rows`` (all rows when None)."""
        if self.full is not None:
            return self.full if rows is None else self.full.index_select(0, rows)
        sub, other = (self.sub, self.other) if rows is None else (self.sub.index_select(0, rows),
                                                                   self.other.index_select(0, rows))
        return self._expand(sub, other)


@dataclass(frozen=True)
class ExitTarget:
    """A calibrated precision target: where tokens may exit and at what confidence, so that tokens
    leaving early agree with the model's own final layer at rate >= ``target`` on held-out text."""

    target: float
    layers: tuple[int, ...]
    thresholds: dict  # measure -> {layer: threshold}
    heldout: dict = field(default_factory=dict)  # exit_rate, agreement, precision measured by tune-exits
    served: dict = field(default_factory=dict)  # free-running / teacher-forced agreement of served tokens


NO_EXIT = ExitTarget(1.0, (), {})  # precision target 1.0: no early exit (every token runs to the last loaded layer)


def is_no_exit(target: float) -> bool:
    """Whether precision ``target`` is :data:`NO_EXIT`'s (1.0), which no exit heads calibrate."""
    return abs(float(target) - NO_EXIT.target) < 1e-9


class ExitHeads:
    """Per-layer exit heads over one model's shared LM head.

    ``adapters[l]`` (optional) maps the hidden state after layer ``l`` to the LM head's input. Layers
    without an adapter use the shared head: the model's final norm.
    """

    def __init__(self, final_norm: Callable[[torch.Tensor], torch.Tensor],
                 lm_head: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.final_norm = final_norm
        self.lm_head = lm_head
        self.adapters: dict[int, nn.Module] = {}
        self.thresholds: dict[str, dict[int, float]] = {}  # measure -> layer -> calibrated threshold
        self.targets: dict[float, ExitTarget] = {}  # precision target -> calibrated exit layers and thresholds
        self.source: str = "shared"
        self.origin: str = "shared"  # shared / shipped (installed with helios_rl) / tuned (beside the model) / folder

    def logits(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """Next-token logits from the hidden state after ``layer`` (0-based)."""
        adapter = self.adapters.get(layer)
        return self.lm_head(adapter(h) if adapter is not None else self.final_norm(h))

    def final_logits(self, h: torch.Tensor) -> torch.Tensor:
        """The model's own head, as used at full depth."""
        return self.lm_head(self.final_norm(h))

    def readout(self, layer: int, h: torch.Tensor) -> Readout:
        """:meth:`logits` as a :class:`Readout` (trained heads with a reduced vocabulary stay compact)."""
        return Readout(full=self.logits(layer, h))

    def target(self, target: float) -> ExitTarget:
        """The calibrated exits for precision ``target`` (ValueError naming the calibrated ones).

        Target 1.0 is :data:`NO_EXIT` on every model: only the final layer agrees with itself at rate 1
        on text no calibration saw, so the one way to promise it is not to exit (and to pay for no exit
        head). Exit heads cannot calibrate it (:func:`helios_rl.exits.heads_io.parse_targets` refuses it)."""
        if is_no_exit(target):
            return NO_EXIT
        for t, spec in self.targets.items():
            if abs(t - float(target)) < 1e-9:
                return spec
        have = ", ".join(f"{t:g}" for t in sorted(self.targets)) or "none (no trained exit heads)"
        raise ValueError(f"precision target {target:g} is not calibrated for these exit heads (calibrated: {have}; "
                         f"1 means no early exit)")

    def has_trained(self, layer: int) -> bool:
        return layer in self.adapters

    def nbytes(self) -> int:
        """Bytes the heads hold beyond the model's own weights (adapters and any gathered rows)."""
        seen: dict[int, int] = {}
        for t in self._tensors():
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return sum(seen.values())

    def _tensors(self) -> list[torch.Tensor]:
        return [p for a in self.adapters.values() for p in a.parameters()]
