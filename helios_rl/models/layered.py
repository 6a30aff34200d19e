"""LayeredModel: a Hugging Face causal LM run one decoder layer at a time, loaded to a chosen depth.

The skeleton is built on the meta device (no memory), then only what the chosen depth needs is read
from safetensors, tensor by tensor: embeddings, layers ``0..k-1``, the final norm and the LM head.
Layers at or beyond ``k`` stay on meta and are never materialised. ``set_depth`` grows or shrinks
the resident stack without touching layers that stay.
"""

from __future__ import annotations

import copy
import functools
import ctypes
import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from helios_rl.models import attention
from helios_rl.models.fusion import fuse_layer
from helios_rl.models.kernels import plan_linears
from helios_rl.models.families import SUPPORTED_MODEL_TYPES, FamilyAdapter
from helios_rl.models.heads import ExitHeads
from helios_rl.utils.device import parse_dtype, resolve_device


def release_freed_memory(device: torch.device) -> None:
    """Hand freed memory back to the OS/driver, so a smaller depth really shrinks the process.

    glibc keeps freed heap memory for reuse (``malloc_trim`` returns it); CUDA's caching allocator
    keeps freed blocks (``empty_cache`` returns them).
    """
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        pass


class CheckpointReader:
    """Per-tensor access to a folder's safetensors files (single file or sharded index)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        index = folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.key_file = {k: folder / f for k, f in weight_map.items()}
        else:
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{folder}: no *.safetensors weights found")
            self.key_file = {}
            for f in files:
                with safe_open(f, framework="pt") as fh:
                    for k in fh.keys():
                        self.key_file[k] = f
        self._handles: dict[Path, object] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.key_file

    def get(self, key: str) -> torch.Tensor:
        f = self.key_file[key]
        if f not in self._handles:
            self._handles[f] = safe_open(f, framework="pt")
        return self._handles[f].get_tensor(key)

    def close(self) -> None:
        """Drop the memory maps, so pages read while loading stop counting as resident."""
        self._handles.clear()

    def nbytes(self, key: str, dtype: torch.dtype) -> int:
        """Size the tensor will have once cast to ``dtype`` (read from the header, no data)."""
        f = self.key_file[key]
        if f not in self._handles:
            self._handles[f] = safe_open(f, framework="pt")
        shape = self._handles[f].get_slice(key).get_shape()
        n = 1
        for s in shape:
            n *= s
        return n * torch.tensor([], dtype=dtype).element_size()


class LayeredModel:
    """A decoder-only LM whose layers load individually and run one at a time.

    Args:
        path: local folder holding ``config.json``, tokenizer files and safetensors weights.
        depth: number of layers to load (1..num_layers); ``None`` loads all.
        device, dtype: where and in which precision weights live (``auto``: CUDA+bf16 or CPU+fp32).
        name: display name (defaults to the folder name).
        fuse: merge q/k/v and gate/up projections of loaded layers into single matmuls. Default: on
            CUDA only; on this project's CPU (MKL, one or two threads) the wider GEMMs measured
            slower (gate+up at batch 8: 2.29 ms fused vs 1.82 ms separate, single thread).
        config, weights: a transformers config and a ``weights(model) -> reader`` factory used instead of
            the folder's ``config.json`` and safetensors (``path`` then only names the model).
    """

    def __init__(self, path: str | Path, depth: int | None = None, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, name: str | None = None, fuse: bool | None = None,
                 config=None, weights=None) -> None:
        self.path = Path(path)
        if config is None and not (self.path / "config.json").exists():
            raise FileNotFoundError(f"{self.path}: not a model folder (no config.json)")
        self.name = name or self.path.name
        self.device = resolve_device(device)
        self.dtype = parse_dtype(dtype, self.device)
        config = config if config is not None else AutoConfig.from_pretrained(self.path)
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"{self.path}: model type {config.model_type!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        self.config = config
        with torch.device("meta"):  # built with a stock implementation the family accepts, then switched to
            # helios_rl's (SDPA underneath; explicit scores where a family soft-caps attention logits)
            stock = "eager" if getattr(config, "attn_logit_softcapping", None) else "sdpa"
            self.hf = AutoModelForCausalLM.from_config(config, attn_implementation=stock, dtype=self.dtype)
        self.hf.config._attn_implementation = attention.NAME  # plus ragged windows (models.attention)
        self.hf.eval()
        self.hf.requires_grad_(False)
        self.family = FamilyAdapter.for_model(self.hf)
        self.fuse = self.device.type == "cuda" if fuse is None else fuse
        # pristine meta copies: checkpoint names and sizes, and what a freed layer returns to
        self._meta_layers = [copy.deepcopy(layer) for layer in self.family.layers]
        # ``weights(model)``: any per-tensor source with CheckpointReader's interface (e.g. seeded random
        # weights for paper-scale shapes, helios_rl.models.paper); default: the folder's safetensors
        self.ckpt = weights(self) if weights is not None else CheckpointReader(self.path)
        self._tokenizer = None
        self.heads = ExitHeads(self.family.final_norm, self.family.lm_head)
        self._materialise_non_layers()
        self._resident: set[int] = set()
        self.set_depth(self.num_layers if depth is None else depth)

    # ----- sizes -----------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.family.num_layers

    @property
    def depth(self) -> int:
        """Number of resident layers (they are always layers 0..depth-1)."""
        return len(self._resident)

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def intermediate_size(self) -> int:
        c = self.config
        return int(getattr(c, "intermediate_size", None) or getattr(c, "ffn_dim", None) or 4 * c.hidden_size)

    @property
    def num_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def num_kv_heads(self) -> int:
        c = self.config
        return int(getattr(c, "num_key_value_heads", None) or c.num_attention_heads)

    @property
    def head_dim(self) -> int:
        c = self.config
        return int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)

    @property
    def max_positions(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 2048))

    def kv_bytes_per_token_layer(self) -> int:
        """Bytes of K plus V that one token occupies in one layer."""
        return 2 * self.num_kv_heads * self.head_dim * torch.tensor([], dtype=self.dtype).element_size()

    def layer_bytes(self, i: int) -> int:
        """Bytes layer ``i`` occupies once loaded (from checkpoint headers; nothing is read)."""
        prefix = self.family.layer_prefix(i)
        return sum(self.ckpt.nbytes(prefix + n, self.dtype) for n, _ in self._meta_layers[i].named_parameters())

    def weight_bytes_at_depth(self, depth: int) -> int:
        """Predicted resident weight bytes when loaded to ``depth`` layers."""
        return self._non_layer_bytes + sum(self.layer_bytes(i) for i in range(depth))

    def resident_bytes(self) -> int:
        """Bytes of every materialised parameter and buffer (shared storage counted once)."""
        seen: dict[int, int] = {}
        for t in list(self.hf.parameters()) + list(self.hf.buffers()):
            if t.device.type == "meta":
                continue
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        for t in self.heads._tensors():
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return sum(seen.values())

    def resident_layers(self) -> list[int]:
        return sorted(self._resident)

    def is_layer_resident(self, i: int) -> bool:
        return all(p.device.type != "meta" for p in self.family.layers[i].parameters())

    # ----- loading ---------------------------------------------------------------------------
    def _load_module(self, module: nn.Module, prefix: str) -> None:
        sd = {}
        for name, _ in module.state_dict(keep_vars=True).items():
            key = prefix + name
            if key not in self.ckpt:
                raise KeyError(f"{self.path}: checkpoint lacks tensor {key!r}")
            t = self.ckpt.get(key)
            sd[name] = self._owned(t)
        module.load_state_dict(sd, assign=True, strict=True)
        self._init_buffers(module)
        module.requires_grad_(False)

    def _init_buffers(self, module: nn.Module) -> None:
        """Compute non-persistent buffers (rotary tables, embedding scales) left on meta.

        transformers' ``_init_weights`` knows how to fill them, but also re-initialises the module's
        weights; the loaded parameters are swapped out for meta placeholders while it runs.
        """
        for sub in module.modules():
            meta = [k for k, b in sub._buffers.items() if b is not None and b.device.type == "meta"]
            if not meta:
                continue
            for k in meta:
                sub._buffers[k] = torch.empty_like(sub._buffers[k], device=self.device)
            saved = dict(sub._parameters)
            for k, prm in saved.items():
                if prm is not None:
                    sub._parameters[k] = nn.Parameter(torch.empty_like(prm, device="meta"), requires_grad=False)
            try:
                self.hf._init_weights(sub)
            finally:
                sub._parameters.update(saved)

    def _owned(self, t: torch.Tensor) -> torch.Tensor:
        """A copy in this model's device/dtype that owns its memory.

        safetensors hands out tensors backed by the file's memory map, paged in lazily; copying
        makes resident memory what the model reports, and freeing a layer returns it.
        """
        return t.to(device=self.device, dtype=self.dtype if t.is_floating_point() else t.dtype, copy=True)

    def _materialise_non_layers(self) -> None:
        """Load embeddings, final norm, LM head (and rotary tables); tie the head when the checkpoint does."""
        layers = self.family.layers
        self.family.base.layers = nn.ModuleList()  # detach so state_dict() skips them
        try:
            tied = getattr(self.hf, "_tied_weights_keys", None) or {}
            tie = bool(getattr(self.config, "tie_word_embeddings", False))
            head_key = "lm_head.weight"
            head_missing = head_key not in self.ckpt
            if head_missing and not tie:
                raise KeyError(f"{self.path}: checkpoint has no {head_key!r} and embeddings are not tied")
            sd = {}
            for key in self.hf.state_dict(keep_vars=True):
                if key == head_key and head_missing:
                    continue
                if key not in self.ckpt:
                    raise KeyError(f"{self.path}: checkpoint lacks tensor {key!r}")
                t = self.ckpt.get(key)
                sd[key] = self._owned(t)
            if head_missing:
                src = tied.get(head_key) if isinstance(tied, dict) else None
                sd[head_key] = sd[src or "model.embed_tokens.weight"]
            self.hf.load_state_dict(sd, assign=True, strict=True)
            if head_missing:
                self.hf.lm_head.weight = self.family.base.embed_tokens.weight
            self._init_buffers(self.hf)
        finally:
            self.family.base.layers = layers
            self.ckpt.close()
        self._non_layer_bytes = self.resident_bytes()

    def set_depth(self, depth: int) -> None:
        """Make exactly layers ``0..depth-1`` resident; others are freed (back to meta)."""
        if not isinstance(depth, int) or depth < 1 or depth > self.num_layers:
            raise ValueError(f"{self.name}: depth must be between 1 and {self.num_layers}, got {depth!r}")
        freed = False
        for i in sorted(self._resident):
            if i >= depth:
                self.family.layers[i] = copy.deepcopy(self._meta_layers[i])
                self._resident.discard(i)
                freed = True
        if freed:
            release_freed_memory(self.device)
        loaded: list[int] = []
        try:
            for i in range(depth):
                if i not in self._resident:
                    self._load_module(self.family.layers[i], self.family.layer_prefix(i))
                    if self.fuse:
                        fuse_layer(self.family.layers[i])
                    if self.device.type == "cpu":  # the row-count-dependent matmul orientation (models.kernels)
                        plan_linears(self.family.layers[i])
                    self._resident.add(i)
                    loaded.append(i)
        except BaseException:  # all or nothing: free what this call loaded, then report
            for i in loaded:
                self.family.layers[i] = copy.deepcopy(self._meta_layers[i])
                self._resident.discard(i)
            release_freed_memory(self.device)
            raise
        finally:
            self.ckpt.close()

    def unload(self) -> None:
        """Free every layer and the non-layer weights; the object is unusable afterwards."""
        self.hf.to("meta")
        self._resident.clear()
        self.heads.adapters.clear()
        release_freed_memory(self.device)

    # ----- text --------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        """The model's tokenizer, or None for a folder without tokenizer files (tiny test models)."""
        if self._tokenizer is None:
            has = any((self.path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
            self._tokenizer = AutoTokenizer.from_pretrained(self.path) if has else False
        return self._tokenizer or None

    @functools.cached_property
    def eos_token_ids(self) -> frozenset[int]:
        """End-of-sequence ids from the config, generation config and tokenizer (read once)."""
        ids: set[int] = set()
        gen_eos = None
        gen_cfg = self.path / "generation_config.json"
        if gen_cfg.exists():
            gen_eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
        for v in (getattr(self.config, "eos_token_id", None), gen_eos,
                  getattr(self.tokenizer, "eos_token_id", None) if self.tokenizer is not None else None):
            if isinstance(v, int):
                ids.add(v)
            elif isinstance(v, (list, tuple)):
                ids.update(int(x) for x in v)
        return frozenset(ids)
