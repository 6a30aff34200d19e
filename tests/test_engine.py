"""Engine correctness: identity with transformers generate, exact KV under early exit, control."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from helios_rl.engine.config import EngineSettings, ServingConfig
from helios_rl.engine.engine import Engine
from helios_rl.engine.request import RequestError, SamplingParams
from helios_rl.models.layered import LayeredModel
from tiny_models import FAMILIES, load_hf

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41], [50, 51]]


@functools.lru_cache(maxsize=None)
def _hf(folder):
    return load_hf(folder)


def hf_greedy(folder, prompt, n):
    hf = _hf(folder)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


def make_engine(folder, **kw) -> Engine:
    depth = kw.pop("depth", None)
    model = LayeredModel(folder, depth=depth, device="cpu", dtype=torch.float64)
    kw.setdefault("max_model_len", 128)
    return Engine(model, EngineSettings(**kw))


@pytest.mark.parametrize("family", FAMILIES)
def test_full_depth_batch1_identical_to_generate(tiny_dirs, family):
    eng = make_engine(tiny_dirs[family], max_batch=1)
    (req,) = eng.generate([PROMPTS[0]], SamplingParams(max_new_tokens=16, ignore_eos=True))
    assert req.output_ids == hf_greedy(tiny_dirs[family], PROMPTS[0], 16)
    assert set(req.exit_layers) == {5}


@pytest.mark.parametrize("family", FAMILIES)
def test_continuous_batching_with_late_joins_identical_to_generate(tiny_dirs, family):
    """Prompts of different lengths join at different steps; each output equals its own generate."""
    eng = make_engine(tiny_dirs[family], max_batch=3)
    params = SamplingParams(max_new_tokens=14, ignore_eos=True)
    ids = [eng.add_request(PROMPTS[0], params), eng.add_request(PROMPTS[1], params)]
    for _ in range(3):
        eng.step()
    ids.append(eng.add_request(PROMPTS[2], params))
    eng.step()
    ids.append(eng.add_request(PROMPTS[3], params))  # waits for a free slot (max_batch=3)
    eng.run_until_done()
    for rid, prompt in zip(ids, PROMPTS):
        assert eng.requests[rid].output_ids == hf_greedy(tiny_dirs[family], prompt, 14), rid


def _run_with_exits(folder, strategy, thresholds):
    eng = make_engine(folder, max_batch=4, kv_strategy=strategy, pending_window=8)
    eng.apply(ServingConfig(exit_layers=(0, 1, 2, 3, 4), threshold=thresholds))
    ids = [eng.add_request(p, SamplingParams(max_new_tokens=40, ignore_eos=True)) for p in PROMPTS[:3]]
    for _ in range(24):
        eng.step()
    exit_layers = [layer for i in ids for layer in eng.requests[i].exit_layers]
    eng.apply(ServingConfig(exit_layers=()))  # next token goes deep: pending positions are recomputed
    eng.step()
    return eng, ids, exit_layers


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text", "opt"])
def test_recompute_strategy_kv_equals_full_forward(tiny_dirs, family, plain_linear):
    thresholds = {0: 0.07, 1: 0.06, 2: 0.05, 3: 0.05, 4: 0.04}
    eng, ids, exit_layers = _run_with_exits(tiny_dirs[family], "recompute", thresholds)
    assert len(set(exit_layers)) >= 2 and min(exit_layers) < 5, "the test must exercise early exits"
    hf = load_hf(tiny_dirs[family])
    for rid in ids:
        req = eng.requests[rid]
        toks = req.token_ids[:-1]
        with torch.no_grad():
            ref = hf(torch.tensor([toks]), use_cache=True).past_key_values
        for layer in range(6):
            kref, vref = ref.layers[layer].keys[0], ref.layers[layer].values[0]
            t = kref.shape[1]  # sliding-window layers may keep only the last window
            k = eng.pool.k[layer][req.slot][:, len(toks) - t:len(toks)]
            v = eng.pool.v[layer][req.slot][:, len(toks) - t:len(toks)]
            torch.testing.assert_close(k, kref, rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(v, vref, rtol=1e-9, atol=1e-9)


def test_copy_strategy_fills_every_layer_without_recompute(tiny_dirs):
    eng = make_engine(tiny_dirs["llama"], max_batch=2, kv_strategy="copy")
    eng.apply(ServingConfig(exit_layers=(1,), threshold=0.0))  # every decode token exits at layer 1
    rid = eng.add_request(PROMPTS[0], SamplingParams(max_new_tokens=6, ignore_eos=True))
    for _ in range(4):
        eng.step()
    req = eng.requests[rid]
    assert req.exit_layers[1:] == [1, 1, 1]  # first token comes from the prefill at full depth
    assert (eng.pool.kv_len[req.slot] == len(req.token_ids) - 1).all()  # deeper layers filled by copy
    assert eng.pool.hbuf is None


def test_exits_are_counted_in_telemetry_and_breaches_only_below_full_depth(tiny_dirs):
    eng = make_engine(tiny_dirs["llama"], max_batch=4, depth=4)
    eng.apply(ServingConfig(exit_layers=(1,), threshold=1.0))  # nothing passes: all greedy exits at layer 3
    eng.generate(PROMPTS[:2], SamplingParams(max_new_tokens=5, ignore_eos=True))
    snap = eng.snapshot()
    assert snap.exit_counts[3] == 10 and sum(snap.exit_counts) == 10
    assert snap.breaches == 10 and snap.greedy_exits == 10
    assert snap.depth == 4 and snap.output_tokens == 10
    assert snap.ttft_p50 > 0 and snap.requests_finished == 2


def test_depth_change_mid_generation_keeps_requests_and_stays_exact(tiny_dirs):
    folder = tiny_dirs["qwen2"]
    eng = make_engine(folder, max_batch=4)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    ids = [eng.add_request(p, params) for p in PROMPTS[:3]]
    for _ in range(4):
        eng.step()
    eng.apply(ServingConfig(depth=3))
    for _ in range(3):
        eng.step()
    eng.apply(ServingConfig(depth=6))
    eng.run_until_done()
    for rid, prompt in zip(ids, PROMPTS):
        req = eng.requests[rid]
        assert req.finished and req.num_generated == 12
        # the tokens produced at full depth before and after the shallow phase match a fresh run
        # continued from the same prefix
        assert req.exit_layers[:4] == [5] * 4 and req.exit_layers[4:7] == [2] * 3
        tail = hf_greedy(folder, prompt + req.output_ids[:7], 5)
        assert req.output_ids[7:] == tail


def test_memory_budget_sets_the_batch_and_half_depth_admits_more(tiny_dirs):
    folder = tiny_dirs["llama"]
    eng = make_engine(folder, max_batch=64, max_model_len=64)
    model = eng.model
    # KV + pending ring + the step's float32 logits rows (last layer, confidence softmax)
    per_slot_full = 6 * 64 * model.kv_bytes_per_token_layer() + 32 * model.hidden_size * 8 + 2 * model.vocab_size * 4
    # + the activations of one prefill chunk: every layer input, Q/K/V, MLP and float32 scores over max_len keys
    t, h = 1024, model.hidden_size
    act = t * (3 * h + (4 + 2 * 2) * model.head_dim + 3 * model.intermediate_size) * 8 + 4 * t * 64 * 4
    budget = model.weight_bytes_at_depth(6) + act + 5 * per_slot_full + 100
    eng2 = make_engine(folder, max_batch=64, max_model_len=64, memory_budget_bytes=budget)
    assert eng2.max_batch == 5
    assert eng2.admissible_batch(3) > eng2.max_batch
    eng2.apply(ServingConfig(depth=3))
    assert eng2.max_batch == eng2.admissible_batch(3) > 5
    assert eng2.resident_bytes() <= budget


def test_budget_below_one_layer_is_rejected(tiny_dirs):
    with pytest.raises(ValueError, match="memory budget"):
        make_engine(tiny_dirs["llama"], memory_budget_bytes=1000)


def test_batch_shrink_preempts_and_loses_nothing(tiny_dirs):
    folder = tiny_dirs["llama"]
    eng = make_engine(folder, max_batch=4)
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    ids = [eng.add_request(p, params) for p in PROMPTS]
    for _ in range(3):
        eng.step()
    eng.apply(ServingConfig(max_batch=1))
    assert len(eng.running) == 1 and len(eng.waiting) == 3
    eng.run_until_done()
    for rid, prompt in zip(ids, PROMPTS):
        assert eng.requests[rid].output_ids == hf_greedy(folder, prompt, 10)


def test_model_switch_continues_requests_from_their_text(tiny_text_dirs):
    dirs = tiny_text_dirs

    def loader(name, depth):
        return LayeredModel(dirs[name], depth=depth, device="cpu", dtype=torch.float64, name=name)

    eng = Engine(loader("tiny-a", None), EngineSettings(max_batch=4, max_model_len=128), loader=loader)
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    ids = [eng.add_request("w5 w6 w7 w8", params), eng.add_request("w20 w21", params)]
    for _ in range(4):
        eng.step()
    tok_a = eng.model.tokenizer
    before = {rid: tok_a.decode(eng.requests[rid].output_ids, skip_special_tokens=True) for rid in ids}
    eng.apply(ServingConfig(model="tiny-b"))
    assert eng.model.name == "tiny-b" and eng.model.num_layers == 4
    eng.run_until_done()
    for rid in ids:
        req = eng.requests[rid]
        assert req.finished and req.num_generated == 10
        assert req.models == ["tiny-a"] * 4 + ["tiny-b"] * 6
        assert req.output_text.startswith(before[rid])
        # tiny-b gives the same words other ids: its prompt was re-tokenised from the text so far
        assert req.token_ids[:len(req.token_ids) - 6] == eng.model.tokenizer(
            req.prompt_text + before[rid])["input_ids"]
    snap = eng.snapshot()
    assert snap.switches == 1 and snap.model == "tiny-b"


def test_unknown_model_switch_keeps_serving(tiny_text_dirs):
    def loader(name, depth):
        if name not in tiny_text_dirs:
            raise ValueError(f"unknown model {name!r}")
        return LayeredModel(tiny_text_dirs[name], depth=depth, device="cpu", dtype=torch.float64, name=name)

    eng = Engine(loader("tiny-a", None), EngineSettings(max_batch=2, max_model_len=64), loader=loader)
    rid = eng.add_request("w5 w6", SamplingParams(max_new_tokens=4, ignore_eos=True))
    eng.step()
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        eng.apply(ServingConfig(model="nope"))
    with pytest.raises(ValueError, match="depth must be between 1 and 6"):
        eng.apply(ServingConfig(depth=9))
    eng.run_until_done()
    assert eng.requests[rid].num_generated == 4 and eng.model.name == "tiny-a"


def test_stop_strings_and_eos(tiny_text_dirs):
    model = LayeredModel(tiny_text_dirs["tiny-a"], device="cpu", dtype=torch.float64)
    eng = Engine(model, EngineSettings(max_batch=2, max_model_len=64))
    (free,) = eng.generate(["w5 w6 w7"], SamplingParams(max_new_tokens=8, ignore_eos=True))
    stop_word = free.output_text.split()[2]
    (cut,) = eng.generate(["w5 w6 w7"], SamplingParams(max_new_tokens=8, ignore_eos=True, stop=(stop_word,)))
    assert cut.finish_reason == "stop"
    assert cut.output_text == free.output_text[:free.output_text.find(stop_word)]
    assert cut.num_generated < 8



def test_eos_stops_unless_ignored(tiny_text_dirs, tmp_path):
    import json
    import shutil

    src = tiny_text_dirs["tiny-a"]
    eng = Engine(LayeredModel(src, device="cpu", dtype=torch.float64), EngineSettings(max_batch=1, max_model_len=64))
    (free,) = eng.generate([[5, 6, 7]], SamplingParams(max_new_tokens=6, ignore_eos=True))
    target = free.output_ids[2]
    folder = shutil.copytree(src, tmp_path / "m")
    for name in ("config.json", "generation_config.json"):
        cfg = json.loads((folder / name).read_text())
        cfg["eos_token_id"] = target
        (folder / name).write_text(json.dumps(cfg))
    eng2 = Engine(LayeredModel(folder, device="cpu", dtype=torch.float64), EngineSettings(max_batch=1, max_model_len=64))
    (stopped,) = eng2.generate([[5, 6, 7]], SamplingParams(max_new_tokens=6))
    assert stopped.finish_reason == "stop"
    assert stopped.output_ids == free.output_ids[:free.output_ids.index(target) + 1]
    (ignored,) = eng2.generate([[5, 6, 7]], SamplingParams(max_new_tokens=6, ignore_eos=True))
    assert ignored.output_ids == free.output_ids


@pytest.mark.parametrize("bad,match", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(stop=("",)), "stop"),
])
def test_invalid_sampling_values_are_clear_errors(tiny_dirs, bad, match):
    eng = make_engine(tiny_dirs["llama"], max_batch=2)
    ok = eng.add_request(PROMPTS[0], SamplingParams(max_new_tokens=3, ignore_eos=True))
    with pytest.raises(RequestError, match=match):
        eng.add_request(PROMPTS[1], SamplingParams(**bad))
    eng.run_until_done()
    assert eng.requests[ok].num_generated == 3  # the engine kept serving


def test_empty_and_too_long_prompts_are_rejected(tiny_dirs):
    eng = make_engine(tiny_dirs["llama"], max_batch=2, max_model_len=16)
    with pytest.raises(RequestError, match="empty"):
        eng.add_request([])
    with pytest.raises(RequestError, match="max_model_len"):
        eng.add_request(list(range(3, 20)))
    with pytest.raises(RequestError, match="token ids"):
        eng.add_request([5, 999])


def test_sampling_is_reproducible_with_a_seed(tiny_dirs):
    eng = make_engine(tiny_dirs["llama"], max_batch=4)
    p = dict(max_new_tokens=12, ignore_eos=True, temperature=1.0, top_p=0.9)
    a, b, c = eng.generate([PROMPTS[0]] * 3, [SamplingParams(seed=1, **p), SamplingParams(seed=1, **p),
                                              SamplingParams(seed=2, **p)])
    assert a.output_ids == b.output_ids
    assert a.output_ids != c.output_ids


def test_generation_stops_at_context_end(tiny_dirs):
    eng = make_engine(tiny_dirs["llama"], max_batch=1, max_model_len=12)
    (req,) = eng.generate([PROMPTS[0]], SamplingParams(max_new_tokens=50, ignore_eos=True))
    assert req.finish_reason == "length" and req.seq_len == 12


def test_pending_window_bounds_recompute_backlog(tiny_dirs):
    eng = make_engine(tiny_dirs["llama"], max_batch=1, pending_window=4)
    eng.apply(ServingConfig(exit_layers=(0,), threshold=0.0))  # would always exit at layer 0
    (req,) = eng.generate([PROMPTS[0]], SamplingParams(max_new_tokens=13, ignore_eos=True))
    layers = np.array(req.exit_layers[1:])
    assert (layers == 5).any(), "a full window forces a token to the last layer"
    deep = np.nonzero(layers == 5)[0]
    assert np.diff(deep).max(initial=0) - 1 <= 4  # at most `pending_window` early exits in a row
    assert deep[0] <= 4


def test_extreme_sampling_values_stay_valid(tiny_dirs):
    """Regressions found by the server fuzz: top_p below float32 resolution, a near-zero temperature."""
    eng = make_engine(tiny_dirs["llama"], max_batch=2)
    greedy, tiny_p = eng.generate([PROMPTS[0]] * 2, [SamplingParams(max_new_tokens=5, ignore_eos=True),
                                                     SamplingParams(max_new_tokens=5, ignore_eos=True,
                                                                    temperature=1.0, top_p=5e-324, seed=0)])
    assert tiny_p.output_ids == greedy.output_ids  # only the top token survives the nucleus cut
    (cold,) = eng.generate([PROMPTS[0]], SamplingParams(max_new_tokens=5, ignore_eos=True, temperature=1e-30, seed=0))
    assert cold.output_ids == greedy.output_ids and cold.finish_reason == "length"


def test_release_forgets_only_finished_requests(tiny_dirs):
    eng = make_engine(tiny_dirs["llama"], max_batch=2)
    rid = eng.add_request(PROMPTS[0], SamplingParams(max_new_tokens=2, ignore_eos=True))
    assert eng.release(rid) is None and rid in eng.requests
    eng.run_until_done()
    assert eng.release(rid).finished and rid not in eng.requests


def test_windowed_snapshot_counts_only_recent_steps(tiny_dirs):
    t = [0.0]
    eng = make_engine(tiny_dirs["llama"], max_batch=2)
    eng.clock = lambda: t[0]
    eng.add_request(PROMPTS[0], SamplingParams(max_new_tokens=6, ignore_eos=True))
    for _ in range(6):
        eng.step()
        t[0] += 1.0
    assert eng.snapshot(since=3.0).steps == 3 and eng.snapshot().steps == 6


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recompute_stays_exact_under_mixed_exits_and_joins(tiny_dirs, seed):
    """Random per-layer thresholds, rows joining late, windows of different widths exiting at
    different layers (regression: a compacted batch kept the widest window's padding)."""
    rng = np.random.default_rng(seed)
    folder = tiny_dirs["llama"]
    eng = make_engine(folder, max_batch=4, pending_window=6)
    thr = {layer: float(rng.uniform(0.02, 0.08)) for layer in range(5)}
    eng.apply(ServingConfig(exit_layers=(0, 1, 2, 3, 4), threshold=thr))
    ids = []
    for step in range(30):
        if step % 6 == 0 and len(ids) < 4:
            prompt = [int(x) for x in rng.integers(3, 150, size=int(rng.integers(2, 9)))]
            ids.append(eng.add_request(prompt, SamplingParams(max_new_tokens=40, ignore_eos=True)))
        eng.step()
    eng.apply(ServingConfig(exit_layers=()))
    eng.step()
    hf = _hf(folder)
    for rid in ids:
        req = eng.requests[rid]
        toks = req.token_ids[:-1]
        with torch.no_grad():
            ref = hf(torch.tensor([toks]), use_cache=True).past_key_values
        for layer in range(6):
            k = eng.pool.k[layer][req.slot][:, :len(toks)]
            torch.testing.assert_close(k, ref.layers[layer].keys[0], rtol=1e-9, atol=1e-9)


def test_compacted_batch_drops_padding_of_departed_wide_windows(tiny_dirs, monkeypatch):
    """Row A leaves at layer 2 with a 3-position window while row B must widen at layer 3."""
    from helios_rl.engine import forward
    from helios_rl.engine.forward import ExitPolicy, LayerLoop
    from helios_rl.engine.kv_cache import KVPool

    folder = tiny_dirs["llama"]
    model = LayeredModel(folder, device="cpu", dtype=torch.float64)
    pool = KVPool(2, 6, 64, model.num_kv_heads, model.head_dim, model.hidden_size, 8, model.dtype, model.device)
    loop = LayerLoop(model, pool)
    seqs = [[5, 6, 7], [20, 21, 22, 23]]
    slots = [pool.alloc(), pool.alloc()]
    schedule = iter([[1, 0], [0], [1, 0], [1], [0, 0], [1, 0]])  # per exit-layer call: rows still active
    monkeypatch.setattr(forward.Readout, "confidence",
                        lambda self, measure: torch.tensor(next(schedule), dtype=torch.float64))
    policy = ExitPolicy(layers=frozenset({0, 2}), thresholds={0: 0.5, 2: 0.5})

    def advance(pol):
        for ex in loop.run_rows(slots, seqs, pol):
            seqs[ex.index].append(int(ex.logits.argmax()))

    with torch.inference_mode():
        loop.run_rows(slots, seqs, ExitPolicy(), allow_exit=np.zeros(2, dtype=bool))  # prefill
        for s in seqs:
            s.append(7)
        for _ in range(3):
            advance(policy)
        advance(ExitPolicy())  # exits off: every pending position is recomputed
    hf = _hf(folder)
    for slot, seq in zip(slots, seqs):
        toks = seq[:-1]
        with torch.no_grad():
            ref = hf(torch.tensor([toks]), use_cache=True).past_key_values
        for layer in range(6):
            torch.testing.assert_close(pool.k[layer][slot][:, :len(toks)], ref.layers[layer].keys[0])


def test_threshold_calibrated_returns_to_the_models_calibration(tiny_dirs):
    eng = make_engine(tiny_dirs["llama"], max_batch=1)
    eng.model.heads.thresholds["max_prob"] = {1: 0.42}
    eng.apply(ServingConfig(exit_layers=(1,), threshold=0.9))
    assert eng._policy.thresholds[1] == 0.9
    eng.apply(ServingConfig(threshold="calibrated"))
    assert eng._policy.thresholds[1] == 0.42
    with pytest.raises(ValueError, match="threshold"):
        eng.apply(ServingConfig(threshold="nonsense"))


@pytest.mark.parametrize("exit_layers", [(), (1,), (3,), (4,), (1, 4)], ids=["none", "below", "at-cut", "above",
                                                                             "below+above"])
def test_forced_exit_at_every_partial_depth_is_a_breach(tiny_dirs, exit_layers):
    """Depth 4 of 6: a token that no exit let out leaves at layer 3 anyway and must count as a breach,
    whether the exit layers lie below, at or above the cut (regression: none above -> 0 breaches)."""
    eng = make_engine(tiny_dirs["llama"], max_batch=4, depth=4)
    eng.apply(ServingConfig(exit_layers=exit_layers, threshold=1.0))  # no confidence reaches 1.0
    eng.generate(PROMPTS[:2], SamplingParams(max_new_tokens=5, ignore_eos=True))
    snap = eng.snapshot()
    assert snap.exit_counts[3] == 10 and sum(snap.exit_counts) == 10
    assert snap.breaches == 10 and snap.greedy_exits == 10


def test_confident_exit_at_the_cut_is_not_a_breach(tiny_dirs):
    eng = make_engine(tiny_dirs["llama"], max_batch=4, depth=4)
    eng.apply(ServingConfig(exit_layers=(3,), threshold=0.0))  # every token qualifies at layer 3
    eng.generate(PROMPTS[:2], SamplingParams(max_new_tokens=5, ignore_eos=True))
    snap = eng.snapshot()
    assert snap.exit_counts[3] == 10 and snap.breaches == 0 and snap.greedy_exits == 0


def test_full_depth_tokens_are_never_breaches(tiny_dirs):
    eng = make_engine(tiny_dirs["llama"], max_batch=4)
    eng.apply(ServingConfig(exit_layers=(1,), threshold=1.0))
    eng.generate(PROMPTS[:2], SamplingParams(max_new_tokens=5, ignore_eos=True))
    snap = eng.snapshot()
    assert snap.exit_counts[5] == 10 and snap.breaches == 0 and snap.greedy_exits == 0


@pytest.mark.parametrize("threshold", [0.0, 0.05, 0.07])
def test_row_positions_with_exits_never_exceed_the_run_without(tiny_dirs, threshold):
    """Packed windows: a layer runs each position at most once, so exits can only remove work."""
    def run(exits: bool) -> tuple[np.ndarray, int]:
        eng = make_engine(tiny_dirs["llama"], max_batch=4, pending_window=8)
        if exits:
            eng.apply(ServingConfig(exit_layers=(0, 1, 2), threshold=threshold))
        reqs = eng.generate(PROMPTS, SamplingParams(max_new_tokens=24, ignore_eos=True))
        return np.asarray(eng.snapshot().row_positions), sum(r.num_generated for r in reqs)

    with_exits, n1 = run(True)
    without, n2 = run(False)
    assert n1 == n2 == 4 * 24
    prompt_tokens = sum(len(p) for p in PROMPTS)
    assert (without == prompt_tokens + n2 - 4).all()  # every position once per layer, newest never fed
    assert (with_exits <= without).all(), (with_exits, without)
    assert with_exits[0] == without[0]  # layer 0 always runs every position
    if threshold == 0.0:  # every decode token leaves at layer 0: deeper layers run only forced tokens
        assert with_exits[1] < without[1]


@pytest.fixture(scope="module")
def window_dirs(tmp_path_factory):
    """Mistral (one window in the config) and Gemma2 (soft-capped attention logits), both windowed at 5."""
    from tiny_models import save_tiny

    root = tmp_path_factory.mktemp("windowed")
    return {fam: save_tiny(fam, root / fam) for fam in ("mistral", "gemma2")}


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_windowed_and_softcapped_families_match_generate_beyond_the_window(window_dirs, family):
    """Prompts and outputs far longer than the 5-token window: a dropped window or a dropped soft-cap
    changes the tokens (regression: Mistral's window was ignored, Gemma2 could not load)."""
    folder = window_dirs[family]
    eng = make_engine(folder, max_batch=3)
    assert eng.loop.windows[0] == 5
    ids = [eng.add_request(p, SamplingParams(max_new_tokens=16, ignore_eos=True)) for p in PROMPTS[:3]]
    eng.run_until_done()
    for rid, prompt in zip(ids, PROMPTS[:3]):
        assert eng.requests[rid].output_ids == hf_greedy(folder, prompt, 16), rid


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_windowed_families_keep_exact_kv_under_ragged_recompute(window_dirs, family):
    folder = window_dirs[family]
    eng, ids, exit_layers = _run_with_exits(folder, "recompute", {0: 0.07, 1: 0.06, 2: 0.05, 3: 0.05, 4: 0.04})
    hf = load_hf(folder)
    # Gemma2's soft-capped attention takes its softmax in float32 (as transformers' own eager path does),
    # so float64 runs agree to float32 rounding there
    tol = 1e-5 if family == "gemma2" else 1e-9
    for rid in ids:
        toks = eng.requests[rid].token_ids[:-1]
        with torch.no_grad():
            ref = hf(torch.tensor([toks]), use_cache=True).past_key_values
        for layer in range(6):
            kref = ref.layers[layer].keys[0]
            t = kref.shape[1]
            torch.testing.assert_close(eng.pool.k[layer][eng.requests[rid].slot][:, len(toks) - t:len(toks)], kref,
                                       rtol=tol, atol=tol)


def test_attention_sees_its_history(tiny_dirs):
    """If the decoder layers stopped receiving the cache (a renamed argument), decode would attend only
    to the new token: the second token would differ from a full forward pass over the whole prefix."""
    folder = tiny_dirs["llama"]
    eng = make_engine(folder, max_batch=1)
    (req,) = eng.generate([PROMPTS[2]], SamplingParams(max_new_tokens=6, ignore_eos=True))
    hf = _hf(folder)
    with torch.no_grad():
        for i in range(1, 6):
            prefix = PROMPTS[2] + req.output_ids[:i]
            assert int(hf(torch.tensor([prefix])).logits[0, -1].argmax()) == req.output_ids[i]


def test_step_records_its_prefill_pass_apart_from_its_decode_pass(tiny_dirs):
    """A step prefilling prompts beside decoding rows runs two passes; its record says how many rows each had,
    so the step-time fit can price the second pass (and chunked prompts that finish later)."""
    eng = make_engine(tiny_dirs["llama"], max_batch=4, max_prefill_tokens=10)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    eng.add_request(PROMPTS[0], params)
    eng.step()
    first = eng.telemetry.steps[-1]
    assert (first.prefill_rows, first.prefill_done, first.prefill_tokens, int(first.exit_counts.sum())) == (1, 1, 7, 1)
    eng.add_request(PROMPTS[1], params)  # 3 positions: prefilled beside the first row's decode
    eng.add_request(PROMPTS[2], params)  # 12 positions: over what is left of the budget, waits a step
    eng.step()
    mixed = eng.telemetry.steps[-1]
    assert (mixed.prefill_rows, mixed.prefill_done, mixed.prefill_tokens) == (1, 1, 3)
    assert int(mixed.exit_counts.sum()) == 2 == mixed.decode_tokens
    eng.step()  # the long prompt alone, chunked: 10 of its 12 positions, no token yet, beside two decode rows
    chunk = eng.telemetry.steps[-1]
    assert (chunk.prefill_rows, chunk.prefill_done, chunk.prefill_tokens) == (1, 0, 10)
    assert int(chunk.exit_counts.sum()) == 2
    eng.step()
    rest = eng.telemetry.steps[-1]
    assert (rest.prefill_rows, rest.prefill_done, rest.prefill_tokens) == (1, 1, 2)
    assert int(rest.exit_counts.sum()) == 3
    # the prefill pass is timed apart (the drift correction prices it by its own probe): within the step
    for rec in (first, mixed, chunk, rest):
        assert 0 < rec.prefill_wall_s <= rec.duration and rec.prefill_cpu_s > 0
    eng.step()
    decode_only = eng.telemetry.steps[-1]
    assert decode_only.prefill_tokens == 0 and decode_only.prefill_wall_s == decode_only.prefill_cpu_s == 0.0
