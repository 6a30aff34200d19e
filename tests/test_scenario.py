"""Scenario YAML: strict validation with file, line and key in every error."""

from __future__ import annotations

from pathlib import Path

import pytest

from helios_rl.controllers import checkpoint_facts
from helios_rl.controllers.params import HeliosParams
from helios_rl.scenario import Scenario, ScenarioError, parse_bytes

ROOT = Path(__file__).resolve().parent.parent

BASE = """\
name: t
models: [{a}, {b}]
workload:
  arrival: {{kind: poisson, rate: 5}}
  num_requests: 4
  max_new_tokens: 4
  max_prompt_tokens: 16
engine:
  memory_budget: {budget}
  max_model_len: 64
controllers:
  helios: {{coverage: 0.8}}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return path


def base(tiny_text_dirs, budget="8MiB") -> str:
    return BASE.format(a=tiny_text_dirs["tiny-a"], b=tiny_text_dirs["tiny-b"], budget=budget)


def facts(s: Scenario):
    return {m: checkpoint_facts(m) for m in s.models}


def test_shipped_scenarios_load_and_fit_the_bundled_models():
    for name in ("helios-paper.yaml", "shifting.yaml"):
        s = Scenario.from_yaml(ROOT / "envs" / name)
        assert s.models == ("smollm2-135m", "gemma3-270m")
        assert s.engine.memory_budget_bytes == 1 << 30
    paper = Scenario.from_yaml(ROOT / "envs" / "helios-paper.yaml")
    assert {"static", "helios"} <= set(paper.evaluation.controllers)
    assert isinstance(paper.params("helios"), HeliosParams)
    shifting = Scenario.from_yaml(ROOT / "envs" / "shifting.yaml")
    assert len(shifting.workload.tasks.times) > 1 and shifting.workload.arrival.kind == "piecewise"


def test_valid_scenario_and_defaults(tmp_path, tiny_text_dirs):
    s = Scenario.from_yaml(write(tmp_path, base(tiny_text_dirs)))
    assert s.engine.memory_budget_bytes == 8 << 20
    assert s.params("helios").coverage == 0.8 and s.params("helios").breach_window == 100
    assert s.backend.kind == "live" and s.backend.clock == "virtual"
    s.check_models(facts(s))
    assert s.with_seed(2).workload.seed == s.workload.seed + 2


@pytest.mark.parametrize("edit,line,key,msg", [
    ("engine:\n  memory_budget: 8MiB\n  max_modle_len: 64\n", 10, "engine.max_modle_len", "did you mean 'max_model_len'"),
    ("controllers:\n  helios: {coverag: 0.8}\n", 12, "controllers.helios.coverag", "did you mean 'coverage'"),
    ("controllers:\n  helios: {coverage: 1.5}\n", 12, "controllers.helios.coverage", "must be <= 1"),
    ("controllers:\n  hel1os: {}\n", 12, "controllers.hel1os", "unknown controller"),
    ("  arrival: {kind: poisson, rate: -1}\n", 4, "workload.arrival.rate", "must be > 0"),
    ("engine:\n  memory_budget: lots\n  max_model_len: 64\n", 9, "engine.memory_budget", "size like '1GiB'"),
    ("engine:\n  memory_budget: 8MiB\n  max_model_len: 16\n", 10, "engine.max_model_len", "cannot hold a prompt"),
    ("bogus: 1\n", 13, "bogus", "unknown key"),
    ("slo: {objective: speed}\n", 13, "slo.objective", "must be one of"),
    ("evaluation: {controllers: [static, nope]}\n", 13, "evaluation.controllers[1]", "must be one of"),
    ("controllers:\n  static: {model: other}\n", 12, "controllers.static.model", "not one of the scenario's models"),
])
def test_errors_name_file_line_and_key(tmp_path, tiny_text_dirs, edit, line, key, msg):
    text = base(tiny_text_dirs)
    if edit.startswith("engine:"):
        text = text.replace("engine:\n  memory_budget: 8MiB\n  max_model_len: 64\n", edit)
    elif edit.startswith("controllers:"):
        text = text.replace("controllers:\n  helios: {coverage: 0.8}\n", edit)
    elif edit.startswith("  arrival"):
        text = text.replace("  arrival: {kind: poisson, rate: 5}\n", edit)
    else:
        text += edit
    path = write(tmp_path, text)
    with pytest.raises(ScenarioError) as err:
        Scenario.from_yaml(path)
    assert str(err.value).startswith(f"{path}:{line}: {key}: "), str(err.value)
    assert msg in str(err.value)


def test_duplicate_keys_are_errors(tmp_path, tiny_text_dirs):
    path = write(tmp_path, base(tiny_text_dirs) + "seed: 1\nseed: 2\n")
    with pytest.raises(ScenarioError, match=r"s\.yaml:14: seed: duplicate key"):
        Scenario.from_yaml(path)


def test_depth_beyond_a_model(tmp_path, tiny_text_dirs):
    text = base(tiny_text_dirs).replace("  helios: {coverage: 0.8}\n", "  static: {depth: 7}\n")
    path = write(tmp_path, text)
    s = Scenario.from_yaml(path)
    with pytest.raises(ScenarioError, match=rf"{path}:12: controllers\.static\.depth: 7 is beyond .*6 layers"):
        s.check_models(facts(s))
    text = base(tiny_text_dirs) + "exits: {layers: [1, 4]}\n"
    with pytest.raises(ScenarioError, match=r"exits\.layers: a precision target names its own exit layers"):
        Scenario.from_yaml(write(tmp_path, text))
    text = base(tiny_text_dirs) + "exits: {layers: [1, 4], threshold: 0.5}\n"
    s = Scenario.from_yaml(write(tmp_path, text))
    with pytest.raises(ScenarioError, match=r":13: exits\.layers\[1\]: layer 4 is not an exit layer of .*tiny-b"):
        s.check_models(facts(s))


def test_budget_below_one_layer(tmp_path, tiny_text_dirs):
    path = write(tmp_path, base(tiny_text_dirs, budget=20000))
    s = Scenario.from_yaml(path)
    with pytest.raises(ScenarioError, match=rf"{path}:9: engine\.memory_budget: 20000 bytes cannot hold any candidate even at depth 1"):
        s.check_models(facts(s))


def test_parse_bytes():
    assert parse_bytes("1GiB") == 1 << 30
    assert parse_bytes("900 MB") == 900_000_000
    assert parse_bytes(12345) == 12345


def test_with_trace_replaces_arrivals(tmp_path, tiny_text_dirs):
    s = Scenario.from_yaml(write(tmp_path, base(tiny_text_dirs))).with_trace("/x/trace.csv")
    assert s.workload.arrival.kind == "trace" and s.workload.arrival.path == "/x/trace.csv"


def test_exit_layers_per_model(tmp_path, tiny_text_dirs):
    a, b = tiny_text_dirs["tiny-a"], tiny_text_dirs["tiny-b"]
    s = Scenario.from_yaml(write(tmp_path, base(tiny_text_dirs) + f"exits:\n  threshold: 0.5\n  layers: {{{a}: [1, 4], {b}: auto}}\n"))
    assert s.exits.layers_for(str(a)) == (1, 4) and s.exits.layers_for(str(b)) == "auto"
    s.check_models(facts(s))
    s = Scenario.from_yaml(write(tmp_path, base(tiny_text_dirs) + f"exits:\n  threshold: 0.5\n  layers: {{{b}: [3]}}\n"))
    with pytest.raises(ScenarioError, match=r":15: exits\.layers\..*tiny-b\[0\]: layer 3 is not an exit layer"):
        s.check_models(facts(s))
    with pytest.raises(ScenarioError, match=r"exits\.layers\.other: 'other' is not one of the scenario's models"):
        Scenario.from_yaml(write(tmp_path, base(tiny_text_dirs) + "exits:\n  threshold: 0.5\n  layers: {other: [1]}\n"))


# ----------------------------------------------------------------------------- arrival rates relative to capacity
def _rated(tmp_path, arrival: str, unit: str = "{capacity_batch: 8}"):
    from helios_rl.scenario import Scenario

    text = f"""
name: rated
models: [smollm2-135m]
workload:
  arrival: {arrival}
  rate_unit: {unit}
  num_requests: 8
  max_new_tokens: [10, 30]
  max_prompt_tokens: 96
slo: {{ttft_s: {{x_step: 20, batch: 8}}, tpot_s: 2.0}}
"""
    p = tmp_path / "rated.yaml"
    p.write_text(text)
    return Scenario.from_yaml(p)


def test_arrival_rates_relative_to_capacity_resolve_from_the_step_time(tmp_path):
    from helios_rl.env.backend import require_resolved_slo
    from helios_rl.scenario import resolve_slo, slo_record

    step = {8: 0.1, 1: 0.05}
    sc = _rated(tmp_path, "{kind: poisson, rate: 0.5}")
    assert sc.rate_batch == 8
    with pytest.raises(ValueError, match="workload.rate_unit"):
        require_resolved_slo(sc, "x")
    res = resolve_slo(sc, lambda m, b: step[b])
    # capacity: 8 tokens per 0.1 s = 80 tok/s over 20 new tokens per request = 4 requests/s; half of it
    assert res.workload.arrival.rate == pytest.approx(2.0) and res.rate_batch is None
    assert res.slo.ttft_s == pytest.approx(2.0) and res.slo.tpot_s == 2.0
    require_resolved_slo(res, "x")
    rec = slo_record(res, sc)
    assert rec["arrival"] == {"rate_unit": {"capacity_batch": 8}, "rate": pytest.approx(2.0), "segments": []}
    slower = resolve_slo(sc, lambda m, b: 2 * step[b])  # a machine half as fast is offered half the load
    assert slower.workload.arrival.rate == pytest.approx(1.0)

    pw = resolve_slo(_rated(tmp_path, "{kind: piecewise, segments: [[0, 0.25], [10, 1.0]]}"), lambda m, b: step[b])
    assert pw.workload.arrival.segments == ((0.0, pytest.approx(1.0)), (10.0, pytest.approx(4.0)))


def test_arrival_rates_relative_to_capacity_refuse_what_they_cannot_mean(tmp_path):
    from helios_rl.scenario import ScenarioError

    with pytest.raises(ScenarioError, match="workload.rate_unit"):
        _rated(tmp_path, "{kind: poisson, rate: 0.5}", "{capacity_batch: 0}")
    with pytest.raises(ScenarioError, match="workload.rate_unit"):
        _rated(tmp_path, "{kind: poisson, rate: 0.5}", "{batch: 8}")
    trace = Path(__file__).resolve().parents[1] / ".." / "shared" / "traces" / "azure_llm_2023_conv.csv"
    with pytest.raises(ScenarioError, match="replays its own rates"):
        _rated(tmp_path, f"{{kind: trace, path: {trace}}}")


def test_the_shipped_suite_poses_machine_relative_problems():
    """Every suite scenario parses; its SLOs are relative to the machine, and so is its load wherever the
    arrivals are not a replayed trace; resolved on a machine twice as fast, the offered load doubles."""
    from helios_rl.scenario import resolve_slo

    files = sorted((ROOT / "envs" / "suite").glob("*.yaml"))
    assert len(files) >= 5
    for f in files:
        sc = Scenario.from_yaml(f)
        assert sc.slo.relative, f.name
        if sc.workload.arrival.kind == "trace":
            assert sc.rate_batch is None
            continue
        assert sc.rate_batch is not None, f"{f.name}: absolute arrival rates"
        slow, fast = (resolve_slo(sc, lambda m, b, s=s: s * b) for s in (0.02, 0.01))
        rates = [(x.workload.arrival.rate or 0.0) + sum(r for _, r in x.workload.arrival.segments) for x in (slow, fast)]
        assert rates[1] == pytest.approx(2 * rates[0]) and rates[0] > 0, f.name
        assert fast.slo.tpot_s == pytest.approx(slow.slo.tpot_s / 2), f.name
