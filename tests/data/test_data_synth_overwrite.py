"""`data synth` never deletes what it did not write: `--overwrite` replaces only the files its manifest lists, a
folder holding no synthetic dataset is refused (without recommending `--overwrite`), and a failed generation leaves
the earlier dataset intact."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

import llavakit.data.synth as synth_module
from llavakit.cli.main import main
from llavakit.data.synth import SynthConfig, generate_synth
from llavakit.errors import DataError

SMALL = SynthConfig(n_train=4, n_heldout=2, seed=0)
SMALLER = SynthConfig(n_train=2, n_heldout=1, seed=1)


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_overwrite_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "images").mkdir(parents=True)
    (out / "images" / "cat.jpg").write_bytes(b"my photo")
    (out / "finetune.json").write_text("[]")
    before = _snapshot(out)
    for flags in ([], ["--overwrite"]):
        assert main(["data", "synth", str(out), "--n", "4", "--heldout", "2", *flags]) == 2
        err = capsys.readouterr().err
        assert f"{out} is not empty and holds no synthetic dataset" in err
        assert "pass overwrite" not in err and "choose a new or empty folder" in err
    assert _snapshot(out) == before


def test_overwrite_replaces_exactly_the_files_of_the_earlier_dataset(tmp_path):
    out = generate_synth(tmp_path / "synth", SMALL).root
    (out / "NOTES.md").write_text("mine")
    (out / "images" / "train" / "extra.png").write_bytes(b"mine too")
    with pytest.raises(DataError, match="pass overwrite=True .*--overwrite"):
        generate_synth(out, SMALLER)
    dataset = generate_synth(out, SMALLER, overwrite=True)
    fresh = generate_synth(tmp_path / "fresh", SMALLER).root
    mine = {"NOTES.md", "images/train/extra.png"}
    assert {k: v for k, v in _snapshot(out).items() if k not in mine} == _snapshot(fresh)
    assert (out / "NOTES.md").read_text() == "mine" and (out / "images" / "train" / "extra.png").is_file()
    assert not (out / "images" / "train" / "00003.png").exists(), "the earlier dataset's extra images go"
    assert dataset.manifest["cached"] is False and "files" not in dataset.manifest
    files = json.loads((out / "manifest.json").read_text())["files"]
    assert sorted(files) == sorted(set(_snapshot(out)) - mine)


def test_overwrite_refuses_to_replace_a_file_its_manifest_does_not_list(tmp_path):
    out = generate_synth(tmp_path / "synth", SMALLER).root
    (out / "images" / "train" / "00003.png").write_bytes(b"the user's")
    before = _snapshot(out)
    with pytest.raises(DataError, match=r"did not write.*images/train/00003\.png.*nothing was changed"):
        generate_synth(out, SMALL, overwrite=True)
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth"], "the partial folder must be removed"


def test_a_generation_failing_midway_leaves_the_earlier_dataset_intact(tmp_path, monkeypatch):
    out = generate_synth(tmp_path / "synth", SMALL).root
    before = _snapshot(out)

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(synth_module, "_heldout_records", disk_full)  # after every image is written
    with pytest.raises(OSError, match="No space left"):
        generate_synth(out, SMALLER, overwrite=True)
    assert _snapshot(out) == before
    assert generate_synth(out, SMALL).manifest["cached"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth"]


def test_overwrite_of_a_dataset_whose_manifest_predates_the_file_list(tmp_path):
    out = generate_synth(tmp_path / "synth", SMALL).root
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["files"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "NOTES.md").write_text("mine")
    generate_synth(out, SMALLER, overwrite=True)
    fresh = generate_synth(tmp_path / "fresh", SMALLER).root
    assert {k: v for k, v in _snapshot(out).items() if k != "NOTES.md"} == _snapshot(fresh)
