"""The model repository: offline telemetry per candidate model, one JSON file per model.

HELIOS keeps a repository of what each model costs and how its tokens exit, measured offline, and
uses it to shortlist candidates before any live profiling. A :class:`ModelProfile` holds:

* memory facts (resident bytes of the non-layer weights and of each layer, adapter bytes, KV bytes
  per token and layer) -- with these a controller predicts, exactly as the engine computes it, the
  batch a memory budget admits at any depth;
* a decode step-time model ``t(depth, batch) = c0 + c1 b + depth (c2 + c3 b)`` fitted to measured
  engine steps, plus measured prefill and layer-load rates;
* the exit distribution at full depth and, for every depth HELIOS may load, the predicted agreement
  with full-depth greedy output and the predicted breach rate -- from a teacher-forced simulation of
  the engine's exit rule on the model's own greedy continuations of calibration prompts.

Profiles are measured by :mod:`helios_rl.controllers.profiling`; this module only holds and predicts.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from helios_rl.engine.kv_cache import KVPool
from helios_rl.engine.memory import activation_bytes
from helios_rl.utils.io import atomic_write_json

PROFILE_FORMAT = "helios_rl.model_profile/1"


@dataclass(frozen=True)
class MemorySettings:
    """The engine settings that decide the admissible batch (mirrors ``Engine.admissible_batch``)."""

    budget_bytes: int | None
    max_batch: int
    max_model_len: int
    pending_window: int
    recompute: bool
    max_prefill_tokens: int = 0  # the prefill chunk whose activations the budget holds (0: not counted)


@dataclass
class ModelProfile:
    """Offline telemetry of one model (see module docstring). Depths are layer counts (1..L)."""

    name: str
    num_layers: int
    non_layer_bytes: int
    layer_bytes: list[int]
    adapter_bytes: int
    kv_bytes_per_token_layer: int
    hidden_size: int
    elem_bytes: int
    max_positions: int
    exit_layers: list[int]  # layers (0-based) where a token may exit early
    heads: str = "shared"  # "trained" or "shared"
    measure: str = "max_prob"
    exit_share: list[float] = field(default_factory=list)  # share of tokens exiting at each layer, full depth
    agreement: dict[int, float] = field(default_factory=dict)  # depth -> predicted agreement with full depth
    breach_rate: dict[int, float] = field(default_factory=dict)  # depth -> predicted share of greedy exits
    step_coef: list[float] = field(default_factory=lambda: [1e-3, 0.0, 1e-4, 1e-5])  # c0, c1, c2, c3
    step_samples: list[list[float]] = field(default_factory=list)  # [depth, batch, seconds]
    prefill_s_per_token_layer: float = 1e-5
    load_s_per_byte: float = 1e-9
    calibration_tokens: int = 0
    vocab_size: int = 0  # per-row logits memory (0 in profiles written before it was counted)
    head_layers: list[int] = field(default_factory=list)  # layers with a trained exit head
    intermediate_size: int = 0  # MLP width and attention heads: prefill activations (0: not counted)
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    key: str = ""
    meta: dict = field(default_factory=dict)

    # ----- memory -------------------------------------------------------------------------------
    def weight_bytes(self, depth: int) -> int:
        return self.non_layer_bytes + sum(self.layer_bytes[:depth]) + self.adapter_bytes

    def slot_bytes(self, depth: int, mem: MemorySettings) -> int:
        """The engine's rule (``helios_rl.engine.engine.slot_bytes``): KV slot, pending ring, logits rows."""
        max_len = min(mem.max_model_len, self.max_positions)
        kv = KVPool.slot_bytes(depth, max_len, self.kv_bytes_per_token_layer, self.hidden_size, mem.pending_window,
                               self.elem_bytes, mem.recompute)
        exits = sum(1 for layer in self.head_layers if layer < depth - 1)
        return kv + (KVPool.logits_bytes(self.vocab_size, exits) if self.vocab_size else 0)

    def admissible_batch(self, depth: int, mem: MemorySettings) -> int:
        """Largest batch the budget admits at ``depth`` (0 when the weights alone do not fit)."""
        if mem.budget_bytes is None:
            return mem.max_batch
        free = mem.budget_bytes - self.weight_bytes(depth) - self.prefill_bytes(mem)
        return int(max(0, min(mem.max_batch, free // self.slot_bytes(depth, mem))))

    def prefill_bytes(self, mem: MemorySettings) -> int:
        """The engine's rule (``helios_rl.engine.engine.prefill_bytes``)."""
        if not self.intermediate_size or not mem.max_prefill_tokens:
            return 0
        return activation_bytes(self.hidden_size, self.intermediate_size, self.num_heads, self.num_kv_heads,
                                self.head_dim, mem.max_prefill_tokens, min(mem.max_model_len, self.max_positions),
                                self.elem_bytes)

    def max_feasible_depth(self, mem: MemorySettings, min_batch: int = 1) -> int:
        """Deepest load that still admits ``min_batch`` requests (0 if none)."""
        best = 0
        for d in range(1, self.num_layers + 1):
            if self.admissible_batch(d, mem) >= min_batch:
                best = d
        return best

    # ----- speed --------------------------------------------------------------------------------
    def step_time(self, depth: float, batch: float) -> float:
        """Predicted seconds of one decode step of ``batch`` rows through ``depth`` layers."""
        c0, c1, c2, c3 = self.step_coef
        return max(1e-6, c0 + c1 * batch + depth * (c2 + c3 * batch))

    def tokens_per_s(self, depth: float, batch: int) -> float:
        return batch / self.step_time(depth, batch) if batch > 0 else 0.0

    def load_seconds(self, from_depth: int, to_depth: int, with_base: bool = False) -> float:
        """Predicted time to read layers ``from_depth..to_depth-1`` (and the non-layer weights)."""
        nbytes = sum(self.layer_bytes[from_depth:to_depth]) + (self.non_layer_bytes if with_base else 0)
        return nbytes * self.load_s_per_byte

    # ----- exits ----------------------------------------------------------------------------------
    def depth_options(self) -> list[int]:
        """Depths worth loading: one past each exit layer, and full depth."""
        return sorted({l + 1 for l in self.exit_layers if l + 1 < self.num_layers} | {self.num_layers})

    def coverage_depth(self, coverage: float, exit_counts: list[float] | None = None) -> int:
        """Smallest depth option by which ``coverage`` of the tokens have exited.

        ``exit_counts`` (per layer, e.g. live telemetry) replaces the offline distribution.
        """
        share = np.asarray(exit_counts if exit_counts is not None else self.exit_share, dtype=float)
        total = share.sum()
        if total <= 0:
            return self.num_layers
        cum = np.cumsum(share) / total
        for d in self.depth_options():
            if cum[min(d, len(cum)) - 1] >= coverage - 1e-9:
                return d
        return self.num_layers

    def predicted_agreement(self, depth: int) -> float:
        if depth >= self.num_layers:
            return self.agreement.get(self.num_layers, 1.0)
        known = sorted(d for d in self.agreement if d <= depth)
        return self.agreement[known[-1]] if known else 0.0

    def min_depth_for_agreement(self, floor: float) -> int:
        for d in self.depth_options():
            if self.predicted_agreement(d) >= floor - 1e-9:
                return d
        return self.num_layers

    # ----- persistence ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["format"] = PROFILE_FORMAT
        d["agreement"] = {str(k): v for k, v in self.agreement.items()}
        d["breach_rate"] = {str(k): v for k, v in self.breach_rate.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "profile") -> "ModelProfile":
        if d.get("format") != PROFILE_FORMAT:
            raise ValueError(f"{where}: not a model profile (expected format {PROFILE_FORMAT!r})")
        d = {k: v for k, v in d.items() if k != "format"}
        try:
            prof = cls(**d)
        except TypeError as exc:
            raise ValueError(f"{where}: malformed model profile: {exc}") from None
        prof.agreement = {int(k): float(v) for k, v in prof.agreement.items()}
        prof.breach_rate = {int(k): float(v) for k, v in prof.breach_rate.items()}
        return prof

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "ModelProfile":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: cannot read model profile: {exc}") from None
        return cls.from_dict(data, str(path))


def profile_filename(name: str) -> str:
    """File name for a model reference (bundled name, folder path or hub id)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name.strip("/")) + ".json"


@dataclass
class ModelFacts:
    """Sizes read from a checkpoint's config and safetensors headers (no weights are read)."""

    name: str
    num_layers: int
    non_layer_bytes: int
    layer_bytes: list[int]
    kv_bytes_per_token_layer: int
    hidden_size: int
    elem_bytes: int
    max_positions: int
    vocab_size: int = 0
    intermediate_size: int = 0
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0

    def as_profile(self) -> ModelProfile:
        """A profile with these sizes and placeholder speed/exit data (enough for memory checks)."""
        return ModelProfile(self.name, self.num_layers, self.non_layer_bytes, list(self.layer_bytes), 0,
                            self.kv_bytes_per_token_layer, self.hidden_size, self.elem_bytes, self.max_positions, [],
                            vocab_size=self.vocab_size, intermediate_size=self.intermediate_size,
                            num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim)


_LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def checkpoint_facts(ref: str, elem_bytes: int = 4) -> ModelFacts:
    """Sizes of model ``ref`` at ``elem_bytes`` per parameter, from its config and weight headers."""
    from safetensors import safe_open

    from helios_rl.models.registry import resolve_model

    folder = resolve_model(ref, progress=False)
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    cfg = cfg.get("text_config", cfg)
    layers = int(cfg["num_hidden_layers"])
    hidden = int(cfg["hidden_size"])
    heads = int(cfg.get("num_attention_heads", 1))
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    per_layer = [0] * layers
    other = 0
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, framework="pt") as fh:
            for key in fh.keys():
                n = int(np.prod(fh.get_slice(key).get_shape())) * elem_bytes
                m = _LAYER_KEY.search(key)
                if m and int(m.group(1)) < layers:
                    per_layer[int(m.group(1))] += n
                else:
                    other += n
    inter = int(cfg.get("intermediate_size") or cfg.get("ffn_dim") or 4 * hidden)
    return ModelFacts(ref, layers, other, per_layer, 2 * kv_heads * head_dim * elem_bytes, hidden, elem_bytes,
                      int(cfg.get("max_position_embeddings", 2048)), int(cfg.get("vocab_size", 0)), inter, heads,
                      kv_heads, head_dim)
