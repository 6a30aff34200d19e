"""Tests for helios_rl.models.bundled.

Fast tests use a throw-away HELIOS_RL_CACHE and never touch a real model. The one slow test converts
SmolLM2 into the real (default) cache so that later tests and runs reuse it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from helios_rl.models import bundled
from helios_rl.models.bundled import (
    BUNDLED,
    MARKER_NAME,
    BundledSpec,
    UnknownModelError,
    bundled_gguf_path,
    bundled_names,
    bundled_table,
    is_bundled,
    is_prepared,
    prepare_bundled,
    prepared_dir,
)


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "helios_cache"
    monkeypatch.setenv("HELIOS_RL_CACHE", str(root))
    return root


# ---------------------------------------------------------------------------------------------- fast


def test_registry():
    assert bundled_names() == ["smollm2-135m", "gemma3-270m"]
    assert is_bundled("smollm2-135m") and is_bundled("gemma3-270m")
    assert not is_bundled("gpt2")
    for name, spec in BUNDLED.items():
        assert isinstance(spec, BundledSpec) and spec.name == name
        assert spec.license and spec.description and spec.package
    assert BUNDLED["smollm2-135m"].num_layers == 30 and BUNDLED["smollm2-135m"].vocab_size == 49152
    assert BUNDLED["gemma3-270m"].num_layers == 18 and BUNDLED["gemma3-270m"].vocab_size == 262144
    assert BUNDLED["gemma3-270m"].model_type == "gemma3_text"


@pytest.mark.parametrize("fn", [bundled_gguf_path, prepared_dir, is_prepared, prepare_bundled])
def test_unknown_name_error_names_model_and_known_ones(fn):
    with pytest.raises(KeyError) as info:
        fn("no-such-model")
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, UnknownModelError)
    msg = str(info.value)
    assert "no-such-model" in msg
    for known in bundled_names():
        assert known in msg
    assert not msg.startswith(("'", '"'))  # not KeyError's repr() of the message


def test_not_prepared_in_empty_cache(tmp_cache):
    for name in bundled_names():
        assert not is_prepared(name)
        assert prepared_dir(name) == tmp_cache / "models" / name
    rows = bundled_table()
    assert [r["name"] for r in rows] == bundled_names()
    for row in rows:
        assert row["cached"] is False
        assert row["cache_path"] == str(tmp_cache / "models" / row["name"])
        assert {"family", "layers", "hidden_size", "vocab"} <= row.keys()
    assert rows[0]["layers"] == 30 and rows[0]["vocab"] == 49152


def _fake_complete_folder(folder: Path, name: str, **marker_overrides) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for f in ("config.json", "model.safetensors", "tokenizer_config.json"):
        (folder / f).write_text("{}")
    marker = {"format_version": bundled.FORMAT_VERSION, "name": name, **marker_overrides}
    (folder / MARKER_NAME).write_text(json.dumps(marker))


def test_partial_folder_without_marker_is_not_prepared(tmp_cache):
    folder = prepared_dir("smollm2-135m")
    folder.mkdir(parents=True)
    for f in ("config.json", "model.safetensors", "tokenizer_config.json"):
        (folder / f).write_text("{}")
    assert not is_prepared("smollm2-135m")
    assert bundled_table()[0]["cached"] is False

    (folder / MARKER_NAME).write_text("{not json")  # corrupt marker
    assert not is_prepared("smollm2-135m")

    _fake_complete_folder(folder, "gemma3-270m")  # marker for another model
    assert not is_prepared("smollm2-135m")

    _fake_complete_folder(folder, "smollm2-135m", format_version=-1)  # outdated layout
    assert not is_prepared("smollm2-135m")

    _fake_complete_folder(folder, "smollm2-135m")
    assert is_prepared("smollm2-135m")
    (folder / "model.safetensors").unlink()  # weights gone
    assert not is_prepared("smollm2-135m")


def test_prepare_rebuilds_partial_folder_and_then_caches(tmp_cache, monkeypatch):
    """The build/rename logic, with the (slow) conversion replaced by a stub."""
    calls = []

    def fake_convert(spec, out, progress):
        calls.append(out)
        assert out.parent == tmp_cache / "models" and out.name.startswith(f".{spec.name}.tmp-")
        _fake_complete_folder(out, spec.name)

    monkeypatch.setattr(bundled, "_convert", fake_convert)
    name = "smollm2-135m"
    folder = prepared_dir(name)
    folder.mkdir(parents=True)
    (folder / "junk.bin").write_bytes(b"half-written")
    stale = folder.parent / f".{name}.tmp-crashed"
    stale.mkdir()

    out = prepare_bundled(name, progress=False)
    assert out == folder and is_prepared(name)
    assert not (folder / "junk.bin").exists()
    assert not stale.exists()
    assert len(calls) == 1
    assert sorted(p.name for p in folder.parent.iterdir()) == [name]  # no temp/old leftovers

    marker_mtime = (folder / MARKER_NAME).stat().st_mtime_ns
    assert prepare_bundled(name, progress=False) == folder
    assert len(calls) == 1 and (folder / MARKER_NAME).stat().st_mtime_ns == marker_mtime

    prepare_bundled(name, force=True, progress=False)
    assert len(calls) == 2 and is_prepared(name)


def test_failed_conversion_leaves_no_folder(tmp_cache, monkeypatch):
    def broken_convert(spec, out, progress):
        (out / "config.json").write_text("{}")
        raise RuntimeError("boom")

    monkeypatch.setattr(bundled, "_convert", broken_convert)
    with pytest.raises(RuntimeError, match="boom"):
        prepare_bundled("gemma3-270m", progress=False)
    assert not prepared_dir("gemma3-270m").exists()
    assert list((tmp_cache / "models").iterdir()) == []


def test_streaming_safetensors_writer_round_trips(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = [
        ("model.embed_tokens.weight", torch.randn(7, 5)),
        ("model.layers.0.mlp.down_proj.weight", torch.randn(3, 4).t()),  # non-contiguous
        ("model.norm.weight", torch.ones(5)),
        ("scalar", torch.tensor(3.5)),
        ("empty", torch.zeros(0, 4)),
    ]
    path = tmp_path / "model.safetensors"
    bundled._write_safetensors(path, tensors, metadata={"format": "pt"})
    loaded = load_file(str(path))
    assert loaded.keys() == {k for k, _ in tensors}
    for k, t in tensors:
        assert loaded[k].dtype == torch.float32 and torch.equal(loaded[k], t)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    bundled._verify_safetensors(path, tensors)


# ---------------------------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_prepare_smollm2_real_cache():
    """Converts SmolLM2 into the real cache (HELIOS_RL_CACHE or the user cache dir); later runs reuse it."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    name = "smollm2-135m"
    folder = prepare_bundled(name, progress=False)
    assert folder == prepared_dir(name) and is_prepared(name)

    cfg = AutoConfig.from_pretrained(folder)
    assert cfg.model_type == "llama"
    assert cfg.num_hidden_layers == 30 and cfg.vocab_size == 49152
    raw_cfg = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in raw_cfg
    assert raw_cfg["dtype"] == "float32" and raw_cfg["tie_word_embeddings"] is True

    tok = AutoTokenizer.from_pretrained(folder)
    text = "Early exits save compute: 42 tokens, ça va?"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.chat_template  # SmolLM2-Instruct's ChatML template survives save_pretrained

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert "model.layers.29.mlp.down_proj.weight" in keys
        assert "model.layers.30.mlp.down_proj.weight" not in keys
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [49152, 576]
        assert f.get_slice("model.layers.0.self_attn.q_proj.weight").get_dtype() == "F32"

    marker = json.loads((folder / MARKER_NAME).read_text())
    assert marker["name"] == name and marker["num_layers"] == 30
    assert marker["source_gguf"] == "SmolLM2-135M-Instruct.Q4_1.gguf"

    mtime = (folder / MARKER_NAME).stat().st_mtime_ns
    t0 = time.perf_counter()
    assert prepare_bundled(name, progress=False) == folder
    assert time.perf_counter() - t0 < 2.0
    assert (folder / MARKER_NAME).stat().st_mtime_ns == mtime
