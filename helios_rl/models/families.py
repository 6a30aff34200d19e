"""Family adapters: where each Hugging Face decoder keeps its parts.

helios_rl drives transformers' own decoder-layer modules one layer at a time. What differs between
families is small and structural: where the layer list lives, how tokens become the first hidden
state (OPT adds learned positions, Gemma scales the embedding), which rotary tables a layer takes,
and what sits between the last layer and the LM head. A :class:`FamilyAdapter` answers exactly
those questions for one instantiated (possibly meta-device) ``*ForCausalLM`` skeleton.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from torch import nn

from helios_rl.models.kernels import head_linear

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "gemma3_text", "gemma2", "gemma", "opt")


class _KVCaptured(Exception):
    """Raised inside an attention module to stop it once its K/V have been produced."""


class _CaptureKV:
    """A stand-in cache whose ``update`` records K/V and aborts the attention call.

    Used by the ``copy`` KV strategy: it needs a skipped layer's keys and values for an exit hidden
    state, but none of that layer's attention or MLP compute.
    """

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.k, self.v = k, v
        raise _KVCaptured


@functools.lru_cache(maxsize=None)
def _cache_kwarg(cls: type) -> str:
    params = inspect.signature(cls.forward).parameters
    if "cache" in params:
        return "cache"
    if "past_key_values" in params:
        return "past_key_values"
    raise TypeError(f"{cls.__name__}.forward takes neither 'cache' nor 'past_key_values': this transformers "
                    f"version is not supported (pyproject bounds it)")


@dataclass
class FamilyAdapter:
    """Structural view of one causal LM skeleton (see module docstring)."""

    model: nn.Module  # the *ForCausalLM
    base: nn.Module  # module that owns embed_tokens / layers
    model_type: str

    @classmethod
    def for_model(cls, model: nn.Module) -> "FamilyAdapter":
        cfg = model.config
        mt = getattr(cfg, "model_type", "")
        base = model.model
        if mt == "opt":
            base = model.model.decoder
        elif not hasattr(base, "layers") and hasattr(base, "language_model"):
            base = base.language_model
        if not hasattr(base, "layers"):
            raise ValueError(f"model type {mt!r}: cannot find its decoder layer list")
        return cls(model=model, base=base, model_type=mt)

    # ----- structure -------------------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        return self.base.layers

    @property
    def num_layers(self) -> int:
        return len(self.base.layers)

    def layer_prefix(self, i: int) -> str:
        """State-dict prefix of layer ``i`` (e.g. ``model.layers.3.``)."""
        for name, mod in self.model.named_modules():
            if mod is self.base:
                return f"{name}.layers.{i}."
        raise RuntimeError("base module not found in model")

    def attn_norm(self, layer: nn.Module) -> nn.Module | None:
        """The norm applied to a layer's input before self-attention (None: none)."""
        if self.model_type == "opt":
            return layer.self_attn_layer_norm if layer.do_layer_norm_before else None
        return layer.input_layernorm

    def sliding_window(self, i: int) -> int | None:
        """Layer ``i``'s attention window (None: full causal). Gemma/Qwen keep it on the attention module
        per layer (None on full-attention layers); Mistral keeps one window in the config for every layer."""
        attn = self.layers[i].self_attn
        if hasattr(attn, "sliding_window"):
            win = attn.sliding_window
        else:
            cfg = self.model.config
            types = getattr(cfg, "layer_types", None)
            win = getattr(cfg, "sliding_window", None) if not types or types[i] == "sliding_attention" else None
        return int(win) if win else None

    def layer_type(self, i: int) -> str:
        types = getattr(self.model.config, "layer_types", None)
        return types[i] if types else "full_attention"

    # ----- compute ---------------------------------------------------------------------------
    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Token ids [B, Q] and absolute positions [B, Q] -> first hidden state [B, Q, H]."""
        h = self.base.embed_tokens(ids)
        if self.model_type == "opt":
            pe = self.base.embed_positions
            if self.base.project_in is not None:
                h = self.base.project_in(h)
            h = h + nn.functional.embedding(positions + pe.offset, pe.weight)
        return h

    def position_tables(self, h: torch.Tensor, positions: torch.Tensor) -> dict[str, object]:
        """Rotary (cos, sin) per layer type for these positions; empty for learned positions."""
        rot = getattr(self.base, "rotary_emb", None)
        if rot is None:
            return {}
        if "layer_type" in inspect.signature(rot.forward).parameters:
            types = set(getattr(self.model.config, "layer_types", ["full_attention"]))
            return {t: rot(h, positions, t) for t in types}
        return {"full_attention": rot(h, positions), "sliding_attention": rot(h, positions)}

    def layer_kwargs(self, i: int, tables: dict[str, object], positions: torch.Tensor) -> dict:
        if not tables:
            return {"position_ids": positions}
        return {"position_embeddings": tables[self.layer_type(i)], "position_ids": positions}

    @staticmethod
    def cache_kwarg(module: nn.Module) -> str:
        """The name ``module.forward`` takes its KV cache under: ``cache`` (transformers >= 5.2x; the
        old ``past_key_values`` is deprecated and goes away in 5.40) or ``past_key_values``."""
        return _cache_kwarg(type(module))

    def run_layer(self, i: int, h: torch.Tensor, mask: torch.Tensor, cache, tables, positions,
                  **attention_kwargs) -> torch.Tensor:
        """Layer ``i`` on ``h``; ``attention_kwargs`` reach the attention function (see models.attention)."""
        layer = self.layers[i]
        out = layer(h, attention_mask=mask, use_cache=True, **{self.cache_kwarg(layer): cache},
                    **self.layer_kwargs(i, tables, positions), **attention_kwargs)
        return out[0] if isinstance(out, tuple) else out

    def layer_kv(self, i: int, h: torch.Tensor, tables, positions) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values layer ``i`` would store for inputs ``h`` [B, Q, H] (no attention, no MLP)."""
        layer = self.layers[i]
        norm = self.attn_norm(layer)
        x = norm(h) if norm is not None else h
        cap = _CaptureKV()
        kw = self.layer_kwargs(i, tables, positions)
        if self.model_type == "opt":
            kw = {}
        try:
            layer.self_attn(hidden_states=x, attention_mask=None, **{self.cache_kwarg(layer.self_attn): cap}, **kw)
        except _KVCaptured:
            return cap.k, cap.v
        raise RuntimeError(f"layer {i}: attention did not write to its cache")

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        if self.model_type == "opt":
            if self.base.final_layer_norm is not None:
                h = self.base.final_layer_norm(h)
            if self.base.project_out is not None:
                h = self.base.project_out(h)
            return h
        return self.base.norm(h)

    def lm_head(self, h: torch.Tensor) -> torch.Tensor:
        head = self.model.lm_head
        logits = head_linear(h, head.weight, head.bias)
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def non_layer_prefixes(self) -> list[str]:
        """State-dict prefixes of everything that is not a decoder layer."""
        layer_mods = {id(m) for layer in self.layers for m in layer.modules()}
        out = []
        for name, mod in self.model.named_modules():
            if id(mod) in layer_mods or mod is self.layers:
                continue
            if list(mod.parameters(recurse=False)) or list(mod.buffers(recurse=False)):
                out.append(name + "." if name else "")
        return out
