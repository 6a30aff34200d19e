"""Issue 8 on CPU: exit replay, paper-scale configs on the meta device, NVML energy fallback, gpu.py --smoke."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from benchmark_scripts import load_benchmark

from helios_rl.engine import Engine, EngineSettings, SamplingParams, ServingConfig
from helios_rl.engine.exits import ExitReplay, map_exit_distribution
from helios_rl.models.paper import PUBLISHED_PARAMS, meta_param_count, paper_config, paper_names, random_model
from helios_rl.utils.nvml import open_energy_counter

DIST6 = [0.1, 0.3, 0.0, 0.2, 0.0, 0.4]  # over a 6-layer model (tiny OPT-1.3B has 24 // 4 layers)


@pytest.fixture(scope="module")
def tiny_opt():
    return random_model("opt-1.3b", scale="tiny", device="cpu", dtype="float32", seed=0)


def _serve_replay(model, seed: int, dist=DIST6, n: int = 8, tokens: int = 40):
    eng = Engine(model, EngineSettings(max_batch=n, max_model_len=96, exit_replay=ExitReplay(dist, seed=seed)))
    eng.apply(ServingConfig(exit_layers=tuple(range(model.num_layers - 1))))
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, model.vocab_size, size=6).tolist() for _ in range(n)]
    reqs = eng.generate(prompts, SamplingParams(max_new_tokens=tokens, ignore_eos=True))
    return eng, reqs


def test_map_exit_distribution_keeps_depth_fractions():
    # 30-layer source: layer 14 (half depth) -> layer 11 of 24; the last layer -> the last layer
    src = np.zeros(30)
    src[14], src[29] = 0.25, 0.75
    out = map_exit_distribution(src, 24)
    assert out[11] == pytest.approx(0.25) and out[23] == pytest.approx(0.75) and out.sum() == pytest.approx(1.0)
    assert map_exit_distribution([2, 0, 2], 3).tolist() == [0.5, 0.0, 0.5]  # weights are normalised
    with pytest.raises(ValueError):
        map_exit_distribution([0, 0], 4)


def test_exit_replay_reproduces_the_distribution(tiny_opt):
    eng, reqs = _serve_replay(tiny_opt, seed=0)
    # a request's first token comes from its prefill, which always runs to the last layer: skip it
    layers = np.concatenate([r.exit_layers[1:] for r in reqs])
    got = np.bincount(layers, minlength=tiny_opt.num_layers) / len(layers)
    assert len(layers) == 8 * 39
    assert 0.5 * np.abs(got - np.asarray(DIST6)).sum() < 0.08  # total variation distance
    assert got[2] == 0 and got[4] == 0  # layers without mass never see an exit


def test_exit_replay_is_seeded(tiny_opt):
    a = [r.exit_layers for r in _serve_replay(tiny_opt, seed=3, tokens=12)[1]]
    b = [r.exit_layers for r in _serve_replay(tiny_opt, seed=3, tokens=12)[1]]
    c = [r.exit_layers for r in _serve_replay(tiny_opt, seed=4, tokens=12)[1]]
    assert a == b and a != c


def test_exit_replay_is_labelled_and_partial_load_breaches(tiny_opt):
    eng, _ = _serve_replay(tiny_opt, seed=0, tokens=6)
    snap = eng.snapshot()
    assert eng.exit_mode == "replay" and snap.exit_mode == "replay"
    assert all(s.exit_mode == "replay" for s in eng.telemetry.steps)
    assert eng.settings.exit_replay.describe()["exit_mode"] == "replay"
    plain = Engine(tiny_opt, EngineSettings(max_batch=2, max_model_len=32))
    assert plain.exit_mode == "confidence" and plain.snapshot().exit_mode == "confidence"
    # loaded to 3 of 6 layers: tokens replayed beyond layer 2 exit there greedily and count as breaches
    model = random_model("opt-1.3b", depth=3, scale="tiny", device="cpu", dtype="float32", seed=0)
    eng, reqs = _serve_replay(model, seed=0, tokens=20)
    layers = np.concatenate([r.exit_layers[1:] for r in reqs])
    assert set(layers.tolist()) <= {0, 1, 2}
    # every decode token at layer 2 was replayed deeper (DIST6 has no mass at 2); prefill tokens only some
    assert (layers == 2).sum() <= eng.snapshot().breaches <= (layers == 2).sum() + len(reqs)
    with pytest.raises(ValueError):
        EngineSettings(exit_replay=object()).validate()


@pytest.mark.parametrize("name", paper_names())
def test_paper_configs_count_published_parameters_on_meta(name):
    n = meta_param_count(name)
    assert abs(n - PUBLISHED_PARAMS[name]) / PUBLISHED_PARAMS[name] < 0.03
    exact = {"opt-1.3b": 1_315_758_080, "opt-6.7b": 6_658_473_984, "llama-2-7b": 6_738_415_616}
    assert n == exact[name]


def test_paper_shapes_are_the_published_ones():
    c = paper_config("opt-6.7b")
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.ffn_dim, c.vocab_size) == (
        4096, 32, 32, 16384, 50272)
    c = paper_config("llama-2-7b")
    assert (c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.vocab_size) == (4096, 32, 11008, 32000)
    assert paper_config("opt-1.3b", "tiny").num_hidden_layers == 6


def test_random_model_loads_only_its_depth_and_is_seeded():
    a = random_model("llama-2-7b", depth=2, scale="tiny", device="cpu", dtype="float32", seed=5)
    b = random_model("llama-2-7b", depth=2, scale="tiny", device="cpu", dtype="float32", seed=5)
    assert a.depth == 2 and a.resident_layers() == [0, 1] and not a.is_layer_resident(2)
    assert a.tokenizer is None and a.name == "llama-2-7b@random-tiny"
    wa = a.family.layers[1].mlp.up_proj.weight
    assert torch.equal(wa, b.family.layers[1].mlp.up_proj.weight) and wa.std() == pytest.approx(0.02, rel=0.2)
    assert a.resident_bytes() == a.weight_bytes_at_depth(2)
    full = random_model("opt-1.3b", scale="tiny", device="cpu", dtype="float32")
    assert full.hf.lm_head.weight is full.family.base.embed_tokens.weight  # tied, as in the checkpoint
    assert sum(p.numel() for p in {id(p): p for p in full.hf.parameters()}.values()) == meta_param_count(
        "opt-1.3b", "tiny")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU fallback")
def test_energy_is_none_without_cuda(tiny_opt):
    assert open_energy_counter() is None and open_energy_counter("cpu") is None
    eng, _ = _serve_replay(tiny_opt, seed=0, tokens=3)
    assert all(s.energy_j is None for s in eng.telemetry.steps) and eng.snapshot().energy_j is None
    from helios_rl.evaluation.energy import EnergyMeter

    assert EnergyMeter().read()["method"].startswith("estimate")


def _gpu_bench():
    return load_benchmark("gpu")


def test_gpu_benchmark_smoke_writes_a_labelled_summary(tmp_path):
    bench = _gpu_bench()
    out = tmp_path / "smoke.json"
    assert bench.main(["--smoke", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    s = res["summary"]
    for key in ("device", "decode_tok_s_b1", "roofline_fraction_b1", "speedup_vs_generate_b32",
                "speedup_vs_generate_b128", "helios_vs_static_throughput", "helios_vs_static_max_batch",
                "joules_per_token", "copy_bandwidth_gb_s", "bundled"):
        assert key in s
    assert s["smoke"] is True and "SMOKE" in s["label"] and s["helios_vs_static_exit_mode"] == "replay"
    assert res["replay"]["exit_mode"] == "replay" and "not measured" in res["replay"]["source"]["model"]
    assert s["helios_vs_static_max_batch"] > 1  # the partial load admits a larger batch
    # saved after every section, so a run cut short keeps what it measured; the finished file says so
    assert res["complete"] is True and "helios_vs_static_models" not in res
    assert res["sections_done"] == ["copy_bandwidth", "decode_b1", "vs_generate_b2", "vs_generate_b4",
                                    "helios_vs_static:opt-1.3b", "helios_vs_static:opt-6.7b", "helios_vs_static"]
    if not torch.cuda.is_available():
        assert s["device"] == "cpu" and s["joules_per_token"] == {"helios": None, "static": None}
        assert bench.main(["--out", str(tmp_path / "refused.json")]) == 2
        assert not (tmp_path / "refused.json").exists()


def test_gpu_benchmark_cut_short_keeps_its_measured_sections(tmp_path, monkeypatch):
    bench = _gpu_bench()
    out = tmp_path / "cut.json"

    def boom(*a, **k):
        raise KeyboardInterrupt("cut short")

    monkeypatch.setattr(bench, "vs_generate", boom)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--smoke", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["complete"] is False and res["sections_done"] == ["copy_bandwidth", "decode_b1"]
    assert res["decode_b1"]["decode_tok_s"] > 0 and "summary" not in res


def test_attention_scope_leaves_cudnn_out_on_cuda_only(monkeypatch):
    from helios_rl.models import attention

    before = torch.backends.cuda.cudnn_sdp_enabled()
    assert before  # PyTorch's default, which the scope must restore
    with attention.sdpa_scope("cuda"):  # sets the backend flags only; needs no GPU
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.mem_efficient_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
        with attention.sdpa_scope("cuda"):  # nested (an engine step's layers): nothing more to switch
            assert not torch.backends.cuda.cudnn_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
    with attention.sdpa_scope("cpu"):
        assert torch.backends.cuda.cudnn_sdp_enabled()
    monkeypatch.setattr(attention, "CUDA_SDPA_BACKENDS", None)  # gpu.py --sdpa torch-default
    with attention.sdpa_scope("cuda"):
        assert torch.backends.cuda.cudnn_sdp_enabled()
