"""Evaluation harness end to end on tiny models (modeled timing: deterministic and fast)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helios_rl.cli import main
from helios_rl.evaluation import evaluate
from helios_rl.evaluation.harness import Evaluation
from helios_rl.scenario import Scenario

SCENARIO = """\
name: tiny
seed: 0
models: [{a}, {b}]
workload:
  arrival: {{kind: poisson, rate: {rate}}}
  num_requests: 10
  tasks: {{completion: 0.5, chat: 0.5}}
  max_new_tokens: 6
  max_prompt_tokens: 16
  split: all
  prompts: {{sources: [], file: {prompts}}}
slo: {{ttft_s: 1.0, tpot_s: 0.05}}
engine: {{memory_budget: 3MiB, max_batch: 8, max_model_len: 48, max_prefill_tokens: 64}}
exits: {{layers: {layers}, threshold: 0.06}}
repository: {{dir: {repo}, prompts: 3, new_tokens: 6, batches: [1, 4]}}
backend: {{timing: modeled, interval_s: 0.005}}
controllers:
  helios: {{profile_requests: 2, profile_batch: requests, reprofile_interval: 5}}
  best-static: {{max_points: 3, search_requests: 4}}
  random: {{change_prob: 0.3}}
evaluation: {{controllers: [static, helios, random, best-static]}}
"""


@pytest.fixture
def scenario_path(tmp_path, tiny_text_dirs):
    prompts = tmp_path / "prompts.jsonl"
    with prompts.open("w") as fh:
        for i in range(12):
            words = " ".join(f"w{3 + (7 * i + 5 * j) % 150}" for j in range(4 + i % 6))
            fh.write(json.dumps({"prompt": words, "task": ("completion", "chat")[i % 2], "id": f"p{i}"}) + "\n")

    def make(rate: float = 400.0, layers: str = "[0, 1, 2]") -> Path:
        path = tmp_path / f"tiny-{rate}-{len(layers)}.yaml"
        path.write_text(SCENARIO.format(a=tiny_text_dirs["tiny-a"], b=tiny_text_dirs["tiny-b"], rate=rate,
                                        prompts=prompts, repo=tmp_path / "repo", layers=layers))
        return path
    return make


def test_evaluate_end_to_end_writes_results_and_is_reproducible(tmp_path, scenario_path):
    path = scenario_path()
    r1 = evaluate(Scenario.from_yaml(path), tmp_path / "run1")
    out = tmp_path / "run1"
    data = json.loads((out / "results.json").read_text())
    for key in ("helios_vs_static_throughput", "helios_vs_static_max_batch", "helios_agreement", "static_agreement"):
        assert key in data["summary"]
    for name in ("static", "helios", "random", "best-static"):
        m = data["controllers"][name]
        for key in ("tokens_per_s", "requests_per_s", "goodput_rps", "ttft_p50", "ttft_p95", "ttft_p99", "tpot_p50",
                    "tpot_p99", "batch_mean", "batch_max", "resident_mean_bytes", "energy_j", "agreement", "teacher_forced_agreement",
                    "reference_ppl", "switches", "loads"):
            assert key in m, (name, key)
        assert m["reference_ppl"] > 1.0
        assert m["served"] == 10
    # goodput divides by the workload's SLO window, the same for every controller (not by each one's makespan)
    ms = data["controllers"]
    assert len({m["slo_window_s"] for m in ms.values()}) == 1
    for m in ms.values():
        good = round(m["slo_attainment"] * m["served"])
        assert m["goodput_rps"] == pytest.approx(good / m["slo_window_s"])
        assert m["goodput_rps_makespan"] == pytest.approx(good / m["makespan_s"])
    assert (out / "results.md").read_text().startswith("# Evaluation: tiny")
    for png in ("throughput.png", "latency_cdf.png", "exit_layers.png", "config_timeline.png"):
        assert (out / png).stat().st_size > 1000
    assert data["best_static_grid"] and data["energy_method"].startswith("estimate")
    # HELIOS profiled both candidates on live requests (a switch), then served
    events = [e["event"] for e in data["decisions"]["helios"]]
    assert events[:3] == ["shortlist", "profile", "profiled"] and "serve" in events
    assert data["controllers"]["helios"]["switches"] >= 1
    # same seed: same workload, same decisions, same served tokens
    r2 = evaluate(Scenario.from_yaml(path), tmp_path / "run2", plots=False)
    assert (out / "workload.jsonl").read_text() == (tmp_path / "run2" / "workload.jsonl").read_text()
    assert r1["decisions"] == r2["decisions"]
    for name in r1["controllers"]:
        for key in ("tokens_per_s", "agreement", "ttft_p95", "batch_max"):
            assert r1["controllers"][name][key] == r2["controllers"][name][key], (name, key)


def test_full_depth_without_exits_agrees_exactly_and_idle_clock_jumps(tmp_path, scenario_path):
    """Scorer and engine agree (agreement 1.0 at full depth, no exits); sparse arrivals do not queue."""
    sc = Scenario.from_yaml(scenario_path(rate=0.5, layers="[]"))
    ev = Evaluation(sc, ["static"])
    res = ev.run()
    m = res["controllers"]["static"]
    assert m["agreement"] == 1.0 and m["teacher_forced_agreement"] == 1.0 and m["scored_tokens"] == 60
    run = ev.runs[0]["static"]
    assert run.virtual_s >= max(r.arrival for r in run.requests)  # the clock jumped to each arrival
    assert m["ttft_p99"] < 0.1  # ... and nothing waited behind a busy engine
    prof = ev.profiles[sc.models[0]]
    assert prof.agreement == {6: 1.0} and abs(sum(prof.exit_share) - 1.0) < 1e-9


def test_repository_is_cached_and_predicts_exits(tmp_path, scenario_path):
    sc = Scenario.from_yaml(scenario_path())
    ev = Evaluation(sc, ["static"])
    ev.prepare()
    prof = ev.profiles[sc.models[0]]
    assert prof.exit_layers == [0, 1, 2] and prof.depth_options() == [1, 2, 3, 6]
    assert prof.agreement[6] <= 1.0 and set(prof.agreement) == {1, 2, 3, 6}
    assert abs(sum(prof.exit_share) - 1.0) < 1e-9
    files = sorted(Path(sc.repository.dir).glob("*.json"))
    assert len(files) == 2
    mtimes = [f.stat().st_mtime_ns for f in files]
    Evaluation(sc, ["static"]).prepare()
    assert [f.stat().st_mtime_ns for f in files] == mtimes  # reused, not re-measured


def test_cli_reports_bad_scenario_and_bad_trace(tmp_path, scenario_path, capsys):
    path = scenario_path()
    bad = tmp_path / "bad.yaml"
    bad.write_text(path.read_text().replace("max_batch: 8", "max_bach: 8"))
    assert main(["evaluate", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:13: engine.max_bach: unknown key (did you mean 'max_batch'?)" in err
    trace = tmp_path / "trace.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,10,5\n"
                     "2023-11-16 18:15:47.01,ten,5\n")
    assert main(["evaluate", str(path), "--trace", str(trace), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{trace}: line 3: column 'ContextTokens'" in err


def test_evaluate_with_measured_cpu_timing_serves_everything(tmp_path, scenario_path):
    """The harness under ``timing: cpu`` (each step charged the process CPU time it measured)."""
    path = scenario_path()
    path.write_text(path.read_text().replace("timing: modeled", "timing: cpu").replace(
        "controllers: [static, helios, random, best-static]", "controllers: [static, helios]"))
    sc = Scenario.from_yaml(path)
    assert sc.backend.timing == "cpu"
    res = evaluate(sc, tmp_path / "cpu")
    for name in ("static", "helios"):
        m = res["controllers"][name]
        assert m["served"] == 10 and m["tokens_per_s"] > 0 and 0.0 <= m["agreement"] <= 1.0
    assert res["timing"] == "cpu"
