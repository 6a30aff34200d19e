"""LayeredModel: partial loading from safetensors, depth changes, sizes, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from helios_rl.models.layered import LayeredModel
from tiny_models import FAMILIES, load_hf


@pytest.mark.parametrize("family", FAMILIES)
def test_partial_load_keeps_deeper_layers_off_memory(tiny_dirs, family):
    m = LayeredModel(tiny_dirs[family], depth=2, device="cpu", dtype=torch.float64)
    assert m.depth == 2 and m.resident_layers() == [0, 1]
    for i in range(m.num_layers):
        params = list(m.family.layers[i].parameters())
        assert params, "layer has parameters"
        on_meta = all(p.device.type == "meta" for p in params)
        assert on_meta == (i >= 2), f"layer {i} residency wrong"
    assert m.resident_bytes() == m.weight_bytes_at_depth(2)
    assert m.weight_bytes_at_depth(2) < m.weight_bytes_at_depth(m.num_layers)


def test_depth_grows_and_shrinks_without_reloading_resident_layers(tiny_dirs):
    m = LayeredModel(tiny_dirs["llama"], depth=3, device="cpu", dtype=torch.float64)
    first = m.family.layers[0]
    m.set_depth(5)
    assert m.resident_layers() == [0, 1, 2, 3, 4]
    assert m.family.layers[0] is first  # not reloaded
    m.set_depth(1)
    assert m.resident_layers() == [0]
    assert m.family.layers[0] is first
    assert all(p.device.type == "meta" for p in m.family.layers[3].parameters())
    assert m.resident_bytes() == m.weight_bytes_at_depth(1)


@pytest.mark.parametrize("family", FAMILIES)
def test_loaded_weights_equal_checkpoint(tiny_dirs, family):
    m = LayeredModel(tiny_dirs[family], device="cpu", dtype=torch.float64, fuse=False)
    ref = load_hf(tiny_dirs[family])
    ours = dict(m.hf.named_parameters())
    for name, p in ref.named_parameters():
        assert torch.equal(ours[name], p), name


@pytest.mark.parametrize("bad", [0, -1, 7, 2.5])
def test_depth_out_of_range_is_a_clear_error(tiny_dirs, bad):
    m = LayeredModel(tiny_dirs["llama"], depth=2, device="cpu", dtype=torch.float64)
    with pytest.raises(ValueError, match="depth must be between 1 and 6"):
        m.set_depth(bad)
    assert m.depth == 2  # unchanged


def test_unsupported_family_and_missing_folder(tmp_path, tiny_dirs):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        LayeredModel(tmp_path)
    cfg = json.loads((tiny_dirs["llama"] / "config.json").read_text())
    cfg["model_type"] = "bert"
    cfg["architectures"] = ["BertForMaskedLM"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="not supported"):
        LayeredModel(tmp_path)


def test_missing_tensor_names_the_key(tmp_path, tiny_dirs):
    from safetensors.torch import load_file, save_file

    src = tiny_dirs["llama"]
    for f in src.iterdir():
        if f.suffix == ".json":
            (tmp_path / f.name).write_text(f.read_text())
    sd = load_file(src / "model.safetensors")
    del sd["model.layers.4.mlp.up_proj.weight"]
    save_file(sd, tmp_path / "model.safetensors")
    m = LayeredModel(tmp_path, depth=4, device="cpu", dtype=torch.float64)  # layer 4 not needed yet
    with pytest.raises(KeyError, match="model.layers.4.mlp.up_proj.weight"):
        m.set_depth(6)


def test_kv_sizes(tiny_dirs):
    m = LayeredModel(tiny_dirs["llama"], depth=1, device="cpu", dtype=torch.float32)
    # 2 (K and V) * 2 kv heads * head_dim 16 * 4 bytes
    assert m.kv_bytes_per_token_layer() == 2 * 2 * 16 * 4


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_projections_keep_the_layer_output(tiny_dirs, family):
    plain = LayeredModel(tiny_dirs[family], device="cpu", dtype=torch.float64, fuse=False)
    fused = LayeredModel(tiny_dirs[family], device="cpu", dtype=torch.float64, fuse=True)
    assert fused.resident_bytes() == plain.resident_bytes()  # fused weights replace, not add
    h = torch.randn(2, 3, plain.hidden_size, dtype=torch.float64)
    pos = torch.arange(3).expand(2, 3)
    mask = torch.ones(2, 1, 3, 3, dtype=torch.bool).tril()
    outs = []
    for m in (plain, fused):
        tables = m.family.position_tables(h, pos)
        outs.append(m.family.run_layer(1, h, mask, None, tables, pos))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)


def _force_plan(monkeypatch, rows, method="transposed"):
    """Make the linear plan take ``method`` at ``rows`` and make F.linear (and the other kernel) unavailable
    to the kernels module, so a product that should take the planned kernel fails loudly if it does not."""
    from types import SimpleNamespace

    from helios_rl.models import kernels

    other = {"transposed": "onednn", "onednn": "transposed"}[method]
    monkeypatch.setattr(kernels, "plan", lambda: {k: {method: frozenset(rows), other: frozenset()}
                                                  for k in ("narrow", "wide")})

    def no_linear(*a, **k):
        raise AssertionError("F.linear called for a row count the plan gives another kernel")

    monkeypatch.setattr(kernels, "F", SimpleNamespace(linear=no_linear))


@pytest.mark.parametrize("method", ["transposed", "onednn"])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 16, 40])
@pytest.mark.parametrize("out_features", [48, 5000])
def test_planned_linear_takes_the_planned_kernel_and_equals_linear(monkeypatch, rows, out_features, method):
    from helios_rl.models import kernels

    if method == "onednn" and not kernels._onednn_available():
        pytest.fail("this torch build has no oneDNN linear: the plan cannot choose it here, but CI's CPU build has it")
    g = torch.Generator().manual_seed(rows)
    w, b = torch.randn(out_features, 32, generator=g), torch.randn(out_features, generator=g)
    x = torch.randn(rows, 32, generator=g)
    x3 = torch.randn(1, rows, 32, generator=g)  # a [1, N, K] batch of packed rows
    xs = torch.randn(rows, 64, generator=g)[:, ::2]  # a strided view
    want = [torch.nn.functional.linear(x, w), torch.nn.functional.linear(x, w, b), torch.nn.functional.linear(x3, w),
            torch.nn.functional.linear(xs, w, b)]
    _force_plan(monkeypatch, {rows}, method)
    got = [kernels.planned_linear(x, w), kernels.planned_linear(x, w, b), kernels.planned_linear(x3, w),
           kernels.planned_linear(xs, w, b)]
    for a, e in zip(got, want):
        assert a.shape == e.shape
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-4)
    _force_plan(monkeypatch, {rows + 1}, method)  # another row count planned: this one must call F.linear
    with pytest.raises(AssertionError, match="F.linear called"):
        kernels.planned_linear(x, w)


def test_onednn_is_used_for_float32_and_a_dense_weight_only(monkeypatch):
    """oneDNN's linear is planned on float32 probes and reads the weight's own strides: a float64 product, or a
    strided weight view, at a planned row count is F.linear's."""
    from helios_rl.models import kernels

    _force_plan(monkeypatch, {4}, "onednn")
    x, w = torch.randn(4, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64)
    with pytest.raises(AssertionError, match="F.linear called"):
        kernels.planned_linear(x, w)
    with pytest.raises(AssertionError, match="F.linear called"):
        kernels.planned_linear(torch.randn(4, 8), torch.randn(8, 6).T)


def test_products_that_need_gradients_never_take_onednn(monkeypatch):
    """oneDNN's op has no backward: exit-head training (the distillation loss runs head_linear on inputs that
    require grad) must get F.linear's gradients at every planned row count."""
    from helios_rl.models import kernels

    def no_onednn(*a, **k):
        raise AssertionError("oneDNN called for a product that needs gradients")

    monkeypatch.setattr(kernels, "plan", lambda: {k: {"onednn": frozenset({4}), "transposed": frozenset()}
                                                  for k in ("narrow", "wide")})
    monkeypatch.setattr(kernels, "_onednn_linear", no_onednn)
    g = torch.Generator().manual_seed(0)
    x0, w0 = torch.randn(4, 8, generator=g), torch.randn(6, 8, generator=g)
    for needs in ("x", "w"):
        x, w = x0.clone().requires_grad_(needs == "x"), w0.clone().requires_grad_(needs == "w")
        kernels.planned_linear(x, w).square().sum().backward()
        xr, wr = x0.clone().requires_grad_(needs == "x"), w0.clone().requires_grad_(needs == "w")
        torch.nn.functional.linear(xr, wr).square().sum().backward()
        got, want = (x.grad, xr.grad) if needs == "x" else (w.grad, wr.grad)
        torch.testing.assert_close(got, want)
    with torch.no_grad(), pytest.raises(AssertionError, match="oneDNN called"):  # no gradients: planned kernel
        kernels.planned_linear(x0.clone().requires_grad_(), w0)


def test_measure_plan_chooses_the_fastest_kernel_beyond_the_margin(monkeypatch):
    from helios_rl.models import kernels

    fake = {1: {"linear": 1.0, "transposed": 0.95, "onednn": 0.5},  # oneDNN clearly faster
            4: {"linear": 1.0, "transposed": 0.5, "onednn": 0.6},  # transposed fastest
            8: {"linear": 1.0, "transposed": 0.95, "onednn": 0.92}}  # within the margin: F.linear stays

    def timed(x, w, reps, onednn):
        m = x.shape[0]
        return fake[1 if m < 3 else 4 if m < 6 else 8]

    monkeypatch.setattr(kernels, "_time_methods", timed)
    monkeypatch.setattr(kernels, "NARROW_ROWS", (1, 4, 8))
    monkeypatch.setattr(kernels, "WIDE_ROWS", (1, 4, 8))
    monkeypatch.setattr(kernels, "MAX_ROWS", 10)
    monkeypatch.setattr(kernels, "PROBE_SHAPES", {"narrow": (8, 4), "wide": (16, 4)})
    out = kernels.measure_plan()
    for kind in ("narrow", "wide"):  # rows between timed counts take the nearer one's choice (ties: the lower)
        assert out["kinds"][kind]["rows"] == {"onednn": [1, 2], "transposed": [3, 4, 5, 6]}


def test_linear_plan_is_measured_once_per_machine_cached_and_remeasured_when_corrupt(monkeypatch, tmp_path):
    from helios_rl.models import kernels

    monkeypatch.setenv("HELIOS_RL_CACHE", str(tmp_path))
    monkeypatch.delenv("HELIOS_RL_LINEAR_PLAN", raising=False)
    calls = []

    def fake_measure(say=lambda s: None):
        calls.append(1)
        # row 4: oneDNN fastest, the transposed product also beats F.linear by the margin; row 5: only oneDNN does
        timed = {str(m): {"linear": 1.0, "transposed": 1.0, "onednn": 1.0} for m in (1, 2, 3, 6, 7, 8)}
        timed |= {"4": {"linear": 1.0, "transposed": 0.8, "onednn": 0.5},
                  "5": {"linear": 1.0, "transposed": 0.95, "onednn": 0.5}}
        return {"format": kernels.PLAN_FORMAT, "machine": kernels._machine_key(),
                "kinds": {"narrow": {"rows": {"transposed": [9, 10], "onednn": [4, 5]}, "timed_ms": timed},
                          "wide": {"rows": {"transposed": [3], "onednn": []}, "timed_ms": timed}}}

    monkeypatch.setattr(kernels, "measure_plan", fake_measure)
    kernels._plan_for.cache_clear()
    assert kernels._onednn_available(), "CI's CPU torch build has oneDNN"
    try:
        assert kernels.plan() == {"narrow": {"transposed": frozenset({9, 10}), "onednn": frozenset({4, 5})},
                                  "wide": {"transposed": frozenset({3}), "onednn": frozenset()}}
        monkeypatch.setenv("HELIOS_RL_LINEAR_PLAN", "no-onednn")  # chosen again from the timings, without it
        kernels._plan_for.cache_clear()
        assert kernels.plan()["narrow"] == {"transposed": frozenset({4}), "onednn": frozenset()}
        monkeypatch.setenv("HELIOS_RL_LINEAR_PLAN", "auto")
        real = kernels._onednn_available
        monkeypatch.setattr(kernels, "_onednn_available", lambda: False)  # read where this torch has no oneDNN
        kernels._plan_for.cache_clear()
        assert kernels.plan()["narrow"] == {"transposed": frozenset({4}), "onednn": frozenset()}
        monkeypatch.setattr(kernels, "_onednn_available", real)
        monkeypatch.setenv("HELIOS_RL_LINEAR_PLAN", "no_onednn")  # a misspelt mode is refused, not read as auto
        kernels._plan_for.cache_clear()
        with pytest.raises(ValueError, match="HELIOS_RL_LINEAR_PLAN='no_onednn'"):
            kernels.plan()
        monkeypatch.setenv("HELIOS_RL_LINEAR_PLAN", "auto")
        kernels._plan_for.cache_clear()
        assert len(calls) == 1 and kernels.plan_path().exists()
        kernels._plan_for.cache_clear()  # a new process: reads the file, measures nothing
        assert kernels.plan()["narrow"]["transposed"] == frozenset({9, 10}) and len(calls) == 1
        kernels.plan_path().write_text("{not json")
        kernels._plan_for.cache_clear()
        assert kernels.plan()["wide"]["transposed"] == frozenset({3}) and len(calls) == 2  # corrupt: measured again
        assert json.loads(kernels.plan_path().read_text())["format"] == kernels.PLAN_FORMAT
        kernels.plan_path().write_text(json.dumps({"format": kernels.PLAN_FORMAT, "machine": kernels._machine_key()}))
        kernels._plan_for.cache_clear()  # the right header without a plan: measured again, not a KeyError
        assert kernels.plan()["wide"]["transposed"] == frozenset({3}) and len(calls) == 3
        old = json.loads(kernels.plan_path().read_text())
        old["format"] = "helios_rl.linear_plan/1"  # an earlier format: measured again, not misread
        kernels.plan_path().write_text(json.dumps(old))
        kernels._plan_for.cache_clear()
        assert kernels.plan()["narrow"]["transposed"] == frozenset({9, 10}) and len(calls) == 4
        monkeypatch.setenv("HELIOS_RL_LINEAR_PLAN", "off")
        kernels._plan_for.cache_clear()
        assert kernels.plan() == {k: {"transposed": frozenset(), "onednn": frozenset()} for k in ("narrow", "wide")}
        assert len(calls) == 4
    finally:
        kernels._plan_for.cache_clear()


@pytest.mark.parametrize("family", FAMILIES)
def test_cpu_layers_use_the_plan_and_keep_their_output(tiny_dirs, monkeypatch, family):
    from helios_rl.models import kernels

    m = LayeredModel(tiny_dirs[family], device="cpu", dtype=torch.float64, fuse=False)
    linears = [mod for i in m.resident_layers() for mod in m.family.layers[i].modules()
               if isinstance(mod, torch.nn.Linear)]
    assert linears and all(type(mod) is kernels.PlannedLinear for mod in linears)
    ref = load_hf(tiny_dirs[family])
    ours = dict(m.hf.named_parameters())
    for name, p in ref.named_parameters():  # the class swap keeps every parameter
        assert torch.equal(ours[name], p), name
    h = torch.randn(5, 1, m.hidden_size, dtype=torch.float64)
    pos = torch.arange(5)[:, None]
    mask = torch.ones(5, 1, 1, 1, dtype=torch.bool)
    tables = m.family.position_tables(h, pos)
    plain = m.family.run_layer(1, h, mask, None, tables, pos)  # the real plan (whatever this machine has)
    _force_plan(monkeypatch, {5})  # every product of 5 rows transposed
    # float32 tolerance: some families (Gemma3) normalise in float32 whatever the weights' dtype
    torch.testing.assert_close(m.family.run_layer(1, h, mask, None, tables, pos), plain, rtol=1e-5, atol=1e-5)
