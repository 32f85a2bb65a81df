"""`save_checkpoint` writes through a partial folder: a failed save leaves the earlier checkpoint intact, a re-save
keeps files the user put in the folder, and an output that would overwrite an input or another model is refused."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

import llavakit.model.checkpoint as checkpoint_module
from llavakit.cli.main import main
from llavakit.errors import CheckpointError
from llavakit.model.checkpoint import save_checkpoint
from llavakit.model.llava_next import LlavaNextModel


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _assert_same_weights(loaded: LlavaNextModel, expected: LlavaNextModel) -> None:
    expected_state = expected.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected_state[name]), name


def _disk_full(*args, **kwargs) -> None:
    raise OSError("No space left on device")


def test_a_save_failing_midway_leaves_the_earlier_checkpoint_intact(preset_model, tmp_path, monkeypatch):
    first, second = preset_model("debug-clip-llama", seed=1), preset_model("debug-clip-llama", seed=2)
    folder = save_checkpoint(first, tmp_path / "ckpt")
    before = _snapshot(folder)

    # after the weights and config.json of the new save are written
    monkeypatch.setattr(checkpoint_module, "_save_tokenizer_and_processor", _disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(second, folder)
    assert _snapshot(folder) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"], "the partial folder must be removed"
    _assert_same_weights(LlavaNextModel.from_pretrained(folder), first)


def test_a_first_save_failing_midway_leaves_no_folder(preset_model, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_module, "_save_generation_config", _disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(preset_model("debug-clip-llama"), tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_saving_again_keeps_the_users_files_and_drops_only_stale_ones_of_ours(preset_model, tmp_path):
    first, second = preset_model("debug-clip-llama", seed=1), preset_model("debug-clip-llama", seed=2)
    folder = save_checkpoint(first, tmp_path / "ckpt", max_shard_size="100KB")
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(shards) > 1
    (folder / "NOTES.md").write_text("trained on my data")
    (folder / "adapter").mkdir()
    (folder / "adapter" / "adapter_config.json").write_text("{}")
    (folder / "model_ema.safetensors").write_bytes(b"not ours")
    save_checkpoint(second, folder)
    assert (folder / "NOTES.md").read_text() == "trained on my data"
    assert (folder / "adapter" / "adapter_config.json").read_text() == "{}"
    assert (folder / "model_ema.safetensors").read_bytes() == b"not ours"
    assert not any((folder / name).exists() for name in [*shards, "model.safetensors.index.json"])
    _assert_same_weights(LlavaNextModel.from_pretrained(folder), second)


def test_saving_a_loaded_checkpoint_back_into_its_folder_is_exact(checkpoint, tmp_path):
    folder = Path(shutil.copytree(checkpoint, tmp_path / "ckpt"))
    model = LlavaNextModel.from_pretrained(folder)
    save_checkpoint(model, folder)
    _assert_same_weights(LlavaNextModel.from_pretrained(folder), model)


@pytest.mark.parametrize("where", ["same", "inside", "around"])
def test_an_output_overlapping_an_input_is_refused(preset_model, tmp_path, where):
    source = tmp_path / "src"
    source.mkdir()
    out = {"same": source, "inside": source / "out", "around": tmp_path}[where]
    with pytest.raises(CheckpointError, match=f"the output {out} .*input {source}.*outside the input"):
        save_checkpoint(preset_model("debug-clip-llama"), out, sources=[source])
    assert list(source.iterdir()) == []


def test_an_output_holding_another_model_is_refused(preset_model, preset_parts, tmp_path):
    llm = Path(shutil.copytree(preset_parts("debug-clip-llama").llm_dir, tmp_path / "llm"))
    before = _snapshot(llm)
    with pytest.raises(CheckpointError, match=f"{llm} holds another model's config.json .*'llama'"):
        save_checkpoint(preset_model("debug-clip-llama"), llm)
    assert _snapshot(llm) == before


def test_model_build_into_its_llm_folder_is_refused_before_loading(preset_parts, tmp_path, capsys):
    parts = preset_parts("debug-clip-llama")
    llm = Path(shutil.copytree(parts.llm_dir, tmp_path / "llm"))
    before = _snapshot(llm)
    argv = ["model", "build", "--vision", str(parts.vision_dir), "--llm", str(llm), "--out", str(llm)]
    assert main(argv) == 2
    assert f"the output {llm} is the input {llm}" in capsys.readouterr().err
    assert _snapshot(llm) == before
