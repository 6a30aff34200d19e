"""The real bundled SmolLM2 through the engine (slow: loads 135M parameters)."""

from __future__ import annotations

import pytest
import torch

from helios_rl.engine import Engine, EngineSettings, SamplingParams, ServingConfig
from helios_rl.models.registry import load_model, resolve_model
from helios_rl.workload import load_news

pytestmark = pytest.mark.slow


def test_smollm2_engine_matches_generate_on_real_text():
    from transformers import AutoModelForCausalLM

    model = load_model("smollm2-135m", progress=False)
    tok = model.tokenizer
    docs = load_news()
    prompts = [tok(docs[i].text)["input_ids"][: 20 + 17 * i] for i in range(3)]
    engine = Engine(model, EngineSettings(max_batch=3, max_model_len=256))
    reqs = engine.generate(prompts, SamplingParams(max_new_tokens=20, ignore_eos=True))
    hf = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m"), dtype=torch.float32).eval()
    for p, r in zip(prompts, reqs):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)
        assert r.output_ids == ref[0, len(p):].tolist()
    assert model.num_layers == 30 and set(reqs[0].exit_layers) == {29}


def test_shipped_heads_load_on_a_clean_cache_serve_early_exits_and_refuse_tampering(tmp_path, monkeypatch):
    import shutil

    from helios_rl.exits import heads_io
    from helios_rl.exits.heads_io import ExitHeadsError, load_exit_heads, shipped_heads_dir

    # a clean cache: no tune-exits output beside the model, so "auto" must find the installed heads
    monkeypatch.setattr(heads_io, "default_heads_dir", lambda model: tmp_path / "none")
    model = load_model("smollm2-135m", progress=False)
    assert model.heads.origin == "shipped" and sorted(model.heads.targets) == [0.8, 0.9, 0.95, 0.99]
    tok = model.tokenizer
    prompts = [tok(d.text)["input_ids"][:40] for d in load_news()[:4]]
    engine = Engine(model, EngineSettings(max_batch=4, max_model_len=128))
    engine.apply(ServingConfig(target=0.8))
    reqs = engine.generate(prompts, SamplingParams(max_new_tokens=24, ignore_eos=True))
    layers = [l for r in reqs for l in r.exit_layers[1:]]
    assert any(l < model.num_layers - 1 for l in layers), "the shipped heads let some token leave early"
    bad = tmp_path / "tampered"
    shutil.copytree(shipped_heads_dir("smollm2-135m"), bad)
    blob = bytearray((bad / "heads.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (bad / "heads.safetensors").write_bytes(bytes(blob))
    with pytest.raises(ExitHeadsError, match=r"tampered/heads\.safetensors: corrupt weights file"):
        load_exit_heads(model, bad)
    other = tmp_path / "other"
    shutil.copytree(shipped_heads_dir("gemma3-270m"), other)
    with pytest.raises(ExitHeadsError, match=r"trained for model 'gemma3-270m'.*not for 'smollm2-135m'"):
        load_exit_heads(model, other)
