"""Paper-scale model shapes with random weights, for speed studies where the real weights are absent.

HELIOS measured OPT-1.3B, OPT-6.7B and Llama models. No model hub is reachable here, so this module
writes their published transformers configs down in code and builds :class:`LayeredModel` stacks
of those exact shapes whose weights are drawn at random, tensor by tensor, directly on the target
device and in the target dtype (the skeleton lives on the meta device, as for real checkpoints, so
nothing is allocated before a layer is loaded). Speed, memory and bandwidth are those of the real
models; the outputs are meaningless, so exits on these models must be *replayed*
(:class:`~helios_rl.engine.exits.ExitReplay`), never decided by their confidence.

``scale="tiny"`` keeps each family and its structure but shrinks widths (and the layer count by 4x),
so the same code paths run in seconds on a CPU (tests, ``benchmarks/gpu.py --smoke``).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig

from helios_rl.models.layered import LayeredModel

# Published configs (facebook/opt-1.3b, facebook/opt-6.7b, meta-llama/Llama-2-7b-hf config.json).
PAPER_CONFIGS: dict[str, dict] = {
    "opt-1.3b": dict(family="opt", hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, ffn_dim=8192,
                     vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=2048),
    "opt-6.7b": dict(family="opt", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, ffn_dim=16384,
                     vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=4096),
    "llama-2-7b": dict(family="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, intermediate_size=11008, vocab_size=32000,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0),
}

# Parameter counts of the published checkpoints (OPT's LM head is tied to its embeddings).
PUBLISHED_PARAMS = {"opt-1.3b": 1.3e9, "opt-6.7b": 6.7e9, "llama-2-7b": 6.7e9}

SCALES = ("paper", "tiny")


def paper_names() -> tuple[str, ...]:
    return tuple(PAPER_CONFIGS)


def paper_config(name: str, scale: str = "paper"):
    """The transformers config of paper model ``name`` (``scale="tiny"``: shrunken, same family)."""
    if name not in PAPER_CONFIGS:
        raise ValueError(f"unknown paper model {name!r}; choose one of {', '.join(PAPER_CONFIGS)}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    d = dict(PAPER_CONFIGS[name])
    family = d.pop("family")
    if scale == "tiny":
        d.update(hidden_size=64, num_hidden_layers=d["num_hidden_layers"] // 4, num_attention_heads=4,
                 vocab_size=512, max_position_embeddings=512)
        if family == "opt":
            d.update(ffn_dim=256, word_embed_proj_dim=64)
        else:
            d.update(num_key_value_heads=4, intermediate_size=172)
    if family == "opt":
        return OPTConfig(do_layer_norm_before=True, enable_bias=True, activation_function="relu",
                         tie_word_embeddings=True, bos_token_id=2, eos_token_id=2, pad_token_id=1, **d)
    return LlamaConfig(hidden_act="silu", tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, **d)


def meta_param_count(name: str, scale: str = "paper") -> int:
    """Parameters of the model, counted on the meta device (nothing is allocated; tied weights once)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(paper_config(name, scale))
    seen = {id(p): p.numel() for p in model.parameters()}
    return int(sum(seen.values()))


class RandomWeights:
    """A per-tensor weight source with :class:`~helios_rl.models.layered.CheckpointReader`'s interface.

    Each tensor is drawn when asked for, on ``device`` in ``dtype``, from a generator seeded by
    ``seed`` and the tensor's name (so a layer loaded twice gets the same values). Matrices and
    embeddings: normal(0, ``initializer_range``); norm gains: 1; biases: 0. A tied LM head is left
    out, so the model ties it to the embeddings as a real checkpoint would.
    """

    def __init__(self, shapes: dict[str, torch.Size], device: torch.device, dtype: torch.dtype, seed: int = 0,
                 std: float = 0.02) -> None:
        self.shapes, self.device, self.dtype, self.seed, self.std = shapes, device, dtype, int(seed), float(std)

    @classmethod
    def for_model(cls, model: LayeredModel, seed: int = 0) -> "RandomWeights":
        shapes = {k: t.shape for k, t in model.hf.state_dict(keep_vars=True).items()}
        if getattr(model.config, "tie_word_embeddings", False):
            shapes.pop("lm_head.weight", None)
        std = float(getattr(model.config, "initializer_range", None) or getattr(model.config, "init_std", 0.02))
        return cls(shapes, model.device, model.dtype, seed, std)

    def __contains__(self, key: str) -> bool:
        return key in self.shapes

    def get(self, key: str) -> torch.Tensor:
        t = torch.empty(self.shapes[key], dtype=self.dtype, device=self.device)
        if t.dim() >= 2:
            g = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + zlib.crc32(key.encode()))
            t.normal_(0.0, self.std, generator=g)
        elif "norm" in key and key.endswith("weight"):
            t.fill_(1.0)
        else:
            t.zero_()
        return t

    def nbytes(self, key: str, dtype: torch.dtype) -> int:
        return self.shapes[key].numel() * torch.tensor([], dtype=dtype).element_size()

    def close(self) -> None:
        pass


def random_model(name: str, depth: int | None = None, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, scale: str = "paper", seed: int = 0,
                 fuse: bool | None = None) -> LayeredModel:
    """A :class:`LayeredModel` of paper model ``name``'s shape with seeded random weights, loaded to ``depth``.

    Its name says what it is (``opt-1.3b@random`` / ``opt-1.3b@random-tiny``); it has no tokenizer, so it
    is served token ids.
    """
    label = f"{name}@random" + ("" if scale == "paper" else f"-{scale}")
    return LayeredModel(Path(f"<{label}>"), depth=depth, device=device, dtype=dtype, name=label, fuse=fuse,
                        config=paper_config(name, scale), weights=lambda m: RandomWeights.for_model(m, seed))
