"""`llavakit model ...` subcommands: thin layers over the library, checked through `main()`."""

from __future__ import annotations

import json

import pytest

from llavakit.anyres.geometry import count_visual_tokens
from llavakit.cli.main import main
from llavakit.errors import CheckpointError
from llavakit.model.checkpoint import read_config


def test_preset_info_tokens_and_build(tmp_path, capsys):
    assert main(["model", "preset", "debug-clip-llama", "--out", str(tmp_path / "p")]) == 0
    checkpoint = tmp_path / "p" / "model"
    capsys.readouterr()
    assert main(["model", "info", str(checkpoint)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["vision_encoder"] == "clip" and info["template"] == "vicuna_v1"
    assert info["loads_in_transformers"] == "LlavaNextForConditionalGeneration"

    assert main(["model", "tokens", str(checkpoint), "640x480", "30x100"]) == 0
    lines = capsys.readouterr().out.splitlines()
    spec = read_config(checkpoint).image_spec
    assert lines[0].startswith(f"640x480: {count_visual_tokens((480, 640), spec)} visual tokens")
    assert lines[1].startswith(f"30x100: {count_visual_tokens((100, 30), spec)} visual tokens")

    parts = tmp_path / "p" / "parts"
    out = tmp_path / "built"
    argv = ["model", "build", "--vision", str(parts / "vision"), "--llm", str(parts / "llm"), "--out", str(out),
            "--pinpoints", "(1x1),...,(2x2)", "--projector", "linear", "--system-prompt", "Answer the questions."]
    assert main(argv) == 0
    config = read_config(out)
    assert config.projector == "linear" and len(config.image_spec.pinpoints) == 4
    assert config.system_prompt == "Answer the questions." and info["system_prompt"] is None


def test_bad_arguments_exit_2_with_a_message(tmp_path, capsys):
    assert main(["model", "preset", "debug-clip-llama", "--out", str(tmp_path / "p")]) == 0
    assert main(["model", "tokens", str(tmp_path / "p" / "model"), "640"]) == 2
    assert "not WIDTHxHEIGHT" in capsys.readouterr().err
    assert main(["model", "info", str(tmp_path / "missing")]) == 2
    assert "config.json is missing" in capsys.readouterr().err


def test_a_checkpoint_whose_system_prompt_is_not_a_string_is_refused(tmp_path):
    assert main(["model", "preset", "debug-clip-llama", "--out", str(tmp_path / "p")]) == 0
    config_file = tmp_path / "p" / "model" / "config.json"
    data = json.loads(config_file.read_text())
    data["llavakit"]["system_prompt"] = ["Answer the questions."]
    config_file.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="llavakit.system_prompt must be a string or null"):
        read_config(tmp_path / "p" / "model")
