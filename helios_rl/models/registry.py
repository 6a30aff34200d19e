"""Resolve a model reference to a local Hugging Face folder and load it as a LayeredModel.

A reference is one of: a bundled name (``smollm2-135m``, ``gemma3-270m``), a local folder with
``config.json`` and safetensors, a ``.gguf`` file (converted once into the cache), or a hub id
(``org/name``, downloaded only where a hub is reachable and ``HF_HUB_OFFLINE`` is not set).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from helios_rl.models.bundled import bundled_names, is_bundled, prepare_bundled
from helios_rl.models.layered import LayeredModel
from helios_rl.utils.paths import models_cache_dir


class UnknownModel(ValueError):
    """A model reference that is not bundled, not a local folder or GGUF file, and not downloadable."""


def resolve_model(ref: str, progress: bool = True) -> Path:
    """Local folder for ``ref`` (converting or downloading once where needed)."""
    if is_bundled(ref):
        return prepare_bundled(ref, progress=progress)
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise UnknownModel(f"{path}: folder has no config.json")
        return path
    if path.is_file() and path.suffix == ".gguf":
        return _convert_gguf(path)
    if path.exists():
        raise UnknownModel(f"{path}: not a model folder or .gguf file")
    if "/" in ref and not ref.startswith((".", "/")) and ref.count("/") == 1:
        return _download(ref)
    raise UnknownModel(f"unknown model {ref!r}: not a bundled model ({', '.join(bundled_names())}), "
                       "a local folder, a .gguf file or a hub id")


def load_model(ref: str, depth: int | None = None, device: str | None = None, dtype: str | None = None,
               progress: bool = True, heads: str = "auto") -> LayeredModel:
    """Resolve ``ref`` and load it to ``depth`` layers (all when None).

    ``heads``: ``auto`` attaches trained exit heads when the model folder has them, ``shared`` never,
    anything else is an exit-heads folder (see :mod:`helios_rl.exits`).
    """
    from helios_rl.exits.heads_io import attach_heads

    folder = resolve_model(ref, progress=progress)
    model = LayeredModel(folder, depth=depth, device=device, dtype=dtype, name=ref if is_bundled(ref) else None)
    attach_heads(model, heads)
    return model


def _convert_gguf(path: Path) -> Path:
    """Dequantise a user GGUF file once into the cache (keyed by its content hash)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    target = models_cache_dir() / f"gguf-{path.stem}-{h.hexdigest()[:12]}"
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=models_cache_dir()))
    try:
        AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(tmp)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _download(repo_id: str) -> Path:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise UnknownModel(f"unknown model {repo_id!r}: hub downloads are off (HF_HUB_OFFLINE=1) and it is "
                           f"not bundled ({', '.join(bundled_names())})")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja"]))
    except Exception as exc:  # network errors, missing repos: one clear message
        raise UnknownModel(f"model {repo_id!r} could not be downloaded from the hub: {exc}") from exc
