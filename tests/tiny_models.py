"""Tiny randomly initialised models built from real transformers configs, saved as HF folders."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig, OPTConfig,
                          Qwen2Config)

VOCAB = 160

FAMILIES = ("llama", "qwen2", "gemma3_text", "opt")


def tiny_config(family: str, layers: int = 6):
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=layers, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    if family == "llama":
        return LlamaConfig(intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, **common)
    if family == "qwen2":
        return Qwen2Config(intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, **common)
    if family == "gemma3_text":
        common["tie_word_embeddings"] = True
        return Gemma3TextConfig(intermediate_size=128, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                sliding_window=6, layer_types=["sliding_attention", "sliding_attention",
                                "full_attention"] * (layers // 3) + ["sliding_attention"] * (layers % 3), **common)
    if family == "mistral":  # one sliding window for every layer, kept in the config
        return MistralConfig(intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, sliding_window=5,
                             **common)
    if family == "gemma2":  # attention-logit soft-capping, alternating sliding/full layers
        common["tie_word_embeddings"] = True
        return Gemma2Config(intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            sliding_window=5, attn_logit_softcapping=5.0, final_logit_softcapping=8.0, **common)
    if family == "opt":
        return OPTConfig(ffn_dim=128, num_attention_heads=4, word_embed_proj_dim=64, do_layer_norm_before=True,
                         **{k: v for k, v in common.items() if k != "tie_word_embeddings"})
    raise ValueError(family)


def save_tiny(family: str, folder: Path, layers: int = 6, seed: int = 0, dtype=torch.float64) -> Path:
    """Build, randomly initialise (seeded) and save a tiny model; returns the folder."""
    torch.manual_seed(seed)
    cfg = tiny_config(family, layers)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    # random init is near-uniform; widen it so greedy decoding has clear argmax gaps
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.25)
    model.save_pretrained(folder)
    return folder


def load_hf(folder: Path, dtype=torch.float64):
    import json

    softcap = json.loads((Path(folder) / "config.json").read_text()).get("attn_logit_softcapping")
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype,
                                                attn_implementation="eager" if softcap else "sdpa").eval()


def save_word_tokenizer(folder: Path, shift: int = 0) -> None:
    """A real (tokenizers-library) word-level tokenizer over the tiny vocabulary: ``w3 w4 ...``.

    ``shift`` rotates which id each word gets, so two models can share words but not ids.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": 3 + (i - 3 + shift) % (VOCAB - 3) for i in range(3, VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
