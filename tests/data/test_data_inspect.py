"""``llavakit data inspect`` end to end: counts, errors with ids and lines, histograms, --show, exit codes."""

from __future__ import annotations

import json

import pytest
from data_helpers import chat, write_image, write_json

from llavakit.anyres.geometry import grid_shape
from llavakit.cli.main import main
from llavakit.model.tokenizer import build_bpe_tokenizer


@pytest.fixture
def setup(tmp_path, tiny_spec):
    write_image(tmp_path / "img" / "a.png", 40, 70)
    tokenizer_dir = tmp_path / "tok"
    build_bpe_tokenizer("llama").save_pretrained(tokenizer_dir)
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps({"llavakit": {"image_spec": tiny_spec.to_dict()}}))
    samples = [
        chat("<image>\nWhat is it?", "A red box.", image="a.png", sample_id="good"),
        chat("Hello", "Hi.", sample_id="text"),
        chat("<image>", "x", image="missing.png", sample_id="lost"),
        {"id": "empty", "conversations": []},
    ]
    data = write_json(tmp_path / "d.json", samples)
    return tmp_path, data, tokenizer_dir, spec_path


def run(setup, *extra):
    folder, data, tokenizer_dir, spec_path = setup
    return main(
        [
            "data",
            "inspect",
            str(data),
            "--image-folder",
            str(folder / "img"),
            "--tokenizer",
            str(tokenizer_dir),
            "--image-spec",
            str(spec_path),
            *extra,
        ]
    )


def test_inspect_reports_counts_errors_and_fails(setup, capsys, tiny_spec):
    assert run(setup, "--show", "1") == 1
    out = capsys.readouterr().out
    assert "samples: 4  with images: 2 (multi-image: 0)  text-only: 2" in out
    assert "usable: 2" in out and "bad: 2" in out
    assert "missing.png" in out and "'lost'" in out and "'empty'" in out
    rows, cols = grid_shape((40, 70), tiny_spec)
    assert f"  {1 + rows * cols}:        1 " in out  # tiles-per-image histogram: base view + grid
    assert "⟦ A red box.</s>⟧" in out and "FAIL" in out


def test_inspect_passes_under_threshold(setup, capsys):
    assert run(setup, "--max-error-fraction", "0.5") == 0
    assert "PASS" in capsys.readouterr().out


def test_inspect_reports_json_line(tmp_path, setup, capsys):
    folder, _, tokenizer_dir, spec_path = setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(chat("Hi", "Yo.")) + "\n{oops\n")
    code = main(
        ["data", "inspect", str(bad), "--image-folder", str(folder), "--tokenizer", str(tokenizer_dir)]
    )
    assert code == 1 and f"{bad}:2: malformed JSON" in capsys.readouterr().out


def test_unknown_template_exits_with_error(setup, capsys):
    assert run(setup, "--template", "nope") == 2
    assert "unknown chat template 'nope'" in capsys.readouterr().err


def test_inspect_renders_with_the_system_prompt_it_is_given(setup, capsys):
    assert run(setup, "--show", "1", "--system-prompt", "Answer the questions.", "--max-error-fraction", "0.5") == 0
    out = capsys.readouterr().out
    assert "template vicuna_v1, system prompt 'Answer the questions.'" in out
    assert "Answer the questions. USER:" in out
    assert run(setup, "--template", "plain", "--system-prompt", "Answer.") == 2
    assert "--system-prompt: template 'plain' ignores" in capsys.readouterr().err
