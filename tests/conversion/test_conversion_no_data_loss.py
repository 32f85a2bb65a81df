"""`convert` and `export_original` never destroy their input or another model: an output equal to, inside or
around the input is refused before anything is loaded, a folder holding a llava-hf checkpoint is not overwritten
with the original layout, and a failed export leaves the earlier one intact."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from llavakit.cli.main import main
from llavakit.conversion.original import export_original, import_original
from llavakit.errors import CheckpointError
from llavakit.model.checkpoint import read_config

# The fixture's system prompt is what the refusal protects; the export's warning about it is expected.
pytestmark = pytest.mark.filterwarnings("ignore:.*cannot record the system prompt:UserWarning")


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture
def llava_hf(preset_model, tmp_path) -> Path:
    """A llava-hf checkpoint with a template and system prompt that the original layout cannot record."""
    model = preset_model("debug-clip-llama")
    model.config.system_prompt = "Answer in one word."
    return model.save_pretrained(tmp_path / "hf")


@pytest.mark.parametrize("out", ["hf", "hf/original", "."])
def test_to_original_onto_its_input_is_refused_and_the_input_kept(llava_hf, tmp_path, capsys, out):
    before = _snapshot(llava_hf)
    target = tmp_path / out
    assert main(["convert", "to-original", str(llava_hf), str(target)]) == 2
    err = capsys.readouterr().err
    assert f"the output {target}" in err and f"input {llava_hf}" in err and "outside the input" in err
    assert _snapshot(llava_hf) == before
    config = read_config(llava_hf)
    assert (config.template, config.system_prompt) == ("vicuna_v1", "Answer in one word.")


def test_from_original_onto_its_input_is_refused(llava_hf, preset_parts, tmp_path, capsys):
    original = export_original(_model(llava_hf), tmp_path / "original")
    before = _snapshot(original)
    vision = str(preset_parts("debug-clip-llama").vision_dir)
    assert main(["convert", "from-original", str(original), str(original), "--vision", vision]) == 2
    assert f"the output {original} is the input {original}" in capsys.readouterr().err
    assert _snapshot(original) == before
    expected = dataclasses.replace(read_config(llava_hf).image_spec, unpad_rounding="floor")  # upstream's rule
    assert import_original(original, vision=vision).config.image_spec == expected


def test_exporting_over_a_llava_hf_checkpoint_is_refused(llava_hf, tmp_path):
    other = Path(shutil.copytree(llava_hf, tmp_path / "other"))
    before = _snapshot(other)
    with pytest.raises(
        CheckpointError, match=f"{other} holds a config.json .*'llava_next'.*not an original-layout"
    ):
        export_original(_model(llava_hf), other)
    assert _snapshot(other) == before


def test_a_failed_export_leaves_the_earlier_export_intact(llava_hf, tmp_path, monkeypatch):
    model = _model(llava_hf)
    out = export_original(model, tmp_path / "original")
    before = _snapshot(out)
    with torch.no_grad():
        model.projector.linear_1.weight.add_(1.0)

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(type(model.tokenizer), "save_pretrained", disk_full)  # after weights and config.json
    with pytest.raises(OSError, match="No space left"):
        export_original(model, out)
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "original"], (
        "the partial folder must be removed"
    )


def test_exporting_again_replaces_the_export_and_keeps_other_files(llava_hf, preset_parts, tmp_path):
    model = _model(llava_hf)
    out = export_original(model, tmp_path / "original")
    (out / "README.md").write_text("my notes")
    with torch.no_grad():
        model.projector.linear_1.weight.add_(1.0)
    export_original(model, out)
    assert (out / "README.md").read_text() == "my notes"
    assert json.loads((out / "config.json").read_text())["model_type"] == "llava_llama"
    imported = import_original(out, vision=str(preset_parts("debug-clip-llama").vision_dir))
    assert torch.equal(imported.projector.linear_1.weight, model.projector.linear_1.weight)


def _model(path: Path):
    from llavakit.model.llava_next import LlavaNextModel

    return LlavaNextModel.from_pretrained(path)
