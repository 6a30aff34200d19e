"""The helios-rl command line: sub-commands run, and bad input gives a clear error and exit code 2."""

from __future__ import annotations

from helios_rl.cli import main
from helios_rl.models.registry import UnknownModel, resolve_model

import pytest


def test_generate_prints_exit_layer_per_token(tiny_text_dirs, capsys):
    rc = main(["generate", "--model", str(tiny_text_dirs["tiny-a"]), "--prompt", "w5 w6 w7", "--max-new-tokens", "4",
               "--threshold", "0.0", "--exit-layers", "2"])
    out = capsys.readouterr().out
    assert rc == 0
    per_token = [line.split()[-1] for line in out.splitlines() if line.rstrip().split()[-2:-1] == ["layer"]]
    assert per_token == ["5", "2", "2", "2"]  # first token comes from the prefill (full depth), the rest exit at 2


def test_unknown_model_and_bad_depth_exit_2(tiny_text_dirs, capsys):
    assert main(["generate", "--model", "no-such-model", "--prompt", "x"]) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_text_dirs["tiny-a"]), "--prompt", "w5", "--depth", "7"]) == 2
    assert "depth must be between 1 and 6" in capsys.readouterr().err


def test_resolve_model_rejects_non_model_paths(tmp_path):
    with pytest.raises(UnknownModel, match="no config.json"):
        resolve_model(str(tmp_path))
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(UnknownModel, match="not a model folder"):
        resolve_model(str(f))


def test_models_list_shows_bundled_models(capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2" in out and "gemma3" in out
