"""Exit heads (issue #3): distillation, calibration, persistence, bad input, engine integration."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from helios_rl.engine.config import EngineSettings, ServingConfig
from helios_rl.engine.engine import Engine
from helios_rl.engine.request import SamplingParams
from helios_rl.exits import calibrate as cal
from helios_rl.exits.data import TokenData, extract_features
from helios_rl.exits.heads import TunedExitHeads
from helios_rl.exits.heads_io import MANIFEST_FILE, WEIGHTS_FILE, ExitHeadsError, enabled_layers, load_exit_heads
from helios_rl.exits.profile import exit_profile, teacher_forced_agreement
from helios_rl.exits.tune import TuneSettings, _targets, eval_loss, tune_exits
from helios_rl.models.heads import confidence
from helios_rl.models.layered import LayeredModel
from helios_rl.models.registry import load_model

LAYERS = (1, 3)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest (and steadiest on a shared CPU) on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(folder, **kw) -> LayeredModel:
    return LayeredModel(folder, device="cpu", dtype=torch.float64, **kw)


def _data(seed: int = 0) -> TokenData:
    g = torch.Generator().manual_seed(seed)
    return TokenData(torch.randint(3, 160, (24, 32), generator=g), torch.randint(3, 160, (10, 32), generator=g),
                     {"sources": ["synthetic"]})


def _settings(**kw) -> TuneSettings:
    base = dict(layers=LAYERS, rank=8, vocab=96, topk=16, epochs=10, batch_size=64, lr=1e-2, min_count=5, seed=0)
    base.update(kw)
    return TuneSettings(**base)


@pytest.fixture(scope="module")
def tuned(tiny_dirs, tmp_path_factory):
    """A tiny llama copy with heads tuned and saved under <folder>/exit_heads."""
    folder = tmp_path_factory.mktemp("tuned") / "llama"
    shutil.copytree(tiny_dirs["llama"], folder)
    model = _model(folder)
    manifest = tune_exits(model, _settings(), data=_data(), progress=False)
    return folder, model, manifest


# ----------------------------------------------------------------------------- training
@pytest.mark.parametrize("vocab", [96, 0])
def test_training_reduces_heldout_distillation_loss(tiny_dirs, vocab):
    model = _model(tiny_dirs["qwen2"])
    manifest = tune_exits(model, _settings(vocab=vocab), data=_data(1), save=False, progress=False)
    for layer in LAYERS:
        row = manifest["training"][str(layer)]
        assert row["heldout_kl_after"] < row["heldout_kl_before"], row
    before = sum(manifest["training"][str(l)]["heldout_kl_before"] for l in LAYERS)
    after = sum(manifest["training"][str(l)]["heldout_kl_after"] for l in LAYERS)
    assert after < 0.9 * before
    assert isinstance(model.heads, TunedExitHeads) and set(model.heads.adapters) == set(LAYERS)
    assert (model.heads.vocab_ids is None) == (vocab == 0)


def test_untrained_adapter_reproduces_shared_head(tiny_dirs):
    model = _model(tiny_dirs["gemma3_text"])
    from helios_rl.exits.heads import new_adapter

    heads = TunedExitHeads(model.heads, model, None)
    heads.adapters[2] = new_adapter(model, 4, dtype=torch.float64)
    h = torch.randn(5, model.hidden_size, dtype=torch.float64)
    torch.testing.assert_close(heads.logits(2, h), model.heads.final_logits(h))


def test_subset_logits_are_exact_in_set_and_never_emit_outside(tuned):
    _, model, _ = tuned
    heads = model.heads
    layer = sorted(heads.adapters)[0]
    h = torch.randn(7, model.hidden_size, dtype=torch.float64)
    full = heads.lm_head(heads.adapters[layer](h))
    sub = heads.logits(layer, h)
    ids = heads.vocab_ids
    torch.testing.assert_close(sub[:, ids], full[:, ids])
    assert bool(torch.isin(sub.argmax(-1), ids).all())
    outside = torch.ones(model.vocab_size, dtype=torch.bool)
    outside[ids] = False
    p = torch.softmax(sub, -1)
    other = torch.softmax(torch.cat([sub[:, ids], heads.adapters[layer].other(heads.adapters[layer](h))], -1), -1)[:, -1]
    torch.testing.assert_close(p[:, outside].sum(-1), other)


# ----------------------------------------------------------------------------- calibration
def test_lowest_threshold_meets_target_on_synthetic_data():
    conf = np.array([0.99, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    correct = np.array([1, 1, 1, 1, 1, 0, 1, 0, 0, 0], dtype=bool)
    # precision of the top-k: 1,1,1,1,1,5/6,6/7,6/8,...: target 0.85 is reached at k=7 (0.857) last
    assert cal.lowest_threshold(conf, correct, 0.85, min_count=1) == pytest.approx(0.6)
    assert cal.lowest_threshold(conf, correct, 0.95, min_count=1) == pytest.approx(0.8)
    assert cal.lowest_threshold(conf, correct, 0.95, min_count=6) == cal.DISABLED
    assert cal.lowest_threshold(conf, np.zeros(10, dtype=bool), 0.5, min_count=1) == cal.DISABLED


def test_lowest_threshold_keeps_ties_together():
    conf = np.array([0.9, 0.8, 0.8, 0.8, 0.1])
    correct = np.array([1, 1, 0, 0, 1], dtype=bool)  # cutting inside the 0.8 tie would look like 100%
    assert cal.lowest_threshold(conf, correct, 0.9, min_count=1) == pytest.approx(0.9)


def test_cascade_calibrates_later_layers_on_tokens_still_in_flight():
    rng = np.random.default_rng(0)
    n = 4000
    conf = {1: rng.uniform(size=n), 2: rng.uniform(size=n)}
    correct = {1: rng.uniform(size=n) < conf[1], 2: rng.uniform(size=n) < 0.5 + conf[2] / 2}
    thr = cal.calibrate(conf, correct, (1, 2), target=0.95, min_count=20)
    res = cal.cascade(conf, correct, thr, (1, 2))
    exited1 = conf[1] >= thr[1]
    assert res["layers"][1]["precision"] >= 0.95 and res["layers"][2]["precision"] >= 0.95
    # layer 2's threshold is the lowest meeting the target among tokens that did not exit at layer 1
    assert thr[2] == cal.lowest_threshold(conf[2][~exited1], correct[2][~exited1], 0.95, 20)
    assert res["agreement"] >= 0.95
    overall = cal.calibrate(conf, correct, (1, 2), target=0.95, mode="overall", min_count=20)
    res_o = cal.cascade(conf, correct, overall, (1, 2))
    assert res_o["agreement"] >= 0.95 and (res_o["exit_at"] >= 0).mean() >= (res["exit_at"] >= 0).mean()


# ----------------------------------------------------------------------------- persistence and bad input
def test_manifest_round_trip(tuned):
    folder, model, manifest = tuned
    disk = json.loads((folder / "exit_heads" / MANIFEST_FILE).read_text())
    assert disk["layers"] == manifest["layers"] and disk["seed"] == 0
    assert disk["model"]["config_hash"] and disk["thresholds"]["target"] == 0.95
    fresh = _model(folder)
    assert load_exit_heads(fresh) is True
    assert fresh.heads.thresholds == model.heads.thresholds
    h = torch.randn(4, fresh.hidden_size, dtype=torch.float64)
    for layer in manifest["layers"]:
        torch.testing.assert_close(fresh.heads.logits(layer, h), model.heads.logits(layer, h))


def _broken_copy(tuned, tmp_path):
    folder, _, _ = tuned
    dst = tmp_path / "heads"
    shutil.copytree(folder / "exit_heads", dst)
    return folder, dst


def test_heads_for_another_model_are_refused(tuned, tiny_dirs):
    _, heads_dir = tuned[0], tuned[0] / "exit_heads"
    other = _model(tiny_dirs["qwen2"])
    with pytest.raises(ExitHeadsError, match=r"manifest\.json.*trained for model"):
        load_exit_heads(other, heads_dir)
    same_arch = _model(tiny_dirs["llama"])  # same config, but a fresh copy is the same checkpoint: accepted
    assert load_exit_heads(same_arch, heads_dir) is True


def test_heads_with_other_weights_but_same_config_are_refused(tuned, tmp_path):
    from tiny_models import save_tiny

    folder = save_tiny("llama", tmp_path / "llama-seed7", seed=7)
    with pytest.raises(ExitHeadsError, match="weights_fingerprint"):
        load_exit_heads(_model(folder), tuned[0] / "exit_heads")


def test_wrong_shapes_are_refused(tuned, tmp_path):
    folder, dst = _broken_copy(tuned, tmp_path)
    manifest = json.loads((dst / MANIFEST_FILE).read_text())
    manifest["head"]["rank"] = 5
    (dst / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ExitHeadsError, match=r"heads\.safetensors.*shape"):
        load_exit_heads(_model(folder), dst)


def test_corrupt_files_are_refused(tuned, tmp_path):
    folder, dst = _broken_copy(tuned, tmp_path)
    blob = (dst / WEIGHTS_FILE).read_bytes()
    (dst / WEIGHTS_FILE).write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ExitHeadsError, match=r"heads\.safetensors: corrupt"):
        load_exit_heads(_model(folder), dst)
    (dst / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ExitHeadsError, match=r"manifest\.json: corrupt"):
        load_exit_heads(_model(folder), dst)
    with pytest.raises(ExitHeadsError, match="not found"):
        load_exit_heads(_model(folder), tmp_path / "nowhere")


def test_fallback_to_shared_head_only_when_allowed(tuned, tmp_path):
    folder, dst = _broken_copy(tuned, tmp_path)
    (dst / WEIGHTS_FILE).write_bytes(b"garbage")
    model = _model(folder)
    with pytest.raises(ExitHeadsError):
        load_exit_heads(model, dst)
    with pytest.warns(RuntimeWarning, match="shared exit head"):
        assert load_exit_heads(model, dst, allow_fallback=True) is False
    assert not isinstance(model.heads, TunedExitHeads) and model.heads.adapters == {}


# ----------------------------------------------------------------------------- engine
def test_registry_autoloads_heads_and_engine_uses_calibrated_thresholds(tuned):
    folder, _, manifest = tuned
    model = load_model(str(folder), device="cpu")
    assert isinstance(model.heads, TunedExitHeads) and model.heads.source.endswith("exit_heads")
    assert not isinstance(load_model(str(folder), device="cpu", heads="shared").heads, TunedExitHeads)
    engine = Engine(model, EngineSettings(max_batch=2, max_model_len=128))
    engine.apply(ServingConfig(exit_layers=tuple(manifest["layers"]), threshold=None))
    for layer, thr in manifest["thresholds"]["by_measure"]["max_prob"].items():
        assert engine._policy.thresholds[int(layer)] == pytest.approx(thr)
    # force exits: calibrated thresholds of 0 make every decode token leave at the first exit layer
    first = min(manifest["layers"])
    model.heads.thresholds["max_prob"] = {l: 0.0 for l in manifest["layers"]}
    engine.apply(ServingConfig(exit_layers=tuple(manifest["layers"]), threshold=None))
    (req,) = engine.generate([[5, 6, 7, 8]], SamplingParams(max_new_tokens=6, ignore_eos=True))
    assert req.exit_layers[1:] == [first] * 5  # the first token comes from the prefill (full depth)
    h = torch.randn(1, model.hidden_size)
    assert float(confidence(model.heads.logits(first, h), "max_prob")) <= 1.0


def test_exit_profile_reports_histogram_and_agreement(tuned):
    folder, _, manifest = tuned
    model = _model(folder)
    load_exit_heads(model)
    model.heads.thresholds["max_prob"] = {l: 0.0 for l in manifest["layers"]}
    prompts = [[5, 6, 7], [9, 10, 11, 12]]
    prof = exit_profile(model, prompts, None, max_new_tokens=5, batch=2, measure_agreement=True)
    assert prof.tokens == 10 and sum(prof.exit_counts) == 10
    assert prof.exit_counts[min(manifest["layers"])] == 8 and prof.exit_rate == pytest.approx(0.8)
    assert 0.0 <= prof.agreement <= 1.0 and prof.tokens_per_s > 0
    full = exit_profile(model, prompts, ServingConfig(exit_layers=()), max_new_tokens=5, batch=2,
                        measure_agreement=True)
    assert full.agreement == 1.0 and full.mean_exit_layer == model.num_layers - 1
    assert prof.layer_covering(0.5) == min(manifest["layers"])


def test_teacher_forced_agreement_restores_partial_depth(tuned):
    folder, _, _ = tuned
    model = _model(folder, depth=3)
    engine = Engine(model, EngineSettings(max_batch=1, max_model_len=64))
    reqs = engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=4, ignore_eos=True))
    good, total = teacher_forced_agreement(model, reqs)
    assert total == 4 and 0 <= good <= 4 and model.depth == 3


def test_features_match_engine_full_depth_logits(tiny_dirs):
    model = _model(tiny_dirs["gemma3_text"])
    seq = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    feats = extract_features(model, seq, (2,), topk=4, progress=False)
    engine = Engine(model, EngineSettings(max_batch=1, max_model_len=64))
    (req,) = engine.generate([seq[0, :5].tolist()], SamplingParams(max_new_tokens=1, ignore_eos=True))
    assert int(feats.final_argmax[4]) == req.output_ids[0]
    assert feats.hidden[2].shape == (8, model.hidden_size)


def test_report_cli_writes_table_and_png(tuned, tmp_path, capsys):
    from helios_rl.cli import main

    folder, _, _ = tuned
    png = tmp_path / "r.png"
    assert main(["exits", "report", str(folder), "--out", str(png)]) == 0
    out = capsys.readouterr().out
    assert "tuned" in out and "shared" in out and png.stat().st_size > 1000


def test_eval_loss_targets_bucket_out_of_set_mass(tuned):
    _, model, _ = tuned
    seq = torch.randint(3, 160, (2, 16), generator=torch.Generator().manual_seed(3))
    feats = extract_features(model, seq, (1,), topk=16, progress=False)
    lookup = torch.full((model.vocab_size,), -1, dtype=torch.long)
    lookup[model.heads.vocab_ids] = torch.arange(len(model.heads.vocab_ids))
    idx, p = _targets(feats, lookup, len(model.heads.vocab_ids))
    assert bool(((idx == len(model.heads.vocab_ids)) == (lookup[feats.top_ids] < 0)).all())
    assert eval_loss(model.heads, 1, feats, idx, p) > 0


@pytest.mark.slow
def test_real_smollm2_tune_save_load_and_serve(tmp_path):
    torch.set_num_threads(1)
    model = load_model("smollm2-135m", heads="shared")
    s = TuneSettings(layers=(28,), tokens=1536, generated=256, seq_len=64, epochs=2, vocab=4096, min_count=5,
                     shared_tokens=256)
    manifest = tune_exits(model, s, out=str(tmp_path / "heads"), progress=False)
    row = manifest["training"]["28"]
    assert row["heldout_kl_after"] < row["heldout_kl_before"]
    fresh = load_model("smollm2-135m", heads=str(tmp_path / "heads"))
    prof = exit_profile(fresh, ["The capital of France is"], None, max_new_tokens=8, batch=1, measure_agreement=True)
    assert prof.tokens == 8 and prof.agreement is not None


def test_exit_profile_restores_calibrated_thresholds_on_a_live_engine(tuned):
    folder, _, manifest = tuned
    model = _model(folder)
    load_exit_heads(model)
    engine = Engine(model, EngineSettings(max_batch=2, max_model_len=64))
    engine.apply(ServingConfig(exit_layers=tuple(manifest["layers"])))
    before = dict(engine._policy.thresholds)
    exit_profile(engine, [[5, 6, 7]], 0.0, max_new_tokens=3)
    assert engine._policy.thresholds == before and engine.config.exit_layers == tuple(manifest["layers"])
    prof = exit_profile(engine, [[5, 6, 7]], None, max_new_tokens=3)  # None after an explicit one: calibrated
    assert prof.exit_layers == list(enabled_layers(model))
    for layer in prof.exit_layers:
        assert prof.thresholds[layer] == pytest.approx(model.heads.thresholds["max_prob"][layer])


def test_full_vocab_logits_agree_with_subset_in_set(tuned):
    _, model, manifest = tuned
    layer = manifest["layers"][0]
    h = torch.randn(3, model.hidden_size, dtype=torch.float64)
    full = model.heads.full_vocab_logits(layer, h)
    assert full.shape == (3, model.vocab_size)
    ids = model.heads.vocab_ids
    torch.testing.assert_close(full[:, ids], model.heads.logits(layer, h)[:, ids])
    adapters = sum(p.numel() * 8 for a in model.heads.adapters.values() for p in a.parameters())
    assert model.heads.nbytes() == adapters + ids.numel() * (8 + model.hidden_size * 8)


def test_exit_heads_memory_is_resident_and_shrinks_the_admissible_batch(tiny_dirs):
    """Adapters, the gathered exit-vocabulary rows and the per-exit logits rows are all counted."""
    from helios_rl.controllers.repository import MemorySettings, ModelProfile
    from helios_rl.engine import Engine, EngineSettings
    from helios_rl.engine.engine import slot_bytes
    from helios_rl.exits.heads import new_adapter

    model = _model(tiny_dirs["llama"])
    bare = model.resident_bytes()
    settings = EngineSettings(max_batch=256, max_model_len=32, pending_window=4)
    from helios_rl.engine.engine import prefill_bytes

    settings.memory_budget_bytes = bare + prefill_bytes(settings, model) + 3 * slot_bytes(settings, model, 6) + 1000
    before = Engine(model, settings).admissible_batch(6)
    assert before == 3
    heads = TunedExitHeads(model.heads, model, torch.arange(40))
    for layer in (1, 3):
        heads.adapters[layer] = new_adapter(model, 4).to(model.dtype)
    model.heads = heads
    rows = 40 * model.hidden_size * 8  # the gathered LM-head rows (float64)
    adapters = sum(p.numel() * 8 for a in heads.adapters.values() for p in a.parameters())
    assert model.resident_bytes() == bare + rows + adapters + 40 * 8  # + the int64 index
    eng = Engine(model, settings)
    after = eng.admissible_batch(6)
    assert after == 2  # the heads (and their logits rows) take more than the 1000 spare bytes
    prof = ModelProfile(name="m", num_layers=6, non_layer_bytes=model.weight_bytes_at_depth(0),
                        layer_bytes=[model.layer_bytes(i) for i in range(6)], adapter_bytes=heads.nbytes(),
                        kv_bytes_per_token_layer=model.kv_bytes_per_token_layer(), hidden_size=model.hidden_size,
                        elem_bytes=8, max_positions=model.max_positions, exit_layers=[1, 3], heads="trained",
                        vocab_size=model.vocab_size, head_layers=[1, 3], intermediate_size=model.intermediate_size,
                        num_heads=model.num_heads, num_kv_heads=model.num_kv_heads, head_dim=model.head_dim)
    mem = MemorySettings(settings.memory_budget_bytes, 256, 32, 4, True, settings.max_prefill_tokens)
    assert all(prof.admissible_batch(d, mem) == eng.admissible_batch(d) for d in range(1, 7))


def test_every_precision_target_has_its_own_calibrated_exits(tuned):
    from helios_rl.engine import Engine, EngineSettings, ServingConfig

    _, model, manifest = tuned
    assert set(manifest["targets"]) == {"0.99", "0.95", "0.9", "0.8"}
    rates = []
    for key, spec in manifest["targets"].items():
        assert set(spec["layers"]) <= set(manifest["layers"])
        for m in ("max_prob", "margin", "entropy"):
            assert set(spec["thresholds"][m]) == {str(l) for l in spec["layers"]}
        rates.append((float(key), spec["heldout"]["exit_rate"]))
    rates.sort()
    assert all(a[1] >= b[1] for a, b in zip(rates, rates[1:])), "a lower target never exits less"
    eng = Engine(model, EngineSettings(max_batch=2, max_model_len=64))
    eng.apply(ServingConfig(target=0.8))
    spec = model.heads.target(0.8)
    assert eng._policy.layers == frozenset(spec.layers)
    assert eng._policy.thresholds == {l: spec.thresholds["max_prob"][l] for l in spec.layers}
    assert eng.config.target == 0.8 and eng.config.threshold is None
    eng.apply(ServingConfig(threshold=0.5, exit_layers=(1,)))  # a raw threshold replaces the target
    assert eng.config.target is None and eng._policy.layers == frozenset({1})
    with pytest.raises(ValueError, match=r"target 0.7 is not calibrated .*calibrated: 0.8, 0.9, 0.95, 0.99"):
        eng.apply(ServingConfig(target=0.7))
    assert eng.config.threshold == 0.5  # a refused target leaves the config as it was


def test_target_one_serves_every_token_at_the_last_layer_on_tuned_heads(tuned, tmp_path):
    """Precision target 1 is no early exit: the text and exit layers of exits switched off, where the
    lowest calibrated target exits early on the same prompts; exit heads cannot calibrate it."""
    from helios_rl.exits.heads_io import parse_targets
    from helios_rl.models.heads import NO_EXIT

    _, model, manifest = tuned
    assert model.heads.target(1.0) is NO_EXIT and model.heads.target(1) is NO_EXIT
    prompts = [[3, 9, 4, 1], [12, 5, 7], [2, 2, 8, 30, 11]]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)

    def serve(**knob):
        eng = Engine(model, EngineSettings(max_batch=3, max_model_len=64))
        eng.apply(ServingConfig(**knob))
        eng.generate(prompts, params)
        reqs = list(eng.requests.values())
        return [r.output_ids for r in reqs], [l for r in reqs for l in r.exit_layers], eng

    out_one, layers_one, eng = serve(target=1.0)
    assert eng._policy.layers == frozenset() and eng.config.target == 1.0
    out_off, layers_off, _ = serve(exit_layers=(), threshold=1.0)
    assert out_one == out_off and set(layers_one) == set(layers_off) == {model.num_layers - 1}
    _, layers_low, _ = serve(target=min(float(t) for t in manifest["targets"]))
    assert min(layers_low) < model.num_layers - 1, "the test must compare against a target that exits early"
    with pytest.raises(ExitHeadsError, match="reserved: target 1 means no early exit"):
        parse_targets({"1.0": {"layers": [], "thresholds": {}}}, tmp_path / "manifest.json")
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\).*\[1\.0\]"):
        tune_exits(model, _settings(targets=(0.9, 1.0)), data=_data(), progress=False, save=False)


def test_a_target_on_a_model_without_calibrated_exits_serves_without_exits(tiny_dirs):
    from helios_rl.engine import Engine, EngineSettings, ServingConfig

    eng = Engine(_model(tiny_dirs["llama"]), EngineSettings(max_batch=2, max_model_len=64))
    eng.apply(ServingConfig(target=0.9))
    assert eng._policy.layers == frozenset()
    with pytest.raises(ValueError, match="target must be a precision"):
        eng.apply(ServingConfig(target=1.5))


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_shipped_heads_are_complete_and_say_how_they_were_made(name):
    """The installed heads: file hashes match, every target is calibrated, provenance is recorded."""
    import hashlib

    from helios_rl.exits.heads_io import read_manifest, shipped_heads_dir

    folder = shipped_heads_dir(name)
    assert folder is not None, f"no heads ship for {name}"
    manifest = read_manifest(folder)
    blob = (folder / manifest["weights"]["file"]).read_bytes()
    assert hashlib.sha256(blob).hexdigest() == manifest["weights"]["sha256"]
    assert manifest["model"]["name"] == name and set(manifest["targets"]) == {"0.99", "0.95", "0.9", "0.8"}
    assert any(t["layers"] for t in manifest["targets"].values()), "some target exits early"
    for t in manifest["targets"].values():
        assert set(t["layers"]) <= set(manifest["layers"])
    prov = manifest["provenance"]
    assert prov["command"].startswith("helios-rl tune-exits") and prov["git_revision"]
    assert manifest["data"]["tokens"]["heldout"] > 0 and manifest["seed"] == 0
    assert len(blob) < 4 << 20  # compact: adapters and the vocabulary index only, no LM-head rows


@pytest.mark.parametrize("measure", ["max_prob", "margin", "entropy"])
def test_compact_readout_confidence_equals_the_expanded_rows(tuned, measure):
    """The engine scores exits on the K+1 compact logits; it must equal scoring the full-width row."""
    _, model, manifest = tuned
    layer = manifest["layers"][0]
    h = torch.randn(5, model.hidden_size, dtype=torch.float64) * 3
    ro = model.heads.readout(layer, h)
    assert ro.full is None and ro.sub.shape == (5, model.heads.vocab_ids.numel())
    full = model.heads.logits(layer, h)
    torch.testing.assert_close(ro.confidence(measure), confidence(full, measure))
    rows = torch.tensor([4, 1])
    torch.testing.assert_close(ro.logits(rows), full[rows])
