"""The live server: the official openai client over loopback, SSE, metrics, admin, overload, failures."""

from __future__ import annotations

import asyncio
import json
import shutil
import time

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from helios_rl.controllers import ControllerContext, MemorySettings
from helios_rl.controllers.repository import checkpoint_facts
from helios_rl.engine import EngineSettings, ServingConfig, TelemetrySnapshot
from helios_rl.models.layered import LayeredModel
from helios_rl.server import BackgroundServer, ControlPlane, ServerMetrics, ServerSettings, ShadowLog, build_runtime
from helios_rl.server import create_app
from helios_rl.server.runtime import feasibility, make_decision_maker

TEMPLATE = "{% for m in messages %}w9 w9 w9 {{ m['content'] }} {% endfor %}w10"


def tiny_context(dirs: dict, max_batch: int, max_len: int) -> ControllerContext:
    profiles = {}
    for name, folder in dirs.items():
        facts = checkpoint_facts(str(folder), 4)
        facts.name = name
        profiles[name] = facts.as_profile()
    return ControllerContext(tuple(dirs), profiles, MemorySettings(None, max_batch, max_len, 32, True))


def make_runtime(dirs: dict, controller="static", shadow=None, max_batch: int = 4, max_queue: int = 4,
                 max_len: int = 64, **settings):
    """A server runtime over the tiny text models (float32, no memory budget)."""
    def loader(name, depth):
        return LayeredModel(dirs[name], depth=depth, device="cpu", dtype=torch.float32, name=name)

    ctx = tiny_context(dirs, max_batch, max_len)
    s = ServerSettings(max_queue=max_queue, interval_s=0.05, served_name="tiny", torch_threads=1, **settings)
    return build_runtime(ctx, EngineSettings(max_batch=max_batch, max_model_len=max_len), loader, controller, shadow, s)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The engine thread uses one torch thread (a shared 2-core CPU); restore the session's count after."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def text_dirs(tiny_text_dirs, tmp_path_factory):
    """tiny-a with a chat template (a copy: the session fixture is shared), tiny-b without."""
    a = tmp_path_factory.mktemp("chat") / "tiny-a"
    shutil.copytree(tiny_text_dirs["tiny-a"], a)
    (a / "chat_template.jinja").write_text(TEMPLATE)
    return {"tiny-a": a, "tiny-b": tiny_text_dirs["tiny-b"]}


@pytest.fixture(scope="module")
def served(text_dirs, tmp_path_factory):
    log = tmp_path_factory.mktemp("shadow") / "shadow.jsonl"
    rt = make_runtime(text_dirs, shadow="random", shadow_log=str(log))
    with BackgroundServer(create_app(rt)) as url:
        yield url, rt, log


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def metrics(url: str) -> dict:
    out = {}
    for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def total(m: dict, name: str, **labels) -> float:
    return sum(v for lab, v in m.get(name, []) if all(lab.get(k) == x for k, x in labels.items()))


def test_openai_client_completion_chat_and_streaming_agree(served):
    url, rt, _ = served
    c = client(url)
    assert {m.id for m in c.models.list().data} == {"tiny", "tiny-a", "tiny-b"}
    done = c.completions.create(model="tiny", prompt="w5 w6 w7", max_tokens=6, extra_body={"ignore_eos": True})
    choice = done.choices[0]
    assert choice.finish_reason == "length" and choice.text.startswith("w")
    assert done.usage.completion_tokens == 6 and done.usage.prompt_tokens == 3 and done.usage.total_tokens == 9
    pieces = [ch.choices[0].text for ch in c.completions.create(model="tiny", prompt="w5 w6 w7", max_tokens=6,
                                                                 stream=True, extra_body={"ignore_eos": True})]
    assert "".join(pieces) == choice.text  # greedy: the stream says exactly what the plain response says
    chat = c.chat.completions.create(model="tiny-a", messages=[{"role": "user", "content": "w5 w6"}], max_tokens=4,
                                     extra_body={"ignore_eos": True})
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    assert chat.usage.prompt_tokens == 6  # rendered by the chat template: "w9 w9 w9 w5 w6 w10"
    chunks = list(c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "w5 w6"}],
                                            max_tokens=4, stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == chat.choices[0].message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 4 and chunks[-1].usage.prompt_tokens == 6


def test_sse_wire_format_ends_with_done(served):
    url, _, _ = served
    with httpx.stream("POST", f"{url}/v1/completions", json={"model": "tiny", "prompt": "w5", "max_tokens": 3,
                                                              "stream": True, "ignore_eos": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2][6:])
    assert last["object"] == "text_completion" and last["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("body, status, param", [
    ("{not json", 400, None),
    ({"model": "tiny", "prompt": "w5", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "w5", "max_tokens": 10**9}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "w5", "temperature": -1}, 400, "temperature"),
    ({"model": "tiny", "prompt": "w5", "n": 2}, 400, "n"),
    ({"model": "tiny", "prompt": ""}, 400, "prompt"),
    ({"model": "tiny", "prompt": [10**6]}, 400, "prompt"),
    ({"model": "tiny", "prompt": " ".join(["w5"] * 80)}, 400, "prompt"),
    ({"model": "gpt-4", "prompt": "w5"}, 404, "model"),
    ({"prompt": "w5"}, 400, "model"),
])
def test_bad_requests_are_4xx_naming_the_field(served, body, status, param):
    url, _, _ = served
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, str) else {"json": body}
    r = httpx.post(f"{url}/v1/completions", **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param
    if param:
        assert param in err["message"]


def test_chat_errors_name_the_field(served):
    url, _, _ = served
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.role"
    with pytest.raises(openai.NotFoundError) as exc:
        client(url).chat.completions.create(model="nope", messages=[{"role": "user", "content": "w5"}])
    assert exc.value.body["param"] == "model"


def test_metrics_expose_requests_latency_exits_and_control_state(served):
    url, _, _ = served
    client(url).completions.create(model="tiny", prompt="w5 w6", max_tokens=4, extra_body={"ignore_eos": True})
    time.sleep(0.15)  # a control interval: gauges are refreshed at ticks
    m = metrics(url)
    assert total(m, "helios_requests_total", endpoint="/v1/completions", status="200") >= 1
    assert total(m, "helios_time_to_first_token_seconds_count") >= 1
    assert total(m, "helios_e2e_request_latency_seconds_count") >= 1
    assert total(m, "helios_generation_tokens_total") >= 4
    assert total(m, "helios_exit_layer_tokens_total") == total(m, "helios_generation_tokens_total")
    st = httpx.get(f"{url}/admin/config").json()
    active = st["config"]["model"]
    assert total(m, "helios_active_model", model=active) == 1.0
    assert total(m, "helios_loaded_depth") == st["config"]["depth"]
    assert total(m, "helios_controller_decisions_total", source="shadow", result="logged") >= 1
    for name in ("helios_num_requests_running", "helios_num_requests_waiting", "helios_confidence_breaches_total",
                 "helios_model_switches_total", "helios_layer_loads_total", "helios_memory_resident_bytes",
                 "helios_memory_budget_used_ratio", "helios_controller_decision_seconds_count"):
        assert name in m, name


def test_shadow_decisions_are_logged_not_applied(served):
    url, rt, log = served
    time.sleep(0.2)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert records and all(r["shadow"] == "random" for r in records)
    assert any(r["decision"] is not None for r in records)  # random's first decision is a full config
    assert httpx.get(f"{url}/admin/config").json()["controller"] == "static"


def test_admin_override_switches_model_and_depth_without_losing_requests(served):
    url, rt, _ = served

    async def go():
        async with httpx.AsyncClient(base_url=url, timeout=60) as h:
            reqs = [h.post("/v1/completions", json={"model": "tiny", "prompt": f"w{5 + i} w7", "max_tokens": 40,
                                                    "ignore_eos": True, "stream": i % 2 == 0}) for i in range(6)]
            tasks = [asyncio.create_task(r) for r in reqs]
            await asyncio.sleep(0.05)
            switched = await h.post("/admin/config", json={"model": "tiny-b", "depth": 2, "pin": True})
            deeper = await h.post("/admin/config", json={"depth": 4})
            back = await h.post("/admin/config", json={"model": "tiny-a", "pin": False})
            return switched, deeper, back, await asyncio.gather(*tasks)

    switched, deeper, back, results = asyncio.run(go())
    assert switched.status_code == 200 and switched.json()["config"]["model"] == "tiny-b"
    assert switched.json()["config"]["depth"] == 2 and switched.json()["pinned"] is True
    assert deeper.json()["config"]["depth"] == 4 and back.json()["config"]["model"] == "tiny-a"
    assert back.json()["pinned"] is False
    for r in results:
        assert r.status_code == 200
        if r.headers["content-type"].startswith("application/json"):
            assert r.json()["usage"]["completion_tokens"] == 40
        else:
            assert r.text.rstrip().endswith("data: [DONE]") and '"finish_reason": "length"' in r.text
    assert total(metrics(url), "helios_model_switches_total") >= 2


@pytest.mark.parametrize("body, param", [({"depth": 99}, "depth"), ({"model": "gpt-4"}, "model"),
                                         ({"depth": "2"}, "depth"), ({"exit_layers": [42]}, "exit_layers"),
                                         ({"threshold": 1.5}, "threshold"), ({"colour": "red"}, "colour")])
def test_admin_override_validation_names_the_field(served, body, param):
    url, _, _ = served
    before = httpx.get(f"{url}/admin/config").json()["config"]
    r = httpx.post(f"{url}/admin/config", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert httpx.get(f"{url}/admin/config").json()["config"] == before


def test_overload_gets_429_with_retry_after_and_accepted_requests_complete(served):
    url, rt, _ = served

    async def go():
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=64)) as h:
            return await asyncio.gather(*[h.post("/v1/completions", json={
                "model": "tiny", "prompt": "w5 w6", "max_tokens": 30, "ignore_eos": True}) for _ in range(24)])

    results = asyncio.run(go())
    ok = [r for r in results if r.status_code == 200]
    busy = [r for r in results if r.status_code == 429]
    assert len(ok) + len(busy) == 24 and busy and len(ok) >= 8  # limit: batch cap 4 + queue 4
    assert all(int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] == "rate_limit_exceeded" for r in busy)
    assert all(r.json()["usage"]["completion_tokens"] == 30 for r in ok)
    assert rt.loop.outstanding == 0


def test_client_that_disconnects_mid_stream_frees_its_place(served):
    url, rt, _ = served
    before = total(metrics(url), "helios_request_success_total", finished_reason="abort")
    with httpx.stream("POST", f"{url}/v1/completions", json={"model": "tiny", "prompt": "w5", "max_tokens": 60,
                                                              "ignore_eos": True, "stream": True}) as r:
        next(r.iter_lines())
    deadline = time.monotonic() + 10
    while rt.loop.outstanding and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rt.loop.outstanding == 0
    assert total(metrics(url), "helios_request_success_total", finished_reason="abort") == before + 1


def test_streaming_holds_back_a_possible_stop_string_and_broken_characters():
    from helios_rl.server.engine_loop import _hold_back

    assert _hold_back("w5 w6 w", ("w7 w8",)) == 1 and _hold_back("w5 w6 w7 ", ("w7 w8",)) == 3
    assert _hold_back("w5 w6", ("w7",)) == 0 and _hold_back("ab\ufffd", ()) == 1


# ----------------------------------------------------------------------------- control plane
class Scripted:
    """A controller that misbehaves on demand: ok | raise | sleep | infeasible."""

    def __init__(self, name: str, mode: str = "ok", depth: int = 3) -> None:
        self.name, self.mode, self.depth, self.calls = name, mode, depth, 0

    def reset(self, seed=None) -> None:
        self.calls = 0

    def decide(self, telemetry: TelemetrySnapshot) -> ServingConfig | None:
        self.calls += 1
        if self.mode == "raise" and self.calls > 1:
            raise RuntimeError("policy exploded")
        if self.mode == "sleep" and self.calls > 1:
            time.sleep(0.5)
        if self.mode == "infeasible" and self.calls > 1:
            return ServingConfig(model="tiny-a", depth=99)
        return ServingConfig(model="tiny-a", depth=self.depth)


@pytest.mark.parametrize("mode, reason", [("raise", "error"), ("sleep", "timeout"), ("infeasible", "infeasible")])
def test_failing_policy_is_replaced_by_the_fallback_and_counted(text_dirs, mode, reason, tmp_path):
    ctx = tiny_context(text_dirs, 4, 64)
    m = ServerMetrics()
    log = ShadowLog(tmp_path / "s.jsonl")
    plane = ControlPlane(Scripted("bad", mode), Scripted("fb", depth=5), feasibility(ctx, lambda: None), m,
                         deadline_s=0.05, shadow=Scripted("sh", depth=2), shadow_log=log)
    assert plane.initial().config.depth == 3
    d = plane.decide(TelemetrySnapshot(time=1.0))
    assert d.source == "fallback" and d.controller == "fb" and d.config.depth == 5 and d.reason.startswith(reason)
    if mode == "sleep":  # still stuck in the last call: the next decision is the fallback's at once
        t0 = time.perf_counter()
        assert plane.decide(TelemetrySnapshot(time=2.0)).reason.startswith("busy")
        assert time.perf_counter() - t0 < 0.3
    assert m.fallbacks.labels(reason)._value.get() == 1
    plane.stop()
    lines = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [r["decision"]["depth"] for r in lines][:2] == [2, 2] and lines[1]["applied"]["depth"] == 5


def test_runtime_keeps_serving_when_its_policy_breaks(text_dirs):
    rt = make_runtime(text_dirs, controller=Scripted("bad", "raise"), max_queue=8)
    with BackgroundServer(create_app(rt)) as url:
        out = client(url).completions.create(model="tiny", prompt="w5", max_tokens=20, extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 20
        time.sleep(0.2)
        stats = httpx.get(f"{url}/admin/controller").json()
        assert stats["fallbacks"].get("error", 0) >= 1 and stats["fallback"] == "helios"  # policy -> HELIOS fallback
        assert total(metrics(url), "helios_controller_fallbacks_total", reason="error") >= 1


def test_unknown_controllers_and_missing_policy_runs_are_clear_errors(text_dirs, tmp_path):
    ctx = tiny_context(text_dirs, 4, 64)
    with pytest.raises(FileNotFoundError, match="no such run directory"):
        make_decision_maker("policy:runs/abc", ctx)
    with pytest.raises(ValueError, match="needs a run directory"):
        make_decision_maker("policy:", ctx)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="spaces.json: missing"):
        make_decision_maker(f"policy:{tmp_path}", ctx)
    with pytest.raises(ValueError, match="unknown controller"):
        make_decision_maker("clever", ctx)


def test_admin_token_guards_admin_endpoints(text_dirs):
    rt = make_runtime(text_dirs, admin_token="s3cret")
    with BackgroundServer(create_app(rt)) as url:
        assert httpx.get(f"{url}/admin/config").status_code == 401
        ok = httpx.get(f"{url}/admin/config", headers={"authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and httpx.get(f"{url}/health").json()["status"] == "ok"


def test_serve_cli_needs_a_scenario_or_a_model(capsys):
    from helios_rl.cli import main

    assert main(["serve"]) == 2
    assert "SCENARIO" in capsys.readouterr().err


def test_sampled_scoring_measures_served_agreement_off_the_request_path(text_dirs, monkeypatch):
    """Every finished request sampled (share 1.0): full depth without exits agrees exactly with itself."""
    from helios_rl.evaluation.accuracy import AccuracyScorer

    tf_calls = []
    monkeypatch.setattr(AccuracyScorer, "teacher_forced", lambda self, *a: tf_calls.append(a) or (0, 0.0))
    rt = make_runtime(text_dirs, score_sample=1.0, score_reference="tiny-a")
    try:
        with BackgroundServer(create_app(rt)) as url:
            c = client(url)
            for i in range(3):
                c.completions.create(model="tiny-a", prompt=f"w{5 + i} w6 w7", max_tokens=5,
                                     extra_body={"ignore_eos": True})
            rt.loop.scorer.drain()
            m = metrics(url)
        assert total(m, "helios_scored_requests_total") == 3
        assert total(m, "helios_served_agreement", model="tiny-a") == 1.0
        assert total(m, "helios_scorer_cpu_seconds_total") > 0
        assert rt.loop.scorer.scorer.tokens == 15
        # it measures what it exports: the reference perplexity of the served text, not the teacher-forced pass
        assert rt.loop.scorer.scorer.measures == ["agreement", "reference_ppl"]
        assert total(m, "helios_served_reference_ppl", model="tiny-a") > 1.0
        assert tf_calls == []
    finally:
        rt.loop.stop()


def _stream_id(url: str, body: dict) -> tuple[httpx.Client, httpx.Response]:
    c = httpx.Client(timeout=60)
    resp = c.send(c.build_request("POST", f"{url}/v1/completions", json={**body, "stream": True}), stream=True)
    return c, resp


def test_cancel_through_the_api_frees_the_slot_and_ends_the_stream(text_dirs):
    rt = make_runtime(text_dirs, max_batch=2, max_len=128)
    with BackgroundServer(create_app(rt)) as url:
        c, resp = _stream_id(url, {"model": "tiny-a", "prompt": "w5 w6", "max_tokens": 100, "ignore_eos": True})
        rid = resp.headers["x-request-id"]
        lines = resp.iter_lines()
        next(lines)
        r = httpx.post(f"{url}/v1/requests/{rid}/cancel")
        assert r.status_code == 200 and r.json() == {"id": rid, "cancelled": True}
        rest = [ln for ln in lines if ln.startswith("data: {")]
        assert json.loads(rest[-1][6:])["choices"][0]["finish_reason"] == "cancelled"
        resp.close()
        c.close()
        assert httpx.post(f"{url}/v1/requests/{rid}/cancel").status_code == 404
        deadline = time.time() + 10
        while rt.loop.outstanding and time.time() < deadline:
            time.sleep(0.02)
        assert rt.loop.outstanding == 0
        assert total(metrics(url), "helios_requests_cancelled_total") == 1


def test_connections_beyond_the_bound_get_503_and_a_slow_reader_stalls_no_one(text_dirs):
    rt = make_runtime(text_dirs, max_batch=4, max_len=128, max_connections=2)
    with BackgroundServer(create_app(rt)) as url:
        # a streaming client that never reads: its events queue up on its side, the engine does not wait
        c, slow = _stream_id(url, {"model": "tiny-a", "prompt": "w5 w6", "max_tokens": 60, "ignore_eos": True})
        t0 = time.time()
        done = httpx.post(f"{url}/v1/completions", json={"model": "tiny-a", "prompt": "w7 w8", "max_tokens": 8,
                                                          "ignore_eos": True}, timeout=60)
        assert done.status_code == 200 and time.time() - t0 < 20
        c2, second = _stream_id(url, {"model": "tiny-a", "prompt": "w9", "max_tokens": 60, "ignore_eos": True})
        third = httpx.post(f"{url}/v1/completions", json={"model": "tiny-a", "prompt": "w7", "max_tokens": 2})
        assert third.status_code == 503 and third.headers["retry-after"] == "1"
        assert "too many open connections" in third.json()["error"]["message"]
        for c_, r_ in ((c, slow), (c2, second)):
            r_.close()
            c_.close()
        assert total(metrics(url), "helios_connections_refused_total") == 1


def test_health_tells_the_truth_through_a_failure_and_a_recovery(text_dirs):
    rt = make_runtime(text_dirs, fault_injection=True)
    with BackgroundServer(create_app(rt)) as url:
        assert httpx.get(f"{url}/health").status_code == 200
        for model, times in (("tiny-b", 1), ("tiny-a", 3)):  # the switch fails, and so do reloads of tiny-a
            assert httpx.post(f"{url}/admin/faults", json={"fault": "load", "model": model, "kind": "oom",
                                                           "times": times}).status_code == 200
        r = httpx.post(f"{url}/admin/config", json={"model": "tiny-b"})
        assert r.status_code >= 400
        h = httpx.get(f"{url}/health")
        assert h.status_code == 503 and "out of memory" in h.json()["reason"]
        refused = httpx.post(f"{url}/v1/completions", json={"model": "tiny-a", "prompt": "w5", "max_tokens": 2})
        assert refused.status_code == 503 and "engine unavailable" in refused.json()["error"]["message"]
        deadline = time.time() + 30  # recovery retries with back-off; the third failure was the last
        while httpx.get(f"{url}/health").status_code != 200 and time.time() < deadline:
            time.sleep(0.1)
        assert httpx.get(f"{url}/health").status_code == 200
        ok = httpx.post(f"{url}/v1/completions", json={"model": "tiny-a", "prompt": "w5", "max_tokens": 2,
                                                        "ignore_eos": True}, timeout=60)
        assert ok.status_code == 200


def test_a_failed_switch_keeps_serving_and_the_controller_hears_why(text_dirs):
    rt = make_runtime(text_dirs, fault_injection=True)
    with BackgroundServer(create_app(rt)) as url:
        httpx.post(f"{url}/admin/faults", json={"fault": "load", "model": "tiny-b", "kind": "truncated"})
        c = client(url)
        r = httpx.post(f"{url}/admin/config", json={"model": "tiny-b"})
        assert r.status_code >= 400 and "injected" in r.text
        assert httpx.get(f"{url}/health").status_code == 200
        done = c.completions.create(model="tiny-a", prompt="w5 w6", max_tokens=4, extra_body={"ignore_eos": True})
        assert done.usage.completion_tokens == 4
        assert rt.loop.state.model == "tiny-a"


def test_a_scenario_with_relative_slos_is_served_against_them_in_seconds(tiny_scenario, tiny_profile, tmp_path,
                                                                          monkeypatch):
    """``helios-rl serve SCENARIO`` resolves ``x_step`` SLOs from the scenario's calibrated profile before any
    controller sees them (unresolved they are NaN: no batch would meet them)."""
    import helios_rl.env.profile as profile_mod
    from helios_rl.controllers import ControllerContext
    from helios_rl.env.profile import SimProfile
    from helios_rl.scenario import Scenario, step_reference_model
    from helios_rl.server.runtime import runtime_from_scenario

    text = tiny_scenario.read_text()
    old = "slo: {ttft_s: 0.05, tpot_s: 0.01, objective: throughput}"
    assert old in text
    path = tmp_path / "rel.yaml"
    path.write_text(text.replace(old, "slo: {ttft_s: 0.05, tpot_s: {x_step: 3, batch: 4}, objective: throughput}"))
    monkeypatch.setattr(profile_mod, "ensure_profile", lambda sc, say=None, **kw: tiny_profile)
    seen = []

    def capture(cls, sc, profiles):
        seen.append(sc.slo)
        raise RuntimeError("captured")

    monkeypatch.setattr(ControllerContext, "for_scenario", classmethod(capture))
    said = []
    with pytest.raises(RuntimeError, match="captured"):
        runtime_from_scenario(str(path), controller="static", profiles="facts", say=said.append)
    model = step_reference_model(Scenario.from_yaml(path))
    assert seen[0].tpot_s == pytest.approx(3 * SimProfile.load(tiny_profile).models[model].step_time(4))
    assert any("SLO resolved on this machine" in m for m in said)
