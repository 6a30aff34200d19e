"""Shared fixtures: tiny real-config models saved as Hugging Face folders (built once per session)."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import FAMILIES, save_tiny, save_word_tokenizer  # noqa: E402

torch.set_num_threads(1)  # tiny models: one thread is several times faster than two (no sync overhead)


# Tests keep what they calibrate and profile (tiny models' profiles and exit statistics) out of the user's cache:
# the cache root is a temporary folder for the session. The expensive, content-addressed parts (converted bundled
# models, their GGUF files, kernel-plan timings, the locks that guard them) are linked from the user's cache, so
# the marked real-model tests do not convert the bundled models again on every run.
_SHARED_CACHE = ("models", "gguf", "kernels", "locks")


def _test_cache_root() -> Path:
    from helios_rl.utils.paths import cache_dir

    user = cache_dir()  # $HELIOS_RL_CACHE or the user's cache dir, as the package would use
    root = Path(tempfile.mkdtemp(prefix="helios_rl-test-cache-"))
    for name in _SHARED_CACHE:
        (user / name).mkdir(parents=True, exist_ok=True)
        (root / name).symlink_to(user / name, target_is_directory=True)
    atexit.register(shutil.rmtree, root, ignore_errors=True)  # removes the links, never what they point to
    return root


os.environ["HELIOS_RL_CACHE"] = str(_test_cache_root())  # set before any test (and Ray worker) starts


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """One tiny model folder per supported family (float64 weights, 6 layers)."""
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for fam in FAMILIES:
        out[fam] = save_tiny(fam, root / fam)
    return out


@pytest.fixture(scope="session")
def tiny_text_dirs(tmp_path_factory) -> dict[str, Path]:
    """Two tiny Llama models with a word-level tokenizer (for text, stop strings and switching)."""
    root = tmp_path_factory.mktemp("tinytext")
    out = {}
    for name, seed, layers, shift in (("tiny-a", 0, 6, 0), ("tiny-b", 1, 4, 11)):
        folder = save_tiny("llama", root / name, layers=layers, seed=seed)
        save_word_tokenizer(folder, shift=shift)
        out[name] = folder
    return out


# ----------------------------------------------------------------------------- env / agents
ENV_SCENARIO = """\
name: tiny-env
seed: 0
models: [{a}, {b}]
workload:
  arrival: {{kind: poisson, rate: 300.0}}
  num_requests: 24
  tasks: {{completion: 0.5, chat: 0.5}}
  max_new_tokens: 6
  max_prompt_tokens: 16
  split: all
  prompts: {{sources: [], file: {prompts}}}
slo: {{ttft_s: 0.05, tpot_s: 0.01, objective: throughput}}
engine: {{memory_budget: 3MiB, max_batch: 8, max_model_len: 48, max_prefill_tokens: 64}}
exits: {{layers: [0, 1, 2], threshold: 0.06}}
backend: {{timing: modeled, interval_s: 0.01}}
controllers:
  helios: {{profile_requests: 2, profile_batch: requests, reprofile_interval: 5}}
  random: {{change_prob: 0.3}}
"""


@pytest.fixture(scope="session")
def tiny_scenario(tmp_path_factory, tiny_text_dirs):
    root = tmp_path_factory.mktemp("envsc")
    prompts = root / "prompts.jsonl"
    with prompts.open("w") as fh:
        for i in range(12):
            words = " ".join(f"w{3 + (7 * i + 5 * j) % 150}" for j in range(4 + i % 6))
            fh.write(json.dumps({"prompt": words, "task": ("completion", "chat")[i % 2], "id": f"p{i}"}) + "\n")
    path = root / "tiny.yaml"
    path.write_text(ENV_SCENARIO.format(a=tiny_text_dirs["tiny-a"], b=tiny_text_dirs["tiny-b"], prompts=prompts))
    return path


@pytest.fixture(scope="session")
def tiny_profile(tiny_scenario, tmp_path_factory):
    from helios_rl.env.calibrate import calibrate
    from helios_rl.scenario import Scenario

    prof = calibrate(Scenario.from_yaml(tiny_scenario), thresholds=(0.06, 0.5), batches=(1, 4), prompts=3,
                     new_tokens=5)
    out = tmp_path_factory.mktemp("prof") / "profile.json"
    prof.save(out)
    return out


@pytest.fixture(scope="session")
def probe_scenario(tiny_scenario, tmp_path_factory):
    """The tiny scenario with a binding quality floor and goodput as the objective (SLO times loose, so
    goodput is gated by accuracy alone): the setting of the reward-hacking probes."""
    text = tiny_scenario.read_text().replace(
        "slo: {ttft_s: 0.05, tpot_s: 0.01, objective: throughput}",
        "slo: {ttft_s: 100.0, tpot_s: 100.0, agreement_floor: 0.9, objective: goodput}")
    assert "agreement_floor: 0.9" in text
    path = tmp_path_factory.mktemp("probe") / "probe.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="session")
def probe_profile(probe_scenario, tmp_path_factory):
    from helios_rl.env.calibrate import calibrate
    from helios_rl.scenario import Scenario

    prof = calibrate(Scenario.from_yaml(probe_scenario), batches=(1, 4), prompts=3,
                     new_tokens=5, min_tokens=200)
    out = tmp_path_factory.mktemp("probeprof") / "profile.json"
    prof.save(out)
    return out


@pytest.fixture
def plain_linear(monkeypatch):
    """Every product through ``F.linear`` (the linear plan off), for tests comparing the engine with
    transformers to the last bits: the plan's other orientation sums in another order, and families
    that normalise in float32 (Gemma3) carry that rounding difference into 1e-7 of the K/V."""
    from helios_rl.models import kernels

    monkeypatch.setenv("HELIOS_RL_LINEAR_PLAN", "off")
    kernels._plan_for.cache_clear()
    yield
    kernels._plan_for.cache_clear()
