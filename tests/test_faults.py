"""The engine under faults: failed config changes roll back, memory stays bounded, steps that fail
fail only their rows; chunked prefill, incremental stop strings, batched seeded sampling."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from helios_rl.engine import ApplyError, Engine, EngineSettings, EngineUnavailable, SamplingParams, ServingConfig
from helios_rl.engine.kv_cache import KVPool
from helios_rl.models.layered import LayeredModel
from tiny_models import load_hf

PROMPTS = ["w5 w6 w7 w8", "w20 w21", "w30 w31 w32"]


class Loader:
    """Loads the tiny text models by name; ``fail`` maps a name to the exception its next load raises."""

    def __init__(self, dirs: dict) -> None:
        self.dirs, self.fail, self.calls, self.broken = dict(dirs), {}, [], set()

    def __call__(self, name, depth):
        self.calls.append((name, depth))
        if name in self.broken:
            raise OSError(f"{name}: disk gone (injected)")
        if name in self.fail:
            raise self.fail.pop(name)
        return LayeredModel(self.dirs[name], depth=depth, device="cpu", dtype=torch.float64, name=name)


def engine(dirs, **kw) -> tuple[Engine, Loader]:
    loader = Loader(dirs)
    kw.setdefault("max_batch", 4)
    kw.setdefault("max_model_len", 96)
    return Engine(loader("tiny-a", None), EngineSettings(**kw), loader=loader), loader


def start(eng: Engine, n: int = 3, tokens: int = 10) -> list[str]:
    ids = [eng.add_request(p, SamplingParams(max_new_tokens=tokens, ignore_eos=True)) for p in PROMPTS[:n]]
    for _ in range(3):
        eng.step()
    return ids


def reference(dirs, tokens: int = 10) -> list[list[int]]:
    eng, _ = engine(dirs)
    return [r.output_ids for r in eng.generate(PROMPTS, SamplingParams(max_new_tokens=tokens, ignore_eos=True))]


@pytest.mark.parametrize("fault", [RuntimeError("CPU out of memory (injected)"),
                                   FileNotFoundError("model.safetensors: no such file (injected)")],
                         ids=["oom-at-load", "missing-file"])
def test_a_failed_switch_rolls_back_and_every_request_completes_unchanged(tiny_text_dirs, fault):
    eng, loader = engine(tiny_text_dirs)
    ids = start(eng)
    loader.fail["tiny-b"] = fault
    with pytest.raises(ApplyError, match=r"could not switch models .*injected.*back on tiny-a at depth 6"):
        eng.apply(ServingConfig(model="tiny-b"))
    assert eng.config.model == "tiny-a" and eng.model.depth == 6 and eng.unavailable is None
    eng.run_until_done()
    ref = reference(tiny_text_dirs)
    for rid, want in zip(ids, ref):  # the re-prefilled requests continue exactly where they were
        req = eng.requests[rid]
        assert req.finish_reason == "length" and req.output_ids == want
    assert eng.resident_bytes() <= eng.telemetry.memory_peak


def test_a_truncated_layer_file_fails_the_depth_change_and_keeps_the_old_depth(tiny_text_dirs, tmp_path):
    folder = tmp_path / "tiny-a"
    shutil.copytree(tiny_text_dirs["tiny-a"], folder)
    eng, _ = engine({"tiny-a": folder})
    eng.apply(ServingConfig(depth=3))
    ids = start(eng)
    weights = next(folder.glob("*.safetensors"))
    blob = weights.read_bytes()
    weights.write_bytes(blob[: len(blob) // 2])  # layers 3..5 now point past the end of the file
    before = eng.model.resident_bytes()
    with pytest.raises(ApplyError, match="could not apply the config .*still serving tiny-a at depth 3"):
        eng.apply(ServingConfig(depth=6))
    assert eng.model.depth == 3 and eng.model.resident_layers() == [0, 1, 2]
    assert eng.model.resident_bytes() == before  # the layers loaded before the failure were freed
    eng.run_until_done()
    assert all(eng.requests[r].finish_reason == "length" for r in ids)


def test_out_of_memory_while_resizing_the_pool_keeps_the_old_pool(tiny_text_dirs, monkeypatch):
    eng, _ = engine(tiny_text_dirs)
    ids = start(eng)
    calls = {"n": 0}
    real = KVPool._moved

    def flaky(self, old, num_slots, src, dst):
        calls["n"] += 1
        if calls["n"] == 3:  # half-way through the layers
            raise RuntimeError("out of memory (injected)")
        return real(self, old, num_slots, src, dst)

    monkeypatch.setattr(KVPool, "_moved", flaky)
    with pytest.raises(ApplyError, match="out of memory"):
        eng.apply(ServingConfig(max_batch=3))
    monkeypatch.setattr(KVPool, "_moved", real)
    assert eng.pool.num_slots == 4 and all(k.shape[0] == 4 for k in eng.pool.k + eng.pool.v)
    eng.run_until_done()
    ref = reference(tiny_text_dirs)
    assert [eng.requests[r].output_ids for r in ids] == ref[:3]


def test_an_exception_in_a_layer_fails_only_that_steps_rows_and_the_engine_serves_on(tiny_text_dirs, monkeypatch):
    eng, _ = engine(tiny_text_dirs)
    ids = start(eng, n=2)
    layer = eng.model.family.layers[2]
    real = layer.forward
    monkeypatch.setattr(layer, "forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("bad layer (injected)")))
    events = eng.step()
    assert {e.request_id for e in events} == set(ids) and all(e.finish_reason == "error" for e in events)
    assert all("bad layer (injected)" in eng.requests[r].error for r in ids)
    monkeypatch.setattr(layer, "forward", real)
    (later,) = eng.generate([PROMPTS[2]], SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert later.finish_reason == "length" and eng.unavailable is None


def test_a_persistently_broken_engine_says_so_and_recovers_when_it_can(tiny_text_dirs, monkeypatch):
    eng, loader = engine(tiny_text_dirs)
    start(eng, n=1)
    loader.fail["tiny-b"] = RuntimeError("out of memory (injected)")
    loader.broken.add("tiny-a")  # the rollback's reload fails too, and keeps failing for a while
    rid = eng.add_request(PROMPTS[1], SamplingParams(max_new_tokens=4, ignore_eos=True))
    with pytest.raises(EngineUnavailable, match="reloading tiny-a at depth 6 failed too: .*disk gone"):
        eng.apply(ServingConfig(model="tiny-b"))
    assert eng.unavailable and "disk gone" in eng.unavailable
    events = eng.step()  # the accepted requests are failed, each with the reason, exactly once
    assert {e.request_id for e in events} >= {rid} and all(e.finish_reason == "error" for e in events)
    assert "engine unavailable" in eng.requests[rid].error
    with pytest.raises(EngineUnavailable, match="disk gone"):
        eng.add_request("w5", SamplingParams(max_new_tokens=2))
    loader.broken.clear()
    eng._next_recovery = 0.0  # skip the back-off
    eng.step()  # the loader works again: the previous config comes back
    assert eng.unavailable is None and eng.config.model == "tiny-a"
    (req,) = eng.generate([PROMPTS[0]], SamplingParams(max_new_tokens=3, ignore_eos=True))
    assert req.finish_reason == "length"


def test_a_pool_resize_never_holds_two_pools(tiny_text_dirs):
    eng, _ = engine(tiny_text_dirs, max_batch=8)
    start(eng)
    before = eng.pool.nbytes()
    one = eng.pool.k[0].numel() * eng.pool.k[0].element_size()
    eng.apply(ServingConfig(max_batch=5))
    assert eng.pool.num_slots == 5
    assert eng.pool.peak_bytes <= before + one  # the pool plus one layer's new tensor, not a second pool
    eng.apply(ServingConfig(max_batch=8))
    assert eng.pool.peak_bytes <= eng.pool.nbytes() + one
    eng.run_until_done()


def test_chunked_prefill_bounds_each_step_and_changes_no_token(tiny_text_dirs):
    long = " ".join(f"w{3 + (7 * i) % 150}" for i in range(60))
    out = {}
    for chunk in (4096, 7):
        eng, _ = engine(tiny_text_dirs, max_prefill_tokens=chunk)
        reqs = eng.generate([long, PROMPTS[0]], SamplingParams(max_new_tokens=6, ignore_eos=True))
        out[chunk] = [r.output_ids for r in reqs]
        steps = [s.prefill_tokens for s in eng.telemetry.steps]
        assert max(steps) <= chunk
    assert out[7] == out[4096]
    hf = load_hf(tiny_text_dirs["tiny-a"])
    ids = eng.model.tokenizer(long)["input_ids"]
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out[7][0] == ref[0, len(ids):].tolist()


def test_a_depth_grow_re_prefills_in_chunks(tiny_text_dirs):
    eng, _ = engine(tiny_text_dirs, max_prefill_tokens=5)
    eng.apply(ServingConfig(depth=3))
    ids = start(eng)
    eng.apply(ServingConfig(depth=6))
    eng.run_until_done()
    assert max(s.prefill_tokens for s in eng.telemetry.steps) <= 5
    assert all(eng.requests[r].finish_reason == "length" for r in ids)


def test_stop_strings_are_checked_on_the_new_text_only(tiny_text_dirs, monkeypatch):
    eng, _ = engine(tiny_text_dirs)
    tok = eng.model.tokenizer
    (free,) = eng.generate([PROMPTS[0]], SamplingParams(max_new_tokens=30, ignore_eos=True))
    assert free.text == tok.decode(free.output_ids, skip_special_tokens=True)  # incremental == full decode
    sizes = []
    real = type(tok).decode

    def counting(self, ids, *a, **k):
        sizes.append(len(ids))
        return real(self, ids, *a, **k)

    monkeypatch.setattr(type(tok), "decode", counting)
    stop = free.output_text.split()[20]
    (cut,) = eng.generate([PROMPTS[0]], SamplingParams(max_new_tokens=30, ignore_eos=True, stop=(stop,)))
    assert cut.finish_reason == "stop" and cut.output_text == free.output_text[:free.output_text.find(stop)]
    assert max(sizes) <= 3, "each step decodes a short window, not the whole output"


def test_seeded_sampling_is_batch_independent_and_top_k_one_is_greedy(tiny_dirs):
    model = LayeredModel(tiny_dirs["llama"], device="cpu", dtype=torch.float64)
    eng = Engine(model, EngineSettings(max_batch=4, max_model_len=64))
    p = dict(max_new_tokens=12, ignore_eos=True, temperature=1.2, top_p=0.95, top_k=20)
    (alone,) = eng.generate([[5, 6, 7]], [SamplingParams(seed=3, **p)])
    batch = eng.generate([[5, 6, 7], [9, 10], [11, 12, 13, 14]],
                         [SamplingParams(seed=3, **p), SamplingParams(seed=4, **p), SamplingParams(**p)])
    assert batch[0].output_ids == alone.output_ids
    (greedy,) = eng.generate([[5, 6, 7]], [SamplingParams(max_new_tokens=12, ignore_eos=True)])
    (k1,) = eng.generate([[5, 6, 7]], [SamplingParams(max_new_tokens=12, ignore_eos=True, temperature=1.0, top_k=1,
                                                      seed=9)])
    assert k1.output_ids == greedy.output_ids


def test_sampling_draws_follow_the_filtered_distribution():
    from helios_rl.engine.sampling import filtered_probs, select_tokens

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    probs = filtered_probs(logits, torch.tensor([1.0]), torch.tensor([0.8]), torch.tensor([0]))
    assert probs[0].tolist() == pytest.approx([0.5, 0.3, 0.0, 0.0])  # top-p 0.8 keeps the first two
    g = torch.Generator().manual_seed(0)
    params = [SamplingParams(temperature=1.0, top_p=0.8)]
    draws = np.array([int(select_tokens(logits, params, [g])[0]) for _ in range(4000)])
    assert set(draws) == {0, 1}
    assert abs((draws == 0).mean() - 0.5 / 0.8) < 0.03
