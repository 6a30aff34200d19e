"""Shared fixtures: tiny real-config models saved as Hugging Face folders (built once per session)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import FAMILIES, save_tiny, save_word_tokenizer  # noqa: E402

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """One tiny model folder per supported family (float64 weights, 6 layers)."""
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for fam in FAMILIES:
        out[fam] = save_tiny(fam, root / fam)
    return out


@pytest.fixture(scope="session")
def tiny_text_dirs(tmp_path_factory) -> dict[str, Path]:
    """Two tiny Llama models with a word-level tokenizer (for text, stop strings and switching)."""
    root = tmp_path_factory.mktemp("tinytext")
    out = {}
    for name, seed, layers, shift in (("tiny-a", 0, 6, 0), ("tiny-b", 1, 4, 11)):
        folder = save_tiny("llama", root / name, layers=layers, seed=seed)
        save_word_tokenizer(folder, shift=shift)
        out[name] = folder
    return out
