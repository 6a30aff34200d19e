"""The real bundled SmolLM2 through the engine (slow: loads 135M parameters)."""

from __future__ import annotations

import pytest
import torch

from helios_rl.engine import Engine, EngineSettings, SamplingParams
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
