"""Tests for helios_rl.workload: arrivals, traces, prompts, specs, builds, real texts."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from helios_rl.workload import (
    Gamma,
    PiecewiseRate,
    Poisson,
    Prompt,
    PromptError,
    PromptPool,
    SpecError,
    TraceError,
    WorkloadSpec,
    build_workload,
    crop_to_tokens,
    crop_with_count,
    load_news,
    load_prompts_jsonl,
    load_requests,
    load_sharegpt,
    load_wiki,
    read_azure_trace,
    save_requests,
    whitespace_tokens,
)
from helios_rl.workload.texts import iter_json_array

REAL_TRACE = Path("/work/shared/traces/azure_llm_2023_conv.csv")
HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


# ----------------------------------------------------------------------------- arrivals


def test_poisson_mean_rate():
    t = Poisson(5.0).sample(0, duration_s=2000.0)
    assert np.all(np.diff(t) >= 0) and t[0] >= 0 and t[-1] < 2000.0
    assert abs(t.size / 2000.0 - 5.0) < 0.25  # sd of the rate estimate is 0.05
    gaps = np.diff(t)
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.05


@pytest.mark.parametrize("cv", [0.5, 3.0])
def test_gamma_cv_and_rate(cv):
    t = Gamma(4.0, cv).sample(1, count=40_000)
    assert t.size == 40_000
    gaps = np.diff(t)
    assert abs(gaps.std() / gaps.mean() - cv) < 0.08 * cv
    assert abs(1.0 / gaps.mean() - 4.0) < 0.25


def test_piecewise_rate_changes():
    proc = PiecewiseRate([(0, 1.0), (100, 10.0), (200, 0.0), (300, 2.0)])
    t = proc.sample(3, duration_s=400.0)
    counts = [np.sum((t >= a) & (t < a + 100)) for a in (0, 100, 200, 300)]
    assert 70 < counts[0] < 130 and 900 < counts[1] < 1100 and counts[2] == 0 and 150 < counts[3] < 250
    assert list(proc.rate_at([50, 150, 250, 350])) == [1.0, 10.0, 0.0, 2.0]


def test_piecewise_bursty_and_ending_rate():
    t = PiecewiseRate([(0, 5.0), (50, 0.0)], cv=2.0).sample(0, count=10_000)
    assert t.size < 10_000 and t[-1] < 50.0  # the rate ends, so fewer than asked


@pytest.mark.parametrize("bad", [[], [(1, 2.0)], [(0, 1.0), (0, 2.0)], [(0, -1.0)], [(0, 0.0)]])
def test_piecewise_rejects_bad_segments(bad):
    with pytest.raises(ValueError):
        PiecewiseRate(bad)


def test_arrival_seeds_reproducible_and_distinct():
    g = Gamma(3.0, 2.0)
    a, b, c = g.sample(7, count=100), g.sample(7, count=100), g.sample(8, count=100)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.array_equal(g.sample(np.random.default_rng(7), count=100), a)
    with pytest.raises(ValueError):
        g.sample(0)


# ----------------------------------------------------------------------------- traces


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_trace_synthetic_parse_window_scale(tmp_path):
    rows = [("2023-11-16 18:00:00.0000000", 10, 5), ("2023-11-16 18:00:02.5000001", 20, 6),
            ("2023-11-16 18:00:01.0000000", 30, 7), ("2023-11-16 18:00:10.0000000", 40, 8)]
    path = _write(tmp_path, "t.csv", HEADER + "".join(f"{a},{b},{c}\n" for a, b, c in rows) + "\n")
    tr = read_azure_trace(path)
    assert len(tr) == 4
    np.testing.assert_allclose(tr.arrival_s, [0.0, 1.0, 2.5000001, 10.0], atol=1e-9)
    assert list(tr.context_tokens) == [10, 30, 20, 40] and list(tr.generated_tokens) == [5, 7, 6, 8]
    seg = read_azure_trace(path, start_s=1.0, window_s=5.0, time_scale=0.5)
    np.testing.assert_allclose(seg.arrival_s, [0.0, 0.75], atol=1e-9)
    assert list(seg.context_tokens) == [30, 20]
    assert len(read_azure_trace(path, max_requests=2)) == 2


@pytest.mark.parametrize("row,line_col", [
    ("2023-11-16 18:00:01.0,abc,5", "'ContextTokens'"),
    ("2023-11-16 18:00:01.0,5", "'GeneratedTokens'"),
    ("2023-11-16 25:00:01.0,5,5", "'TIMESTAMP'"),
    ("yesterday,5,5", "'TIMESTAMP'"),
    ("2023-11-16 18:00:01.0,5,-3", "'GeneratedTokens'"),
])
def test_trace_malformed_row_names_file_line_column(tmp_path, row, line_col):
    path = _write(tmp_path, "bad.csv", HEADER + "2023-11-16 18:00:00.0000000,1,1\n" + row + "\n")
    with pytest.raises(TraceError) as err:
        read_azure_trace(path)
    msg = str(err.value)
    assert str(path) in msg and "line 3" in msg and line_col in msg
    assert isinstance(err.value, ValueError)


def test_trace_missing_header_column(tmp_path):
    path = _write(tmp_path, "h.csv", "TIMESTAMP,ContextTokens\n2023-11-16 18:00:00,1\n")
    with pytest.raises(TraceError, match=r"h\.csv: line 1: .*'GeneratedTokens'"):
        read_azure_trace(path)


@pytest.mark.skipif(not REAL_TRACE.exists(), reason="Azure trace sample not present")
def test_real_azure_trace():
    tr = read_azure_trace(REAL_TRACE, start_s=60.0, window_s=120.0)
    assert len(tr) > 100 and tr.arrival_s[0] >= 0 and tr.arrival_s[-1] < 120.0
    assert np.all(np.diff(tr.arrival_s) >= 0) and tr.context_tokens.min() >= 1


# ----------------------------------------------------------------------------- prompts


def _tiny_pool() -> PromptPool:
    """A synthetic pool with many docs per task so splits and sampling are exercised fast."""
    words = " ".join(f"w{i}." for i in range(400))
    prompts = []
    for i in range(60):
        prompts.append(Prompt(f"completion:d{i}", words, "completion", "news", reference="next", doc_id=f"d{i}"))
        head, tail = "Summarize:\n\n", "\n\nSummary?"
        prompts.append(Prompt(f"summarize:d{i}", head + words + tail, "summarize", "news", chat=True,
                              doc_id=f"d{i}", head_chars=len(head), tail_chars=len(tail)))
        prompts.append(Prompt(f"chat:c{i}", f"question {i} " + words[: 40 * (i + 1)], "chat", "sharegpt",
                              reference="answer", chat=True, doc_id=f"c{i}"))
    return PromptPool(prompts)


def test_crop_keeps_frame_and_side():
    pool = _tiny_pool()
    summ = pool.by_task("summarize")[0]
    cropped = crop_to_tokens(summ, 50, whitespace_tokens)
    assert whitespace_tokens(cropped.text) == 50
    assert cropped.text.startswith("Summarize:\n\nw0.") and cropped.text.endswith("\n\nSummary?")
    comp = crop_to_tokens(pool.by_task("completion")[0], 30, whitespace_tokens)
    assert comp.text.endswith("w399.") and whitespace_tokens(comp.text) == 30
    long_word = Prompt("x", "a" * 1000, "chat", "file")
    assert crop_to_tokens(long_word, 10, lambda s: len(s) // 10).text == "a" * 109


def test_crop_is_maximal_for_other_tokenizers():
    rng = np.random.default_rng(5)
    text = " ".join("x" * int(k) for k in rng.integers(1, 12, size=600))
    chars3 = lambda s: (len(s) + 2) // 3  # noqa: E731 - a non-additive stand-in tokenizer
    for task in ("chat", "completion"):
        p = Prompt("p", text, task, "file")
        for target in (1, 7, 50, 333, 1000):
            out, n = crop_with_count(p, target, chars3)
            assert n == chars3(out.text) <= target
            body = out.text
            assert (text.startswith(body) if task == "chat" else text.endswith(body))
            longer = text[: len(body) + 13].rsplit(" ", 1)[0] if task == "chat" else text[-len(body) - 13:].split(" ", 1)[1]
            assert len(longer) <= len(body) or chars3(longer) > target


def test_match_length():
    pool = _tiny_pool()
    rng = np.random.default_rng(0)
    for target in (5, 100, 399):
        p = pool.match_length(target, whitespace_tokens, task="completion", rng=rng)
        assert whitespace_tokens(p.text) == target
    p = pool.match_length(10_000, whitespace_tokens, task="chat", rng=rng)  # longer than any: longest
    assert whitespace_tokens(p.text) == max(whitespace_tokens(q.text) for q in pool.by_task("chat"))


def test_heldout_split_disjoint():
    pool = _tiny_pool()
    train, held = pool.split("train"), pool.split("heldout")
    assert len(train) + len(held) == len(pool) and len(held) > 0 and len(train) > len(held)
    assert not {p.id for p in train} & {p.id for p in held}
    assert not {p.split_key for p in train} & {p.split_key for p in held}  # no article in both


def test_jsonl_prompts_and_errors(tmp_path):
    good = _write(tmp_path, "p.jsonl", '{"prompt": "hello there", "task": "chat"}\n\n'
                  '{"prompt": "Once upon", "task": "completion", "id": "x"}\n')
    ps = load_prompts_jsonl(good)
    assert [p.task for p in ps] == ["chat", "completion"] and ps[0].chat and not ps[1].chat
    assert ps[1].id == "file:x"
    cases = {
        '{"prompt": "a"}\n{"prompt": 3}\n': "'prompt'",
        '{"prompt": "a"}\nnot json\n': "invalid JSON",
        '{"prompt": "a"}\n{"prompt": "b", "task": "poem"}\n': "'task'",
        '{"prompt": "a"}\n{"prompt": "b", "tsk": "chat"}\n': "tsk",
        '{"prompt": "a"}\n[1, 2]\n': "JSON object",
    }
    for i, (text, what) in enumerate(cases.items()):
        path = _write(tmp_path, f"bad{i}.jsonl", text)
        with pytest.raises(PromptError) as err:
            load_prompts_jsonl(path)
        assert f"{path}:2:" in str(err.value) and what in str(err.value)


# ----------------------------------------------------------------------------- specs and builds


def _spec(**kw) -> WorkloadSpec:
    base = {"arrival": {"kind": "poisson", "rate": 2.0}, "num_requests": 50, "max_new_tokens": [8, 32]}
    base.update(kw)
    return WorkloadSpec.from_dict(base)


@pytest.mark.parametrize("data,key", [
    ({"arrival": {"kind": "poisson", "rate": 1}, "num_requests": 5, "num_request": 5}, "num_request"),
    ({"arrival": {"kind": "poisson", "rat": 1}, "num_requests": 5}, "arrival.rat"),
    ({"arrival": {"kind": "poisson", "rate": 1, "cv": 2}, "num_requests": 5}, "arrival.cv"),
    ({"arrival": {"kind": "poisson", "rate": -1}, "num_requests": 5}, "arrival.rate"),
    ({"arrival": {"kind": "levy", "rate": 1}, "num_requests": 5}, "arrival.kind"),
    ({"arrival": {"kind": "poisson", "rate": 1}, "num_requests": 0}, "num_requests"),
    ({"arrival": {"kind": "poisson", "rate": 1}}, "num_requests"),
    ({"arrival": {"kind": "poisson", "rate": 1}, "num_requests": 5, "max_new_tokens": [9, 3]}, "max_new_tokens"),
    ({"arrival": {"kind": "poisson", "rate": 1}, "num_requests": 5, "split": "test"}, "split"),
    ({"arrival": {"kind": "poisson", "rate": 1}, "num_requests": 5, "tasks": {"chat": 1, "poem": 1}}, "tasks.poem"),
    ({"arrival": {"kind": "poisson", "rate": 1}, "num_requests": 5,
      "tasks": [{"t": 0, "mix": {"chat": 1}}, {"t": 10, "mix": {"chat": 1}, "x": 1}]}, "tasks[1].x"),
    ({"arrival": {"kind": "piecewise", "segments": [[0, 1], [5, -1]]}, "num_requests": 5}, "arrival.segments"),
    ({"arrival": {"kind": "poisson", "rate": 1}, "num_requests": 5, "prompts": {"source": ["news"]}},
     "prompts.source"),
])
def test_spec_rejects_naming_key(data, key):
    with pytest.raises(SpecError) as err:
        WorkloadSpec.from_dict(data)
    path = str(err.value).split(":")[0]
    assert path == key or path.startswith(key + "["), str(err.value)


def test_spec_roundtrip_and_yaml(tmp_path):
    spec = _spec(tasks=[{"t": 0, "mix": {"chat": 1}}, {"t": 30, "mix": {"completion": 2, "summarize": 2}}],
                 arrival={"kind": "piecewise", "segments": [{"t": 0, "rate": 1}, {"t": 9, "rate": 3}], "cv": 2},
                 split="heldout", seed=4, prompt_tokens=[10, 20])
    assert WorkloadSpec.from_dict(spec.to_dict()) == spec
    import yaml

    path = _write(tmp_path, "w.yaml", yaml.safe_dump(spec.to_dict()))
    assert WorkloadSpec.from_yaml(path) == spec
    bad = _write(tmp_path, "bad.yaml", "arrival: {kind: poisson, rate: 1}\nnum_requests: 3\nsed: 1\n")
    with pytest.raises(SpecError, match=r"bad\.yaml: sed: unknown key \(did you mean 'seed'\?\)"):
        WorkloadSpec.from_yaml(bad)


def test_build_reproducible_and_seed_sensitive():
    pool = _tiny_pool()
    a = build_workload(_spec(seed=1), pool=pool)
    assert a == build_workload(_spec(seed=1), pool=pool)
    b = build_workload(_spec(seed=2), pool=pool)
    assert [r.arrival_s for r in a] != [r.arrival_s for r in b]
    assert len(a) == 50 and all(8 <= r.max_new_tokens <= 32 for r in a)
    assert [r.arrival_s for r in a] == sorted(r.arrival_s for r in a)
    assert len({r.request_id for r in a}) == 50


def test_task_mix_shift_visible():
    spec = _spec(num_requests=None, duration_s=200.0, arrival={"kind": "poisson", "rate": 3.0},
                 tasks=[{"t": 0, "mix": {"chat": 1}}, {"t": 100, "mix": {"completion": 1, "summarize": 1}}])
    reqs = build_workload(spec, pool=_tiny_pool())
    early = {r.task for r in reqs if r.arrival_s < 100}
    late = [r.task for r in reqs if r.arrival_s >= 100]
    assert early == {"chat"} and set(late) == {"completion", "summarize"}
    assert all(r.chat for r in reqs if r.task == "chat") and not any(r.chat for r in reqs if r.task == "completion")
    frac = late.count("completion") / len(late)
    assert 0.35 < frac < 0.65


def test_prompt_tokens_targets_and_missing_task(tmp_path):
    reqs = build_workload(_spec(prompt_tokens=[20, 40]), pool=_tiny_pool())
    assert all(20 <= r.prompt_tokens <= 40 for r in reqs)
    only_chat = PromptPool(p for p in _tiny_pool() if p.task == "chat")
    with pytest.raises(SpecError, match="tasks.completion"):
        build_workload(_spec(), pool=only_chat)


def test_trace_replay_workload(tmp_path):
    rows = "".join(f"2023-11-16 18:00:{i:02d}.1234567,{20 + 10 * i},{5 + 100 * i}\n" for i in range(10))
    path = _write(tmp_path, "t.csv", HEADER + rows)
    spec = WorkloadSpec.from_dict({"arrival": {"kind": "trace", "path": str(path), "time_scale": 2.0},
                                   "max_new_tokens": 300, "tasks": {"completion": 1}})
    reqs = build_workload(spec, pool=_tiny_pool())
    assert [r.arrival_s for r in reqs] == pytest.approx([2.0 * i for i in range(10)])
    assert [r.prompt_tokens for r in reqs] == [20 + 10 * i for i in range(10)]
    assert [r.max_new_tokens for r in reqs] == [min(5 + 100 * i, 300) for i in range(10)]
    capped = WorkloadSpec.from_dict({**spec.to_dict(), "num_requests": 3, "max_prompt_tokens": 25})
    reqs = build_workload(capped, pool=_tiny_pool())
    assert [r.prompt_tokens for r in reqs] == [20, 25, 25]


def test_save_load_requests(tmp_path):
    reqs = build_workload(_spec(num_requests=5), pool=_tiny_pool())
    path = save_requests(tmp_path / "out" / "reqs.jsonl", reqs)
    assert load_requests(path) == reqs


# ----------------------------------------------------------------------------- real texts


def test_iter_json_array_truncated():
    text = '[{"a": 1}, {"b": [1, 2]}, {"c": "cut'
    assert list(iter_json_array(io.StringIO(text), chunk_chars=3)) == [{"a": 1}, {"b": [1, 2]}]
    assert list(iter_json_array(io.StringIO("[1, 22, 333]"), chunk_chars=1)) == [1, 22, 333]


def test_real_texts_load():
    news, wiki, chats = load_news(), load_wiki(), load_sharegpt()
    assert len(news) == 300 and all(d.text for d in news)
    assert 90 <= len(wiki) <= 110 and all(len(d.text.split()) >= 50 for d in wiki)
    assert not any("[[" in d.text or "{{" in d.text or "'''" in d.text for d in wiki)
    assert len(chats) > 10_000 and all(c.human for c in chats)
    assert len({c.id for c in chats}) == len(chats)


def test_real_pool_split_and_workload():
    pool = PromptPool.from_sources(seed=0)
    assert set(pool.tasks) == {"completion", "summarize", "chat"}
    train, held = pool.split("train"), pool.split("heldout")
    assert not {p.split_key for p in train} & {p.split_key for p in held}
    assert 0.1 < len(held) / len(pool) < 0.3
    spec = _spec(split="heldout", num_requests=30, prompt_tokens=[50, 200])
    reqs = build_workload(spec)
    held_ids = {p.id for p in held}
    assert all(r.prompt_id in held_ids for r in reqs)
    assert all(50 <= r.prompt_tokens <= 200 or r.task == "chat" for r in reqs)
    assert json.dumps([r.prompt_text for r in reqs])  # plain strings
